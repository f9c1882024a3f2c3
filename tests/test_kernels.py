"""Claims about kernels/: each Triton kernel computes the same function as its PyTorch reference (values and
gradients), checked in Triton's interpreter on the CPU in float32 and float16; and each compiles for H100 in bf16 at
its production configuration with no spills, using wgmma where it multiplies matrices
(docs/design.md "Running without a GPU"). The interpreter multiplies bf16 bit patterns, so bf16 is checked only by
the compile.

TRITON_INTERPRET=1 must be set before the kernels are decorated; it is set here, for this whole pytest process, and
the kernel modules are reloaded in case a test collected earlier imported them without it. It only changes how
Triton kernels run, and the other test files use PyTorch on the CPU (kernels.use_triton is False there)."""

import importlib
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import attention, cross_entropy, rmsnorm  # noqa: E402
from kernels import moe as kmoe  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

for _module in (attention, rmsnorm, cross_entropy, kmoe):
    importlib.reload(_module)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32: the interpreter multiplies in float32, as the kernels do on H100 for float32 inputs (IEEE, no tf32).
# fp16: inputs, outputs and the probabilities fed to the second product round to 11 bits of mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}


def max_rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the error against the scale of the result, never NaN-tolerant."""
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_against_float64(fn, ours_fn, inputs, grad_out, dtype):
    """Run the kernel on `inputs` and the reference on float64 copies; compare outputs and input gradients."""
    out = ours_fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = fn(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    assert out.dtype == dtype
    assert max_rel_err(out, ref) <= TOLERANCE[dtype]
    for name, g, r in zip("abcdefgh", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert max_rel_err(g, r) <= TOLERANCE[dtype], f"gradient of input {name}"


# -----------------------------------------------------------------------------
# RMSNorm and the fused loss

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rmsnorm_matches_reference(dtype):
    torch.manual_seed(0)
    # 21 rows (not a multiple of the backward's rows per program) of 48 (not a power of two: masked lanes)
    x = torch.randn(3, 7, 48, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48, dtype=dtype)).requires_grad_()
    dy = torch.randn(3, 7, 48, dtype=dtype)
    check_against_float64(lambda x, w: rmsnorm.reference(x, w, 1e-5), lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
                          (x, w), dy, dtype)


def test_rmsnorm_row_offsets_past_2_31_elements(tmp_path):
    """Forward and backward address a row whose offset row * stride is past 2**31 elements (at d 4096, row 524,288
    and on). The 3 rows are a strided view into an 8 GiB sparse file mapped shared, so only the pages touched take
    memory: row 2 starts 3 * 2**30 elements into the view, and a view 2**31 elements into the file puts the int32
    wrap-around address (3 * 2**30 - 2**32 from the view) still inside the file, where it reads zeros instead of
    crashing the process, and the comparison with the reference catches it."""
    torch.manual_seed(0)
    row_stride, start, d = 3 * 2**29, 2**31, 48
    size = start + 2 * row_stride + d
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(2 * size)
    x = torch.from_file(str(path), shared=True, size=size, dtype=torch.float16).as_strided((3, d), (row_stride, 1),
                                                                                          start)
    x.copy_(torch.randn(3, d))
    w = (1 + 0.1 * torch.randn(d)).to(torch.float16).requires_grad_()
    check_against_float64(lambda x, w: rmsnorm.reference(x, w, 1e-5), lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
                          (x.requires_grad_(), w), torch.randn(3, d, dtype=torch.float16), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_cross_entropy_matches_reference(dtype):
    """A vocab of 4 of the kernel's 2,048-wide blocks (Tanuki's 65,536 is 32 of them, the same loop; the interpreter
    runs each block in Python), 37 tokens in chunks of 16 (the last chunk is short), ignored targets and a loss mask,
    as model.py's forward passes them."""
    torch.manual_seed(0)
    N, C, V = 37, 16, 8192
    x = torch.randn(N, C, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[[3, 10, 36]] = -1
    mask = (torch.rand(N) > 0.3).float()
    loss = cross_entropy.linear_cross_entropy(x, w, targets, mask, chunk=16)
    grads = torch.autograd.grad(2 * loss, (x, w))  # a non-unit incoming gradient scales the saved ones
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cross_entropy.reference(x64, w64, targets, mask)
    ref_grads = torch.autograd.grad(2 * ref, (x64, w64))
    assert max_rel_err(loss, ref) <= TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and max_rel_err(g, r) <= TOLERANCE[dtype]
    with torch.no_grad():  # the forward alone skips the gradients and gives the same loss
        assert cross_entropy.linear_cross_entropy(x, w, targets, mask, chunk=16).item() == loss.item()
    nothing = torch.full((N,), -1)  # a batch with nothing to learn gives 0, not NaN
    assert cross_entropy.linear_cross_entropy(x, w, nothing, chunk=16).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_cross_entropy_accumulates_over_micro_batches(dtype):
    """Gradient accumulation as train.py does it: 2 micro-batches, each (loss / 2).backward(), sum into the weight's
    .grad the float64 reference's gradients of the same two losses, the second in place into the first's buffer;
    micro-batches with every target ignored, or with no token at all (where no product writes dW), add zero; and the
    op's backward scales the forward's gradients in place."""
    torch.manual_seed(0)
    N, C, V = 21, 16, 4096
    w = (0.5 * torch.randn(V, C)).to(dtype).requires_grad_()
    w64 = w.detach().double().requires_grad_()
    xs = [torch.randn(n, C, dtype=dtype, requires_grad=True) for n in (N, N, N, 0)]
    targets = [torch.randint(0, V, (N,)), torch.randint(0, V, (N,)), torch.full((N,), -1), torch.zeros(0, dtype=int)]
    targets[0][[2, 9]] = -1
    buffers = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # which fills torch.empty with NaN: a dW left unwritten would show
    try:
        for x, t in zip(xs, targets):
            (cross_entropy.linear_cross_entropy(x, w, t, chunk=8) / 2).backward()
            (cross_entropy.reference(x.detach().double(), w64, t) / 2).backward()
            buffers.append(w.grad.data_ptr())
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(set(buffers)) == 1
    assert w.grad.dtype == dtype and max_rel_err(w.grad, w64.grad) <= TOLERANCE[dtype]
    for x, t in zip(xs[:2], targets):
        x64 = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(cross_entropy.reference(x64, w.detach().double(), t) / 2, (x64,))
        assert max_rel_err(x.grad, ref_dx) <= TOLERANCE[dtype]
    assert not xs[2].grad.any() and xs[3].grad.shape == (0, C)
    dx, dw = torch.ones(3, 2, dtype=dtype), torch.ones(4, 2, dtype=dtype)
    out = cross_entropy.backward(dx, dw, torch.tensor(0.25))
    assert out[0] is dx and out[1] is dw and (dw == 0.25).all() and (dx == 0.25).all()


# -----------------------------------------------------------------------------
# dispatch and model.py

def test_model_with_kernels_equals_model_with_torch(monkeypatch):
    """The whole model through the kernels (attention, both RMSNorms, the fused loss) gives model.py's loss and
    gradients; on that path it returns no logits, and without targets it still does."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=1, ffn_hidden=96, max_seq_len=64)
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 97, (2, 21)), torch.randint(0, 97, (2, 21))
    targets[0, :4] = -1
    mask = (torch.rand(2, 21) > 0.2).float()
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
        model.zero_grad()
        logits, loss = model(idx, targets, loss_mask=mask)
        loss.backward()
        results[backend] = logits, loss.detach(), [p.grad.clone() for p in model.parameters()]
        assert (logits is None) == (backend == "triton")
        assert model(idx)[0].shape == (2, 21, 97)
    (_, loss_torch, grads_torch), (_, loss_triton, grads_triton) = results["torch"], results["triton"]
    assert max_rel_err(loss_triton, loss_torch) <= 1e-5
    for g, r in zip(grads_triton, grads_torch):
        assert max_rel_err(g, r) <= 1e-4


# -----------------------------------------------------------------------------
# torch.compile: each kernel is one custom op (kernels/__init__.py), so a block compiles as one graph around them

@pytest.mark.parametrize("ffn", ["dense", "moe", "moe_capacity"])
def test_block_with_kernels_compiles_whole(monkeypatch, ffn):
    """With the kernels on (the CUDA path, here in the interpreter), dynamo traces a dense or MoE block with no graph
    break: the launches, their host-side grids and the MoE's data-dependent sizes stay inside the nanotanuki ops,
    whose fake functions give the output shapes. Compiled (aot_eager) equals eager to 1e-5, gradients included."""
    from test_moe import assert_compiles_whole, block_config
    monkeypatch.setenv("NANOTANUKI_KERNELS", "triton")
    ops = ["nanotanuki.flash_attention", "nanotanuki.rms_norm"]
    overrides = {}
    if ffn != "dense":
        ops += ["nanotanuki.moe_route", "nanotanuki.moe_ffn"]
        overrides = dict(n_experts=8, moe_top_k=2, moe_router="softmax_topk_renorm", moe_bias_update_rate=1e-3,
                         moe_capacity_factor=1.0 if ffn == "moe_capacity" else 0.0)
    assert_compiles_whole(block_config(**overrides), expect_ops=ops)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_row_cross_entropy_matches_reference(monkeypatch, backend, dtype):
    """DPO's per-sequence sums: each row's summed loss and its gradients for a different incoming gradient per row
    (what the DPO loss sends back) equal full float64 logits', with ignored targets, a loss mask and a short last
    chunk, through the row kernel (interpreted) and through the PyTorch chunks."""
    monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
    torch.manual_seed(0)
    B, T, C, V = 3, 13, 16, 4096
    x = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    targets[0, :5] = -1
    targets[2] = -1  # a row with nothing that counts sums to 0
    mask = (torch.rand(B, T) > 0.3).float()
    upstream = torch.tensor([1.5, -0.7, 2.0])
    sums = kernels.linear_cross_entropy_per_row(x, w, targets, mask, chunk=7)
    grads = torch.autograd.grad((sums * upstream).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cross_entropy.reference_per_row(x64, w64, targets, mask)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (x64, w64))
    assert sums.shape == (B,) and sums[2].item() == 0.0
    assert max_rel_err(sums, ref) <= TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and max_rel_err(g, r) <= TOLERANCE[dtype]


def test_fused_loss_compiles_whole():
    """The fused lm_head + cross-entropy op under torch.compile(fullgraph=True): eager's loss and gradients."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 32, requires_grad=True), torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (2, 9))
    targets[0, :3] = -1
    mask = (torch.rand(2, 9) > 0.3).float()

    def loss_fn(x, w, targets, mask):
        return kernels.linear_cross_entropy(x, w, targets, mask, chunk=8)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        loss = fn(x, w, targets, mask)
        results.append([loss.detach(), *torch.autograd.grad(2 * loss, (x, w))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


# -----------------------------------------------------------------------------
# ahead-of-time compile for H100, and the CPU half of the benchmark

def run_bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOTANUKI_KERNELS")}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_kernel_compiles_for_h100_without_spills_and_with_wgmma():
    # a fresh process: the real compiler needs kernels decorated without TRITON_INTERPRET
    result = run_bench("--aot")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]  # "\|" is a "|" in a cell
    rows = [dict(zip(cells[0], row)) for row in cells[1:]]
    names = {row["kernel"] for row in rows}
    assert names == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_delta",
                     "rmsnorm_fwd", "rmsnorm_bwd", "cross_entropy_rows", "moe_router", "moe_count", "moe_scan",
                     "moe_rank", "moe_combine", "moe_combine_dx", "moe_gate_up", "moe_grouped_mm",
                     "moe_grouped_mm_dx", "moe_gate_up_dx", "moe_down_backward", "moe_grouped_mm_dw", "moe_down_dw",
                     "moe_gate_up_dw"}
    multiply_matrices = {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "moe_gate_up", "moe_grouped_mm",
                         "moe_grouped_mm_dx", "moe_gate_up_dx", "moe_down_backward", "moe_grouped_mm_dw",
                         "moe_down_dw", "moe_gate_up_dw"}
    # Triton ships cuobjdump and nvdisasm: without them the loop column would read '-' and say why above the table
    disassembled = "no disassembler found" not in result.stdout
    for row in rows:
        name, loops = row["kernel"], row["SASS per loop iteration"]
        assert int(row["registers"]) <= 255 and row["spill bytes"] == "0", row
        assert row["wgmma"] == "yes" if name in multiply_matrices else row["wgmma"].startswith("n/a"), row
        if name in multiply_matrices:  # Hopper's shapes: m64, k16 for bf16, n a multiple of 8 up to 256
            assert re.fullmatch(r"m64n\d+k16 x\d+(, m64n\d+k16 x\d+)*", row["wgmma shapes"]), row
        else:
            assert row["wgmma shapes"] == "-", row
        if disassembled:
            assert loops == "no loop" or re.fullmatch(r"[1-9]\d*(, [1-9]\d*)*", loops), row
    if disassembled:  # the loops each kernel's source has: the products' K loop, the loss's two passes over the vocab
        assert all(row["SASS per loop iteration"] != "no loop" for row in rows if row["kernel"] in multiply_matrices)
        by_name = {row["kernel"]: row["SASS per loop iteration"] for row in rows}
        assert by_name["rmsnorm_fwd"] == "no loop" and len(by_name["cross_entropy_rows"].split(", ")) == 2


def test_aot_check_fails_spills_shared_memory_and_matmuls_without_wgmma():
    from kernels.aot import SMEM_LIMIT, problems
    good = {"error": None, "spill_bytes": 0, "shared_bytes": 1024, "matmul": True, "wgmma": True}
    assert problems(good) == []
    assert problems({**good, "spill_bytes": 8})
    assert problems({**good, "shared_bytes": SMEM_LIMIT + 1})
    assert problems({**good, "wgmma": False})
    assert problems({**good, "matmul": False, "wgmma": False}) == []
    assert problems({**good, "error": "CompilationError: ..."})


def test_bench_on_cpu_measures_nothing_and_says_so():
    result = run_bench("--seq_len=1024")
    assert result.returncode == 0, result.stderr
    assert "measured nothing" in result.stdout
    assert "attention fwd (causal)" in result.stdout and "linear + cross-entropy" in result.stdout
    assert "moe grouped GEMM fwd" in result.stdout and "moe combine" in result.stdout
