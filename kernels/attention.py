"""
Flash attention, forward and backward, in Triton (Dao et al. 2022, "FlashAttention"; Dao 2023, "FlashAttention-2").

softmax(Q K^T / sqrt(d)) V is computed without ever holding the (T, T) score matrix in memory:

  forward   one program per (BLOCK_M queries, batch x query head). It walks the keys BLOCK_N at a time, keeping
            for each query the running maximum m, the running sum of exponentials l and the unnormalized output
            acc. A new key block rescales what came before by exp(m_old - m_new) ("online softmax", Milakov &
            Gimelshein 2018), so one pass suffices. It stores O = acc / l and the log-sum-exp L = m + log(l) of
            every query row: 4 bytes per row instead of T per row.
  backward  P = exp(S - L) is recomputed from Q, K and the saved L instead of being stored. With
            D_i = sum_j dO_ij O_ij (a small pre-pass):  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
            dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d).
            Two kernels, as in FlashAttention-2: one owns a block of keys and accumulates its dK, dV over every
            query block; the other owns a block of queries and accumulates its dQ over every key block. Each
            output has exactly one writer, so there are no atomics and the result is deterministic, at the price
            of computing Q K^T twice in the backward.

Grouped-query attention: query head h reads K/V head h // (n_head / n_kv_head) through its strides; the repeated
K/V are never materialized. The dK/dV program of one K/V head loops over the query heads of its group, so it sums
their contributions in registers.

The exponentials are base 2 (exp2 is one hardware instruction; exp is exp2 of a product): scores are scaled by
log2(e) / sqrt(d) and the saved L is in base-2 units. Every matrix product accumulates in float32 whatever the input
dtype; a float32 input multiplies in full IEEE precision (no tf32), so the float32 path is a tight reference.
Any sequence length works: the last blocks are masked. Queries and keys have the same length (self-attention
during training; generation with a KV cache stays on SDPA in model.py).
"""

import math

import torch
import triton
import triton.language as tl


# -----------------------------------------------------------------------------
# the kernels

@triton.jit
def _key_block(q, k_base, v_base, skt, svt, offs_m, start_n, T, scale_log2,
               CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Load keys and values [start_n, start_n + BLOCK_N) and score the query block against them: K, V, the
    scores S = Q K^T in base-2 units (BLOCK_M, BLOCK_N), and which of them are real (inside T; causal: not ahead)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
    v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    valid = cols[None, :] < T
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    return k, v, s, valid

@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              n_head, group, T, scale_log2,
              CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    kvh = h // group  # grouped-query attention: this query head's K/V head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # causal: keys after the block's last query contribute nothing, so the loop stops there
    end_n = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, end_n, BLOCK_N):
        k, v, s, valid = _key_block(q, k_base, v_base, skt, svt, offs_m, start_n, T, scale_log2,
                                    CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
        s = tl.where(valid, s, float("-inf"))
        # every real query sees key 0 in the first block, so m_new is finite from the first iteration on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales the blocks seen so far to the new maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], acc.to(q.dtype),
             mask=offs_m[:, None] < T)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, n_head, T,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # D_i = rowsum(dO * O): the term of dS that comes from the softmax's normalization
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                   sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   n_head, n_kv_head, group, T, scale_log2, sm_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    # one program owns BLOCK_N keys of one K/V head; the transposed products (keys as rows) keep dK and dV as
    # (BLOCK_N, HEAD_DIM) accumulators without transposing them at the end
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b, kvh = bkv // n_kv_head, bkv % n_kv_head
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < T
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=keys, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :], mask=keys, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # causal: queries before this key block never see it; start at the query block holding key start_n
    begin_m = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for h in range(kvh * group, (kvh + 1) * group):  # the query heads sharing this K/V head
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * n_head + h) * T
        for start_m in range(begin_m, T, BLOCK_M):
            rows = start_m + offs_m
            q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdot + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < T, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M) = S^T
            valid = (offs_n[:, None] < T) & (rows[None, :] < T)
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= rows[None, :])
            p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], (dk * sm_scale).to(k.dtype),
             mask=keys)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(v.dtype), mask=keys)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                 n_head, group, T, scale_log2, sm_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    end_n = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, end_n, BLOCK_N):
        k, v, s, valid = _key_block(q, k_base, v_base, skt, svt, offs_m, start_n, T, scale_log2,
                                    CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
        # rows past T have q = dO = 0, hence dS = 0: they need no mask of their own (nor are they stored)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], (dq * sm_scale).to(q.dtype),
             mask=rows)


