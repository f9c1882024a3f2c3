"""
Flash attention, forward and backward, in Triton (Dao et al. 2022, "FlashAttention"; Dao 2023, "FlashAttention-2";
Shah et al. 2024, "FlashAttention-3"), causal or not, grouped-query, with document masking.

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
            of computing S = Q K^T and dP twice (7 products per block pair against FlashAttention-2/3's 5, which add
            dQ from the dK/dV kernel with float32 atomics: at head dim 128 that kernel reaches Triton's 255
            registers per thread and spills, and its atomics would move BLOCK_M x d x 4 bytes per block pair).

Documents: `doc_ids` (B, T) marks sequences packed from several documents, each run of equal consecutive ids one
document. A query then sees only the keys of its own document (and causally, none ahead). Documents are runs of
positions, so the keys a block of queries needs lie in one span, from its first query's document start to its
last query (or, not causal, its last query's document end); the loops visit only the key blocks of that span, and
the dK/dV loop likewise only the query blocks of its keys' documents: a packed row of short documents costs about
what those documents cost alone. The kernels read each position's document bounds, first key and one past the
last, computed once on the host (`document_bounds`).

Masks only where needed (FlashAttention-3's split of the causal loop): every loop runs in two phases. The first
visits the blocks where every query sees every key (before the diagonal, inside every query's document, inside T):
no comparisons, and the softmax scale folds into the one FMA that subtracts the running maximum. The second visits
the rest, masked: the diagonal blocks, the blocks at document boundaries, the tail past T.

Hopper's wgmma multiplies 64 rows per warpgroup (4 warps). Every product of S or dP has 64 rows per warpgroup and
at least 64 columns (a narrower one, m64n32, does half the work per instruction). The blocks a loop walks (K and V
in the forward and dQ, Q and dO in dK/dV) come through TMA tensor descriptors: one instruction per block instead
of a 64-bit address per thread and vector, which the dK/dV kernel has no registers for at head dim 128, and rows
past T read as 0 with no mask.

Grouped-query attention: query head h reads K/V head h // (n_head / n_kv_head) through its strides; the repeated
K/V are never materialized. The dK/dV program of one K/V head loops over the query heads of its group, so it sums
their contributions in registers.

The exponentials are base 2 (exp2 is one hardware instruction; exp is exp2 of a product): scores are scaled by
log2(e) / sqrt(d) and the saved L is in base-2 units. Every matrix product accumulates in float32 whatever the input
dtype; a float32 input multiplies in full IEEE precision (no tf32), so the float32 path is a tight reference.
Any sequence length works. Queries and keys have the same length (self-attention during training; generation with
a KV cache stays on SDPA in model.py).
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# -----------------------------------------------------------------------------
# which blocks a loop visits, and which of their pairs attend. A loop runs in two phases: phase 0 visits the
# n_full blocks from full_lo on, where every query sees every key; phase 1 the n_masked others, the first n_before
# of them from lo on, the rest from full_hi on. (The interpreter pays milliseconds for every call of a jit function,
# so each program makes one call here, and a masked step one more.)

@triton.jit
def _key_blocks(DOC_START, DOC_END, doc_row, start_m, T,
                CAUSAL: tl.constexpr, DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks of queries [start_m, start_m + BLOCK_M): (lo, full_lo, full_hi, n_full, n_masked, n_before).
    The keys they attend to lie in [lo, hi), and every query sees every key of [full_lo, full_hi)."""
    last = tl.minimum(start_m + BLOCK_M, T) - 1
    if DOCS:
        # document starts and ends grow with the position: the first query's document starts first, and the
        # last query's starts last
        lo = tl.load(DOC_START + doc_row + start_m) // BLOCK_N * BLOCK_N
        full_lo = (tl.load(DOC_START + doc_row + last) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        end, full_end = tl.load(DOC_END + doc_row + last), tl.load(DOC_END + doc_row + start_m)
    else:
        lo, full_lo, end, full_end = 0, 0, T, T
    if CAUSAL:
        hi = last + 1
        full_hi = (start_m + 1) // BLOCK_N * BLOCK_N  # keys up to the first query
    else:
        hi = end
        full_hi = full_end // BLOCK_N * BLOCK_N  # keys inside the first query's document (or T)
    full_hi = tl.maximum(full_hi, full_lo)
    n_before = (tl.minimum(full_lo, hi) - lo + BLOCK_N - 1) // BLOCK_N
    n_after = (tl.maximum(hi - full_hi, 0) + BLOCK_N - 1) // BLOCK_N
    return lo, full_lo, full_hi, (full_hi - full_lo) // BLOCK_N, n_before + n_after, n_before


@triton.jit
def _query_blocks(DOC_START, DOC_END, doc_row, start_n, T,
                  CAUSAL: tl.constexpr, DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query blocks that attend to keys [start_n, start_n + BLOCK_N): the transpose of _key_blocks, in
    multiples of BLOCK_M."""
    last = tl.minimum(start_n + BLOCK_N, T) - 1
    if DOCS:
        # queries that see every key: inside the first key's document (and, not causal, the last key's)
        hi, full_hi = tl.load(DOC_END + doc_row + last), tl.load(DOC_END + doc_row + start_n) // BLOCK_M * BLOCK_M
        first, full_first = tl.load(DOC_START + doc_row + start_n), tl.load(DOC_START + doc_row + last)
    else:
        hi, full_hi, first, full_first = T, T // BLOCK_M * BLOCK_M, 0, 0
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        full_lo = (last + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # queries from the last key on
    else:
        lo = first // BLOCK_M * BLOCK_M
        full_lo = (full_first + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(full_hi, full_lo)
    n_before = (tl.minimum(full_lo, hi) - lo + BLOCK_M - 1) // BLOCK_M
    n_after = (tl.maximum(hi - full_hi, 0) + BLOCK_M - 1) // BLOCK_M
    return lo, full_lo, full_hi, (full_hi - full_lo) // BLOCK_M, n_before + n_after, n_before


@triton.jit
def _visible(DOC_START, DOC_END, doc_row, rows, cols, T, CAUSAL: tl.constexpr, DOCS: tl.constexpr):
    """Which (query `rows`, key `cols`) pairs attend, (len(rows), len(cols)): causal, no key ahead; otherwise none
    past the query's document end (T without documents); and with documents, none before its document start."""
    if CAUSAL:
        seen = cols[None, :] <= rows[:, None]
    elif DOCS:
        seen = cols[None, :] < tl.load(DOC_END + doc_row + rows, mask=rows < T, other=T)[:, None]
    else:
        seen = cols[None, :] < T
    if DOCS:
        seen = seen & (cols[None, :] >= tl.load(DOC_START + doc_row + rows, mask=rows < T, other=0)[:, None])
    return seen


# -----------------------------------------------------------------------------
# the kernels

@triton.jit
def _block_start(j, phase: tl.constexpr, lo, full_lo, full_hi, n_before, BLOCK: tl.constexpr):
    """The first position of a loop's j-th block in `phase` (the spans of _key_blocks / _query_blocks): phase 0 walks
    the full blocks, phase 1 the n_before masked blocks before them and then those after."""
    if phase == 0:
        return full_lo + j * BLOCK
    return tl.where(j < n_before, lo + j * BLOCK, full_hi + (j - n_before) * BLOCK)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DOC_START, DOC_END,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              n_head, group, T, qk_scale,
              CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    kvh = h // group  # grouped-query attention: this query head's K/V head
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
    k_desc = tl.make_tensor_descriptor(K + b * skb + kvh * skh, [T, HEAD_DIM], [skt, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * svb + kvh * svh, [T, HEAD_DIM], [svt, 1], [BLOCK_N, HEAD_DIM])
    lo, full_lo, full_hi, n_full, n_masked, n_before = _key_blocks(DOC_START, DOC_END, b * T, start_m, T, CAUSAL,
                                                                   DOCS, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for phase in tl.static_range(2):  # 0: the blocks every query sees whole; 1: the masked rest
        for j in range(n_full if phase == 0 else n_masked):
            start_n = _block_start(j, phase, lo, full_lo, full_hi, n_before, BLOCK_N)
            cols = start_n + offs_n
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if phase == 1:
                s = tl.where(_visible(DOC_START, DOC_END, b * T, rows, cols, T, CAUSAL, DOCS), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # masked, a query may have seen no key yet (the block before its document starts): subtract 0 then,
            # not -inf, whose exp2(-inf - -inf) would be NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new) if phase == 1 else m_new
            p = tl.exp2(s * qk_scale - m_sub[:, None])  # scale and shift in one FMA
            alpha = tl.exp2(m_i - m_sub)  # rescales the blocks seen so far to the new maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], acc.to(q.dtype), mask=rows[:, None] < T)
    tl.store(LSE + bh * T + rows, m_i + tl.log2(l_i), mask=rows < T)


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
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   n_head, n_kv_head, group, T, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # one program owns BLOCK_N keys of one K/V head. Queries are the rows of S and dP, as in the other kernels (a
    # thread holds L and D of only a few rows), and it accumulates dK^T and dV^T (HEAD_DIM, BLOCK_N): dV^T = dO^T P
    # takes both operands from shared memory, where dV = P^T dO would keep a transposed copy of P in registers for
    # the whole asynchronous product (at head dim 128 that spills)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b, kvh = bkv // n_kv_head, bkv % n_kv_head
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * skb + kvh * skh + keys[:, None] * skt + offs_d[None, :], mask=keys[:, None] < T, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + keys[:, None] * svt + offs_d[None, :], mask=keys[:, None] < T, other=0.0)
    dk_t = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
    dv_t = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
    lo, full_lo, full_hi, n_full, n_masked, n_before = _query_blocks(DOC_START, DOC_END, b * T, start_n, T, CAUSAL,
                                                                     DOCS, BLOCK_M, BLOCK_N)
    # one 3-D descriptor per tensor for all the heads, built once: one built per head inside the loop keeps its
    # fields live in registers too, and with ptxas 13 (triton 3.9) the default configuration then spills at d 128
    q_desc = tl.make_tensor_descriptor(Q + b * sqb, [n_head, T, HEAD_DIM], [sqh, sqt, 1], [1, BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO + b * sdob, [n_head, T, HEAD_DIM], [sdoh, sdot, 1], [1, BLOCK_M, HEAD_DIM])
    for h in range(kvh * group, (kvh + 1) * group):  # the query heads sharing this K/V head
        row_base = (b * n_head + h) * T
        for phase in tl.static_range(2):  # 0: query blocks that see every key of this block; 1: the masked rest
            for j in range(n_full if phase == 0 else n_masked):
                start_m = _block_start(j, phase, lo, full_lo, full_hi, n_before, BLOCK_M)
                rows = start_m + offs_m
                q = q_desc.load([h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
                do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
                # rows past T (masked phase) read q = dO = 0, L = D = 0: their dS is 0, they add nothing
                lse = tl.load(LSE + row_base + rows, mask=rows < T, other=0.0)
                delta = tl.load(DELTA + row_base + rows, mask=rows < T, other=0.0)
                p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
                if phase == 1:
                    p = tl.where(_visible(DOC_START, DOC_END, b * T, rows, keys, T, CAUSAL, DOCS), p, 0.0)
                dv_t = tl.dot(tl.trans(do), p.to(do.dtype), dv_t, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk_t = tl.dot(tl.trans(q), ds.to(q.dtype), dk_t, input_precision=PRECISION)
    tl.store(DK + b * sdkb + kvh * sdkh + keys[:, None] * sdkt + offs_d[None, :],
             tl.trans(dk_t * sm_scale).to(k.dtype), mask=keys[:, None] < T)
    tl.store(DV + b * sdvb + kvh * sdvh + keys[:, None] * sdvt + offs_d[None, :], tl.trans(dv_t).to(v.dtype),
             mask=keys[:, None] < T)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                 n_head, group, T, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # one program per query block, over the same key blocks as the forward
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    kvh = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_t = rows[:, None] < T
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=in_t, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + offs_d[None, :], mask=in_t, other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    k_desc = tl.make_tensor_descriptor(K + b * skb + kvh * skh, [T, HEAD_DIM], [skt, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * svb + kvh * svh, [T, HEAD_DIM], [svt, 1], [BLOCK_N, HEAD_DIM])
    lo, full_lo, full_hi, n_full, n_masked, n_before = _key_blocks(DOC_START, DOC_END, b * T, start_m, T, CAUSAL,
                                                                   DOCS, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for phase in tl.static_range(2):
        for j in range(n_full if phase == 0 else n_masked):
            start_n = _block_start(j, phase, lo, full_lo, full_hi, n_before, BLOCK_N)
            cols = start_n + offs_n
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            # rows past T have q = dO = 0, hence dS = 0: they need no mask of their own (nor are they stored)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            if phase == 1:
                p = tl.where(_visible(DOC_START, DOC_END, b * T, rows, cols, T, CAUSAL, DOCS), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqt + offs_d[None, :], (dq * sm_scale).to(q.dtype),
             mask=in_t)


# -----------------------------------------------------------------------------
# launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, the first the default. On a GPU
# triton.autotune times each on the first call of every head dim, mode and dtype and keeps the fastest;
# `bench.py --aot` compiles them all for H100. wgmma's 64 rows per warpgroup set the shapes: 128 queries on 8 warps
# or 64 on 4, at least 64 keys. dK/dV keeps two (HEAD_DIM, BLOCK_N) float32 accumulators besides S and dP: 128 x 64
# on 8 warps is what fits in the registers at head dim 128 (64 x 64 on 4 warps, or 128 keys, spill).
CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "bwd_dkdv": [(128, 64, 8, 2), (128, 64, 8, 1)],
    "bwd_dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)],
}
DELTA_BLOCK, DELTA_WARPS = 64, 4  # the pre-pass only reads O and dO once: a row reduction
# float32 on a GPU is a checking path, not a fast one: IEEE products run on the FMA units (no tensor cores), and
# their operands live in registers, so only small blocks fit (compiled for H100 at head dim 64 only the dK/dV kernel
# spills, under 1 KB; at 128 all three do)
FLOAT32_CONFIG = (32, 32, 8, 1)
# the interpreter runs every program one after another on the CPU: few, small blocks keep the tests quick
INTERPRETER_CONFIGS = {name: (32, 32, 1, 1) for name in CONFIGS}


def _autotuned(kernel, name):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in CONFIGS[name]]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "DOCS"])(kernel)


_KERNELS = {"fwd": _attn_fwd, "bwd_dkdv": _attn_bwd_dkdv, "bwd_dq": _attn_bwd_dq}
_TUNED = {name: _autotuned(kernel, name) for name, kernel in _KERNELS.items()}


def _launch(name, grid, tensor, *args, **constexprs):
    """Launch kernel `name` on the grid grid(BLOCK_M, BLOCK_N) gives: autotuned for bf16/fp16 on a GPU, at a fixed
    configuration for float32 and in the interpreter."""
    if tensor.device.type == "cuda":
        # the TMA descriptors the kernels build live in a global scratch buffer. The allocator is per thread (a
        # ContextVar), and autograd runs the backward in a thread of its own: set before every launch
        triton.set_allocator(_scratch)
    if tensor.device.type == "cuda" and tensor.dtype != torch.float32:
        _TUNED[name][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
        return
    m, n, warps, stages = INTERPRETER_CONFIGS[name] if tensor.device.type == "cpu" else FLOAT32_CONFIG
    _KERNELS[name][grid(m, n)](*args, **constexprs, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ready(t):
    """t, or a contiguous copy unless it is what TMA descriptors read: a 16-byte aligned start, a contiguous last
    dimension, and the other strides positive multiples of 16 bytes (model.py's tensors are; an incoming gradient
    may be a broadcast of stride 0)."""
    ready = (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
             and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))
    return t if ready else t.contiguous() if not t.is_contiguous() else t.clone()


def _precision(dtype):
    # float32 inputs multiply in IEEE float32, not tf32 (10-bit mantissa), so they match the reference to 1e-4;
    # bf16 / fp16 tensor-core products are exact anyway, with float32 accumulation
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def document_bounds(doc_ids):
    """doc_ids (B, T) -> (first, end), int32 (B, T): where each position's document starts, and one past where it
    ends. A document is a run of equal consecutive ids."""
    from kernels import document_starts
    first = document_starts(doc_ids)
    # read from the other end, a document's start is its last position: T - that is one past it
    end = doc_ids.size(1) - document_starts(doc_ids.flip(1)).flip(1)
    return first.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _bounds(doc_ids, lse):
    # without documents the kernels never read the bounds: any pointer will do
    return document_bounds(doc_ids) if doc_ids is not None else (lse, lse)


def forward(q, k, v, causal, doc_ids=None):
    """-> O (B, H, T, D) and the log-sum-exp of every query row (B, H, T), float32, for the backward. Called by
    the custom op nanotanuki::flash_attention (kernels/__init__.py), which wires it into autograd."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    assert k.shape == v.shape == (B, H_kv, T, D) and H % H_kv == 0, "q (B, H, T, D), k and v (B, H_kv, T, D)"
    assert D in (16, 32, 64, 128), f"head_dim {D}: the flash kernel takes 16, 32, 64 or 128 " \
                                   "(NANOTANUKI_KERNELS=torch runs SDPA instead)"
    assert q.stride(-1) == 1, "the head dimension of q must be contiguous"
    assert doc_ids is None or doc_ids.shape == (B, T), "doc_ids (B, T)"
    k, v = _tma_ready(k), _tma_ready(v)
    # O is allocated as (B, T, H, D) and returned as the (B, H, T, D) view: model.py's transpose back to
    # (B, T, H * D) is then free
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _launch("fwd", lambda m, n: (triton.cdiv(T, m), B * H), q,
            q, k, v, o, lse, *_bounds(doc_ids, lse), *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, H // H_kv, T, math.log2(math.e) / math.sqrt(D),
            CAUSAL=causal, DOCS=doc_ids is not None, HEAD_DIM=D, PRECISION=_precision(q.dtype))
    return o, lse


def backward(do, q, k, v, o, lse, causal, doc_ids=None):
    """-> dq, dk, dv (nanotanuki::flash_attention_backward)."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    q, k, v, do = _tma_ready(q), _tma_ready(k), _tma_ready(v), _tma_ready(do)
    qk_scale, sm_scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(T, DELTA_BLOCK), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=DELTA_BLOCK, num_warps=DELTA_WARPS,
        num_stages=1)
    bounds = _bounds(doc_ids, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    constexprs = dict(CAUSAL=causal, DOCS=doc_ids is not None, HEAD_DIM=D, PRECISION=_precision(q.dtype))
    _launch("bwd_dkdv", lambda m, n: (triton.cdiv(T, n), B * H_kv), q,
            q, k, v, do, lse, delta, dk, dv, *bounds, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv), H, H_kv, H // H_kv, T, qk_scale, sm_scale, **constexprs)
    _launch("bwd_dq", lambda m, n: (triton.cdiv(T, m), B * H), q,
            q, k, v, do, lse, delta, dq, *bounds, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), H, H // H_kv, T, qk_scale, sm_scale, **constexprs)
    return dq, dk, dv


def flash_attention(q, k, v, causal=True, doc_ids=None):
    """q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, T, head_dim); doc_ids: (B, T) or None -> (B, n_head, T,
    head_dim), differentiable: the custom op nanotanuki::flash_attention around forward and backward above
    (kernels/__init__.py)."""
    import kernels
    return kernels.flash_attention(q, k, v, causal, doc_ids)


# -----------------------------------------------------------------------------
# the same function in plain PyTorch

def reference(q, k, v, causal=True, doc_ids=None):
    """Scores in float32 (or the input's wider dtype), the whole (T, T) mask, K/V heads repeated for grouped-query
    attention: slow and plain, what the tests compare the kernels with."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = k.repeat_interleave(group, dim=1).to(dtype), v.repeat_interleave(group, dim=1).to(dtype)
    s = q.to(dtype) @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
    visible = torch.ones(B, T, T, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if doc_ids is not None:
        # the same document: the same count of id changes so far
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        doc = starts.cumsum(dim=1)
        visible = visible & (doc[:, :, None] == doc[:, None, :])
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def document_attention(q, k, v, doc_ids, causal=True, chunk=256):
    """The flash kernel's document masking for the CPU: shapes as flash_attention, through SDPA (autograd
    included), `chunk` queries at a time. A chunk's keys lie between its first query's document start and its last
    query (not causal: its last query's document end), so each chunk attends to that span alone, with a (chunk,
    span) mask: for documents shorter than a chunk that is O(T * chunk) work and memory, not O(T^2). The spans are
    read on the host (one synchronization per call)."""
    B, H, T, D = q.shape
    first, end = document_bounds(doc_ids)
    starts = list(range(0, T, chunk))
    lasts = [min(start + chunk, T) - 1 for start in starts]
    # over the batch: one span for every row of a chunk
    spans = zip(first[:, starts].min(dim=0).values.tolist(), end[:, lasts].max(dim=0).values.tolist())
    out = []
    for start, last, (lo, hi) in zip(starts, lasts, spans):
        stop = last + 1
        hi = stop if causal else hi
        query, key = torch.arange(start, stop, device=q.device), torch.arange(lo, hi, device=q.device)
        visible = (key >= first[:, start:stop, None]) & (key < end[:, start:stop, None])  # (B, chunk, span)
        if causal:
            visible = visible & (key <= query[:, None])
        out.append(F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi],
                                                  attn_mask=visible[:, None], enable_gqa=True))
    return torch.cat(out, dim=2)


def aot_specs():
    """What `bench.py --aot` compiles for H100, in bf16 with causal masking: every configuration of every kernel at
    head dim 128 with documents (the most registers, and a superset of the code without), and the default ones at
    head dim 64 and without documents."""
    from kernels.aot import spec
    bf16 = {name: "bf16" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs = {**bf16, "LSE": "fp32", "DELTA": "fp32", "DOC_START": "i32", "DOC_END": "i32"}
    cases = [(name, config, 128, True) for name in CONFIGS for config in CONFIGS[name]]
    cases += [(name, CONFIGS[name][0], head_dim, docs) for name in CONFIGS for head_dim, docs in ((128, False),
                                                                                                   (64, True))]
    out = []
    for name, (block_m, block_n, warps, stages), head_dim, docs in cases:
        constexprs = {"CAUSAL": True, "DOCS": docs, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      "PRECISION": "tf32"}
        label = f"d{head_dim} causal{' docs' if docs else ''} {block_m}x{block_n} w{warps} s{stages}"
        out.append(spec(f"attention_{name}", label, _KERNELS[name], ptrs, constexprs, warps, stages, matmul=True,
                        floats=("qk_scale", "sm_scale"), small=("group", "n_kv_head")))
    out.append(spec("attention_bwd_delta", f"d128 {DELTA_BLOCK} rows w{DELTA_WARPS}", _attn_bwd_delta, ptrs,
                    {"HEAD_DIM": 128, "BLOCK_M": DELTA_BLOCK}, DELTA_WARPS, 1, matmul=False))
    return out
