"""
Fused RMSNorm, forward and backward, in Triton (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").

    y = round(x * r) * w,   r = 1 / sqrt(mean(x^2) + eps),   computed in float32, round() to x's dtype

exactly model.py's `RMSNorm` (normalize in float32, cast back, then scale). Unfused, PyTorch runs an upcast, a
reduction, a multiply, a cast and a scale as separate passes over the activations; here one program reads a row
once and writes it once, and keeps r (4 bytes per row) for the backward.

Backward, with n = x * r and g = dy * w:   dx = r * (g - n * mean(g * n)),   dw = sum over rows of dy * round(n).
dx is again one pass per row. dw sums over every row of the batch: rather than atomically adding into one vector
(whose float order, and so its result, would change from run to run), each program sums its own rows into one row
of a (programs, dim) float32 buffer and PyTorch adds the rows up: deterministic, and the buffer is small.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    # int64 before any product with a stride: in int32, row * stride_x passes 2**31 (and wraps to a wrong address)
    # from row 524,288 at d 4096, a batch of 128 sequences of 4096 tokens in one call
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    w = tl.load(W + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    # round the normalized row to x's dtype before scaling: the reference's `.type_as(x) * weight`
    n = (xf * rstd).to(x.dtype)
    tl.store(Y + row * stride_y + cols, (n.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(X, W, DY, DX, RSTD, DW_PARTIAL, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                 ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 as in the forward: every row and dw offset below derives from it
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        if row < n_rows:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = x.to(tl.float32) * rstd
            g = dy * w
            dx = rstd * (g - n * (tl.sum(g * n, 0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(x.dtype), mask=mask)
            dw += dy * n.to(x.dtype).to(tl.float32)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


# production: one row of 4096 (Tanuki-8B's d_model) per program, 8 warps = 16 elements per thread. The backward
# gives each program 32 rows (an 8B micro-batch of 4096 tokens makes 128 programs for 132 SMs) and so a dw buffer of
# 128 x 4096 float32: 2 MiB.
NUM_WARPS = 8
BWD_ROWS_PER_PROGRAM = 32
INTERPRETER_ROWS_PER_PROGRAM = 4  # the interpreter runs programs in turn: fewer, fuller programs are faster


def forward(x, weight, eps):
    """-> y (x's shape) and 1/rms of every row (rows,) float32, for the backward (nanotanuki::rms_norm)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty(n_rows, n_cols, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(n_cols)
    _rmsnorm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block,
                            num_warps=NUM_WARPS)
    return y.view(*shape[:-1], n_cols), rstd


def backward(dy, x, weight, rstd):
    """-> dx, dweight (nanotanuki::rms_norm_backward)."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    n_rows, n_cols = x2.shape
    dy = dy.reshape(n_rows, n_cols)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    rows_per_program = INTERPRETER_ROWS_PER_PROGRAM if x2.device.type == "cpu" else BWD_ROWS_PER_PROGRAM
    programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty_like(x2)
    dw_partial = torch.empty(programs, n_cols, device=x2.device, dtype=torch.float32)
    _rmsnorm_bwd[(programs,)](x2, weight, dy, dx, rstd, dw_partial, x2.stride(0), dy.stride(0), dx.stride(0),
                              n_rows, n_cols, ROWS_PER_PROGRAM=rows_per_program,
                              BLOCK=triton.next_power_of_2(n_cols), num_warps=NUM_WARPS)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


def rms_norm(x, weight, eps):
    """Differentiable: the custom op nanotanuki::rms_norm around forward and backward (kernels/__init__.py)."""
    import kernels
    return kernels.rms_norm(x, weight, eps)


def reference(x, weight, eps):
    """model.py's RMSNorm, the definition the kernel matches."""
    return torch.nn.functional.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x) * weight


def aot_specs():
    """What `bench.py --aot` compiles for H100: Tanuki-8B's d_model 4096, in bf16."""
    from kernels.aot import spec
    ptrs = {"X": "bf16", "W": "bf16", "Y": "bf16", "DY": "bf16", "DX": "bf16", "RSTD": "fp32", "DW_PARTIAL": "fp32"}
    return [
        spec("rmsnorm_fwd", f"d4096 1 row w{NUM_WARPS}", _rmsnorm_fwd, ptrs, {"BLOCK": 4096}, NUM_WARPS, 1,
             matmul=False, floats=("eps",)),
        spec("rmsnorm_bwd", f"d4096 {BWD_ROWS_PER_PROGRAM} rows w{NUM_WARPS}", _rmsnorm_bwd, ptrs,
             {"ROWS_PER_PROGRAM": BWD_ROWS_PER_PROGRAM, "BLOCK": 4096}, NUM_WARPS, 1, matmul=False),
    ]