# -----------------------------------------------------------------------------
# launch configurations: the production ones are what `bench.py --aot` compiles for H100; the interpreter runs
# every program one after another on the CPU, where fewer, smaller blocks are what keeps the tests quick

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Forward: 128 queries x 64 keys per step with 8 warps is
# the shape of Triton's Hopper tutorial kernel. The backward holds two (BLOCK, HEAD_DIM) float32 accumulators,
# so its blocks are smaller to stay clear of register spills at head dim 128.
CONFIGS = {
    "fwd": (128, 64, 8, 3),
    "bwd_dkdv": (64, 64, 8, 2),
    "bwd_dq": (64, 64, 8, 2),
}
DELTA_WARPS = 4  # the pre-pass only reads O and dO once: a row reduction
# float32 on a GPU is a checking path, not a fast one: IEEE products run on the FMA units (no tensor cores), and
# their operands live in registers, so only small blocks fit (AOT at head dim 64: no spills; at 128 the forward
# spills about 1 KB)
FLOAT32_CONFIG = (32, 32, 4, 2)
INTERPRETER_BLOCK = 32


def _config(name, tensor):
    if tensor.device.type == "cpu":
        return INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1
    return FLOAT32_CONFIG if tensor.dtype == torch.float32 else CONFIGS[name]


def _precision(dtype):
    # float32 inputs multiply in IEEE float32, not tf32 (10-bit mantissa), so they match the reference to 1e-4;
    # bf16 / fp16 tensor-core products are exact anyway, with float32 accumulation
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, causal):
    """-> O (B, H, T, D) and the log-sum-exp of every query row (B, H, T), float32, for the backward. Called by
    the custom op nanotanuki::flash_attention (kernels/__init__.py), which wires it into autograd."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    assert k.shape == v.shape == (B, H_kv, T, D) and H % H_kv == 0, "q (B, H, T, D), k and v (B, H_kv, T, D)"
    assert D in (16, 32, 64, 128), f"head_dim {D}: the flash kernel takes 16, 32, 64 or 128 " \
                                   "(NANOTANUKI_KERNELS=torch runs SDPA instead)"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "the head dimension must be contiguous"
    # O is allocated as (B, T, H, D) and returned as the (B, H, T, D) view: model.py's transpose back to
    # (B, T, H * D) is then free
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    scale_log2 = math.log2(math.e) / math.sqrt(D)
    block_m, block_n, warps, stages = _config("fwd", q)
    _attn_fwd[(triton.cdiv(T, block_m), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, H // H_kv, T, scale_log2, CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def backward(do, q, k, v, o, lse, causal):
    """-> dq, dk, dv (nanotanuki::flash_attention_backward)."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    do = do if do.stride(-1) == 1 else do.contiguous()
    scale_log2, sm_scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)
    block_m, _, _, _ = _config("bwd_dq", q)
    _attn_bwd_delta[(triton.cdiv(T, block_m), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=block_m, num_warps=DELTA_WARPS,
        num_stages=1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = _config("bwd_dkdv", q)
    _attn_bwd_dkdv[(triton.cdiv(T, block_n), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, H_kv, H // H_kv, T, scale_log2, sm_scale,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        num_warps=warps, num_stages=stages)
    block_m, block_n, warps, stages = _config("bwd_dq", q)
    _attn_bwd_dq[(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, H // H_kv, T, scale_log2, sm_scale, CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m,
        BLOCK_N=block_n, PRECISION=precision, num_warps=warps, num_stages=stages)
    return dq, dk, dv


def flash_attention(q, k, v, causal=True):
    """q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, T, head_dim) -> (B, n_head, T, head_dim), differentiable:
    the custom op nanotanuki::flash_attention around forward and backward above (kernels/__init__.py)."""
    import kernels
    return kernels.flash_attention(q, k, v, causal)


def reference(q, k, v, causal=True):
    """The same function in plain PyTorch: scores in float32, K/V heads repeated for grouped-query attention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    s = q.float() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def aot_specs():
    """What `bench.py --aot` compiles for H100: every kernel at its production configuration, in bf16."""
    from kernels.aot import spec
    bf16 = {name: "bf16" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs = {**bf16, "LSE": "fp32", "DELTA": "fp32"}
    small = ("group", "n_kv_head")
    out = []
    for head_dim in (128, 64):
        for name, fn in (("fwd", _attn_fwd), ("bwd_dkdv", _attn_bwd_dkdv), ("bwd_dq", _attn_bwd_dq)):
            block_m, block_n, warps, stages = CONFIGS[name]
            label = f"d{head_dim} causal {block_m}x{block_n} w{warps} s{stages}"
            constexprs = {"CAUSAL": True, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                          "PRECISION": "tf32"}
            out.append(spec(f"attention_{name}", label, fn, ptrs, constexprs, warps, stages, matmul=True,
                            floats=("scale_log2", "sm_scale"), small=small))
    block_m = CONFIGS["bwd_dq"][0]
    out.append(spec("attention_bwd_delta", f"d128 {block_m} rows w{DELTA_WARPS}", _attn_bwd_delta, ptrs,
                    {"HEAD_DIM": 128, "BLOCK_M": block_m}, DELTA_WARPS, 1, matmul=False))
    return out

