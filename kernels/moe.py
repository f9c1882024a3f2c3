"""
The routing path of moe.py in Triton: the router's top-k, the permutation into expert order, a grouped matrix
multiply over the variable-size expert groups, and the gated combine back into token order. Each kernel's
plain-PyTorch reference is moe.py itself (`route`, `expert_sorted`); the tests compare the two.

    router    one program per block of tokens: softmax over the E logits, k rounds of argmax over the selection
              scores (probs + bias), then the k gates in the routing mode. Forward only: the gates' gradient with
              respect to the logits is a few PyTorch ops on the saved indices (route_backward).
    permute   the N*k (token, expert) assignments, sorted by expert with token order kept inside an expert (a
              stable counting sort, the order torch.argsort(stable=True) gives in moe.expert_sorted):
                _count   each block of assignments counts its own per-expert histogram
                _scan    one program adds the histograms up in block order: each block's starting rank inside
                         every expert, and the experts' offsets (exclusive prefix sum of the kept counts)
                _rank    each assignment's rank inside its expert = its block's starting rank + a cumulative
                         sum inside the block; rank >= capacity drops it; otherwise its sorted position is
                         offset[expert] + rank
              Every value has exactly one writer: no atomics, so the result never depends on scheduling.
    gather    x rows into expert order (and, for the backward of the combine, dy rows scaled by the gate)
    grouped   Y_e = X_e W_e^T for every expert e on its contiguous slice X_e of the sorted rows, in one launch.
              The programs are (tile, column block) pairs, where a tile is BLOCK_M rows of one expert: a map
              built from the offsets says which expert and rows each tile has, so an expert with 3 tokens costs
              one tile, not the largest expert's count (no padding). dX_e = dY_e W_e is the same kernel with
              W's strides swapped; dW_e = dY_e^T X_e is a second kernel, one program per (expert, output tile),
              summing over its expert's rows in order.
    combine   y[t] = sum_j gate[t, j] * out[position of (t, j)], one program per block of tokens, so each output
              row has one writer; with all gates 1 it is also the gather's backward (dx from dxs).

The whole forward syncs nothing to the host: the sorted buffers have N*k rows whatever capacity drops (the dropped
ones sit at the end, zero), and the grid of the grouped GEMM is its upper bound of tiles, cdiv(N*k, BLOCK_M) + E,
the spare programs returning at once. Every product accumulates in float32 and rounds to the input's dtype once.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MODES = {"topk_softmax": 0, "softmax_topk": 1, "softmax_topk_renorm": 2}  # moe.ROUTER_MODES, as kernel constants


# -----------------------------------------------------------------------------
# router

@triton.jit
def _router(LOGITS, BIAS, EXPERTS, GATES, PROBS, n_tokens, n_experts,
            K: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    real = cols[None, :] < n_experts
    mask = (rows[:, None] < n_tokens) & real
    offs = rows[:, None] * n_experts + cols[None, :]
    logits = tl.load(LOGITS + offs, mask=mask, other=float("-inf"))
    # padded rows are all -inf: give them zeros so their (discarded) softmax stays finite
    logits = tl.where(rows[:, None] < n_tokens, logits, tl.where(real, 0.0, float("-inf")))
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = e / tl.sum(e, 1)[:, None]
    tl.store(PROBS + offs, probs, mask=mask)
    scores = probs
    if HAS_BIAS:  # selection only, never the gates (moe.route)
        scores = probs + tl.load(BIAS + cols, mask=cols < n_experts, other=0.0)[None, :]
    scores = tl.where(real, scores, float("-inf"))
    # k rounds of argmax, best first (torch.topk's order); slot[t, e] = the round that picked e, or -1
    slot = tl.full([BLOCK_T, BLOCK_E], -1, dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(scores, 1)
        picked = cols[None, :] == best[:, None]
        slot = tl.where(picked, j, slot)
        scores = tl.where(picked, float("-inf"), scores)
    chosen = slot >= 0
    if MODE == 0:  # softmax over the chosen logits only
        m = tl.max(tl.where(chosen, logits, float("-inf")), 1)
        g = tl.where(chosen, tl.exp(logits - m[:, None]), 0.0)
        g = g / tl.sum(g, 1)[:, None]
    else:
        g = tl.where(chosen, probs, 0.0)
        if MODE == 2:
            g = g / tl.sum(g, 1)[:, None]
    for j in tl.static_range(K):
        here = slot == j
        tl.store(EXPERTS + rows * K + j, tl.sum(tl.where(here, cols[None, :], 0), 1).to(tl.int64),
                 mask=rows < n_tokens)
        tl.store(GATES + rows * K + j, tl.sum(tl.where(here, g, 0.0), 1), mask=rows < n_tokens)


def route_forward(logits, bias, top_k, mode):
    """(logits (N, E) float32, bias (E,) or None) -> experts (N, k), gates (N, k), probs (N, E), as moe.route
    (nanotanuki::moe_route)."""
    N, E = logits.shape
    assert E <= 64 and top_k <= min(8, E), "the fused router takes up to 64 experts and top-8 " \
                                           "(NANOTANUKI_KERNELS=torch routes in PyTorch instead)"
    assert logits.dtype == torch.float32, "the router runs in float32 (moe.MoE.forward)"
    logits = logits.contiguous()
    experts = torch.empty(N, top_k, device=logits.device, dtype=torch.int64)
    gates = torch.empty(N, top_k, device=logits.device, dtype=torch.float32)
    probs = torch.empty(N, E, device=logits.device, dtype=torch.float32)
    block_e = triton.next_power_of_2(E)
    block_t = ROUTER_BLOCK // block_e
    _router[(triton.cdiv(N, block_t),)](logits, logits if bias is None else bias, experts, gates, probs, N, E,
                                        K=top_k, MODE=MODES[mode], HAS_BIAS=bias is not None, BLOCK_T=block_t,
                                        BLOCK_E=block_e, num_warps=ROUTER_WARPS)
    return experts, gates, probs


def route_backward(d_gates, d_probs, logits, experts, gates, probs, mode):
    """The selection is not differentiable; the gates' and probs' gradients flow to the logits by the chain rule
    written out in PyTorch on the saved indices (cheaper than recomputing the whole route under autograd)."""
    d_probs = torch.zeros_like(probs) if d_probs is None else d_probs.clone()
    d_logits = torch.zeros_like(logits)
    if d_gates is not None:
        centered = d_gates - (d_gates * gates).sum(-1, keepdim=True)
        if mode == "topk_softmax":  # a softmax of the chosen logits: its backward is g * (dg - sum(dg g))
            d_logits.scatter_add_(-1, experts, gates * centered)
        elif mode == "softmax_topk":  # the chosen probs themselves
            d_probs.scatter_add_(-1, experts, d_gates)
        else:  # g = p / S, S the chosen probs' sum: d p_i = (dg_i - sum(dg g)) / S
            d_probs.scatter_add_(-1, experts, centered / probs.gather(-1, experts).sum(-1, keepdim=True))
    return d_logits + probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))


def route(logits, top_k, mode, bias=None):
    """moe.route through the fused kernel: (experts, gates, probs), differentiable through the custom op of
    kernels/__init__.py."""
    import kernels
    return kernels.moe_route(logits, top_k, mode, bias)


# -----------------------------------------------------------------------------
# permutation

@triton.jit
def _count(EXPERTS, PARTIAL, n_assign, n_experts, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    # PARTIAL[b, e] = how many of block b's assignments went to expert e
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(EXPERTS + offs, mask=offs < n_assign, other=-1)
    hits = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(PARTIAL + b * BLOCK_E + cols, tl.sum(hits, 0))


@triton.jit
def _scan(PARTIAL, BLOCK_START, OFFSETS, n_blocks, n_experts, capacity, BLOCK_E: tl.constexpr):
    # one program: blocks in order, so every sum is in a fixed order
    cols = tl.arange(0, BLOCK_E)
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b in range(n_blocks):
        tl.store(BLOCK_START + b * BLOCK_E + cols, running)  # assignments to e in the blocks before b
        running += tl.load(PARTIAL + b * BLOCK_E + cols)
    kept = tl.minimum(running, capacity)
    ends = tl.cumsum(kept, 0)
    # OFFSETS[e] = first sorted row of expert e, OFFSETS[E] = rows kept
    tl.store(OFFSETS + cols, ends - kept, mask=cols < n_experts)
    tl.store(OFFSETS + 1 + cols, ends, mask=cols == n_experts - 1)


@triton.jit
def _rank(EXPERTS, BLOCK_START, OFFSETS, POSITION, SORTED, n_assign, capacity,
          BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_E)
    real = offs < n_assign
    e = tl.load(EXPERTS + offs, mask=real, other=0)
    hits = (e[:, None] == cols[None, :]).to(tl.int32)
    # rank inside the expert: earlier blocks' count + earlier assignments of this block (inclusive sum - 1)
    before = tl.load(BLOCK_START + b * BLOCK_E + cols)[None, :] + tl.cumsum(hits, 0) - 1
    rank = tl.sum(tl.where(hits > 0, before, 0), 1)
    keep = real & (rank < capacity)
    pos = tl.load(OFFSETS + e, mask=real, other=0) + rank
    tl.store(POSITION + offs, tl.where(keep, pos, -1), mask=real)
    tl.store(SORTED + pos, offs, mask=keep)


def permute(experts, n_experts, capacity=None):
    """experts (N, k) -> (position (N*k,) int32: each assignment's row in expert order, -1 if dropped;
    sorted (N*k,) int32: the assignment at each row, -1 past the kept rows; offsets (E + 1,) int32: expert e owns
    rows [offsets[e], offsets[e + 1]), at most `capacity` rows, the first in token order)."""
    flat = experts.reshape(-1)
    n_assign = flat.numel()
    block_e = triton.next_power_of_2(n_experts)
    block = PERMUTE_BLOCK
    n_blocks = triton.cdiv(n_assign, block)
    cap = n_assign if capacity is None else capacity
    partial = torch.empty(n_blocks, block_e, device=flat.device, dtype=torch.int32)
    block_start = torch.empty_like(partial)
    offsets = torch.empty(n_experts + 1, device=flat.device, dtype=torch.int32)
    position = torch.empty(n_assign, device=flat.device, dtype=torch.int32)
    sorted_assign = torch.full((n_assign,), -1, device=flat.device, dtype=torch.int32)
    _count[(n_blocks,)](flat, partial, n_assign, n_experts, BLOCK=block, BLOCK_E=block_e, num_warps=PERMUTE_WARPS)
    _scan[(1,)](partial, block_start, offsets, n_blocks, n_experts, cap, BLOCK_E=block_e, num_warps=1)
    _rank[(n_blocks,)](flat, block_start, offsets, position, sorted_assign, n_assign, cap, BLOCK=block,
                       BLOCK_E=block_e, num_warps=PERMUTE_WARPS)
    return position, sorted_assign, offsets


def permute_reference(experts, n_experts, capacity=None):
    """The same three arrays from moe.expert_sorted's stable argsort."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    if capacity is not None:
        order, counts = order[rank < capacity], counts.clamp(max=capacity)
    position = torch.full_like(flat, -1)
    position[order] = torch.arange(order.numel(), device=flat.device)
    sorted_assign = torch.full_like(flat, -1)
    sorted_assign[: order.numel()] = order
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    return position.int(), sorted_assign.int(), offsets.int()


# -----------------------------------------------------------------------------
# gather into expert order and combine back into token order

@triton.jit
def _gather(SRC, DST, SORTED, GATES, OUT, D_GATES, n_rows, d, top_k,
            HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # DST[p] = SRC[token of the assignment at p] (times its gate with HAS_GATE), 0 past the kept rows. With
    # HAS_GATE this is the combine's backward: SRC is dy, and D_GATES[a] = dy[token] . OUT[p] on the way
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = tl.load(SORTED + p, mask=p < n_rows, other=-1)
    kept = a >= 0
    token = tl.where(kept, a // top_k, 0).to(tl.int64)
    if HAS_GATE:
        gate = tl.load(GATES + a, mask=kept, other=0.0)
        dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        rows = tl.load(SRC + token[:, None] * d + c[None, :], mask=kept[:, None] & (c[None, :] < d), other=0.0)
        if HAS_GATE:
            out = tl.load(OUT + p.to(tl.int64)[:, None] * d + c[None, :], mask=kept[:, None] & (c[None, :] < d),
                          other=0.0)
            dot += tl.sum(rows.to(tl.float32) * out.to(tl.float32), 1)
            rows = (rows.to(tl.float32) * gate[:, None]).to(rows.dtype)
        tl.store(DST + p.to(tl.int64)[:, None] * d + c[None, :], rows, mask=(p[:, None] < n_rows) & (c[None, :] < d))
    if HAS_GATE:
        tl.store(D_GATES + a, dot, mask=kept)


@triton.jit
def _combine(SRC, DST, POSITION, GATES, n_tokens, d,
             K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # DST[t] = sum over the token's kept assignments j of gate[t, j] * SRC[position of (t, j)]
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            pos = tl.load(POSITION + t * K + j, mask=t < n_tokens, other=-1)
            kept = pos >= 0
            rows = tl.load(SRC + pos.to(tl.int64)[:, None] * d + c[None, :], mask=kept[:, None] & (c[None, :] < d),
                           other=0.0).to(tl.float32)
            if HAS_GATE:
                rows = rows * tl.load(GATES + t * K + j, mask=kept, other=0.0)[:, None]
            acc += rows
        tl.store(DST + t.to(tl.int64)[:, None] * d + c[None, :], acc.to(DST.dtype.element_ty),
                 mask=(t[:, None] < n_tokens) & (c[None, :] < d))


def _gather_launch(src, sorted_assign, top_k, gates=None, out=None):
    n_rows, d = sorted_assign.numel(), src.shape[1]
    dst = torch.empty(n_rows, d, device=src.device, dtype=src.dtype)
    d_gates = None if gates is None else torch.zeros_like(gates)
    block_m, block_d, warps = ROW_CONFIG if src.is_cuda else INTERPRETER_ROW_CONFIG
    _gather[(triton.cdiv(n_rows, block_m),)](src, dst, sorted_assign, gates, out, d_gates, n_rows, d, top_k,
                                             HAS_GATE=gates is not None, BLOCK_M=block_m, BLOCK_D=block_d,
                                             num_warps=warps)
    return dst, d_gates


def _combine_launch(src, position, top_k, gates=None):
    n_tokens, d = position.numel() // top_k, src.shape[1]
    dst = torch.empty(n_tokens, d, device=src.device, dtype=src.dtype)
    block_t, block_d, warps = ROW_CONFIG if src.is_cuda else INTERPRETER_ROW_CONFIG
    _combine[(triton.cdiv(n_tokens, block_t),)](src, dst, position, gates, n_tokens, d, K=top_k,
                                                HAS_GATE=gates is not None, BLOCK_T=block_t, BLOCK_D=block_d,
                                                num_warps=warps)
    return dst


class Gather(torch.autograd.Function):
    """x (N, d) -> its rows in expert order (N*k, d); the backward adds each token's k row gradients back."""

    @staticmethod
    def forward(ctx, x, position, sorted_assign, top_k):
        ctx.save_for_backward(position)
        ctx.top_k = top_k
        return _gather_launch(x, sorted_assign, top_k)[0]

    @staticmethod
    def backward(ctx, d_xs):
        (position,) = ctx.saved_tensors
        return _combine_launch(d_xs.contiguous(), position, ctx.top_k), None, None, None


class Combine(torch.autograd.Function):
    """expert outputs in expert order (N*k, d), gates (N, k) -> y (N, d) = the gated sum per token."""

    @staticmethod
    def forward(ctx, out, gates, position, sorted_assign):
        top_k = gates.shape[1]
        gates = gates.contiguous()
        ctx.save_for_backward(out, gates, sorted_assign)
        return _combine_launch(out, position, top_k, gates)

    @staticmethod
    def backward(ctx, dy):
        out, gates, sorted_assign = ctx.saved_tensors
        d_out, d_gates = _gather_launch(dy.contiguous(), sorted_assign, gates.shape[1], gates, out)
        return d_out, d_gates, None, None


# -----------------------------------------------------------------------------
# grouped GEMM

@triton.jit
def _grouped_mm(X, W, Y, TILE_EXPERT, TILE_ROW, OFFSETS, n_out, n_in,
                stride_we, stride_wn, stride_wk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # Y[rows of tile, n block] = X[rows, :] @ W[e]^T, W[e] read as (n_out, n_in) through its strides
    tile = tl.program_id(0)
    e = tl.load(TILE_EXPERT + tile)
    if e < 0:  # one of the spare programs past the last real tile
        return
    rows = tl.load(TILE_ROW + tile) + tl.arange(0, BLOCK_M)
    row_end = tl.load(OFFSETS + e + 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    x_ptrs = X + rows64[:, None] * n_in + ks[None, :]
    w_ptrs = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        x = tl.load(x_ptrs, mask=(rows[:, None] < row_end) & (k0 + ks[None, :] < n_in), other=0.0)
        w = tl.load(w_ptrs, mask=(k0 + ks[:, None] < n_in) & (cols[None, :] < n_out), other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    tl.store(Y + rows64[:, None] * n_out + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < row_end) & (cols[None, :] < n_out))


@triton.jit
def _grouped_mm_dw(DY, X, DW, OFFSETS, n_out, n_in,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # DW[e][n block, k block] = sum over expert e's rows of DY[row, n]^T X[row, k]; zero for an expert with no rows
    e = tl.program_id(0)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        live = rows[:, None] < end
        dy = tl.load(DY + rows[:, None] * n_out + cols_n[None, :], mask=live & (cols_n[None, :] < n_out), other=0.0)
        x = tl.load(X + rows[:, None] * n_in + cols_k[None, :], mask=live & (cols_k[None, :] < n_in), other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    tl.store(DW + e.to(tl.int64) * n_out * n_in + cols_n[:, None] * n_in + cols_k[None, :],
             acc.to(DW.dtype.element_ty), mask=(cols_n[:, None] < n_out) & (cols_k[None, :] < n_in))


def tile_map(offsets, n_rows, block_m):
    """Which expert and first row each BLOCK_M-row tile of the grouped GEMM has: (expert (T,), row (T,)) int32
    with T = cdiv(n_rows, block_m) + E, the most tiles E groups of n_rows rows can need; spare tiles get -1.
    Built on the device from the offsets (searchsorted over the running tile count), so nothing waits for
    the host."""
    E = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tiles = (counts + block_m - 1) // block_m                          # (E,) tiles per expert
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(n_rows, block_m) + E, device=offsets.device)
    expert = torch.searchsorted(ends, t, right=True)                   # E for the spare tiles
    e = expert.clamp(max=E - 1)
    row = offsets[e].long() + (t - (ends - tiles)[e]) * block_m
    return torch.where(expert < E, e, -1).int(), row.int()


def _gemm_config(x):
    if x.device.type == "cpu":
        return INTERPRETER_GEMM_CONFIG
    return FLOAT32_GEMM_CONFIG if x.dtype == torch.float32 else GEMM_CONFIGS


def _precision(dtype):
    # float32 multiplies in IEEE float32 (not tf32) so the float32 path is a tight check; 16-bit products are exact
    return "ieee" if dtype == torch.float32 else "tf32"


def grouped_mm_input(x, w, offsets, tiles, transposed, zero_tail):
    """x (M, K) in expert order @ w[e]^T per group, w (E, N, K); with `transposed`, x @ w[e], w read as (E, K, N).
    `zero_tail`: rows past offsets[E] (dropped by capacity) are written as zeros rather than left unset."""
    block_m, block_n, block_k, warps, stages = _gemm_config(x)["fwd"]
    _, a, b = w.shape
    n_out, n_in = (b, a) if transposed else (a, b)
    s_e, s_a, s_b = w.stride()
    y = (torch.zeros if zero_tail else torch.empty)(x.shape[0], n_out, device=x.device, dtype=x.dtype)
    tile_expert, tile_row = tiles
    _grouped_mm[(tile_expert.numel(), triton.cdiv(n_out, block_n))](
        x, w, y, tile_expert, tile_row, offsets, n_out, n_in, s_e, *((s_b, s_a) if transposed else (s_a, s_b)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype), num_warps=warps,
        num_stages=stages)
    return y


def grouped_mm_weight(dy, x, offsets, n_experts, dtype):
    """dW (E, N, K) with dW[e] = dy[rows of e]^T x[rows of e]."""
    block_m, block_n, block_k, warps, stages = _gemm_config(x)["dw"]
    n_out, n_in = dy.shape[1], x.shape[1]
    dw = torch.empty(n_experts, n_out, n_in, device=x.device, dtype=dtype)
    _grouped_mm_dw[(n_experts, triton.cdiv(n_out, block_n), triton.cdiv(n_in, block_k))](
        dy, x, dw, offsets, n_out, n_in, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return dw


class GroupedMM(torch.autograd.Function):
    """y = x[rows of e] @ w[e]^T for every expert e; x (M, K) contiguous in expert order, w (E, N, K)."""

    @staticmethod
    def forward(ctx, x, w, offsets, tiles, zero_tail):
        x = x.contiguous()
        ctx.save_for_backward(x, w, offsets, *tiles)
        ctx.zero_tail = zero_tail
        return grouped_mm_input(x, w, offsets, tiles, False, zero_tail)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, *tiles = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm_input(dy, w, offsets, tiles, True, ctx.zero_tail)
        return dx, grouped_mm_weight(dy, x, offsets, w.shape[0], w.dtype), None, None, None


def grouped_mm(x, w, offsets, tiles=None, zero_tail=False):
    if tiles is None:
        tiles = tile_map(offsets, x.shape[0], _gemm_config(x)["fwd"][0])
    return GroupedMM.apply(x, w, offsets, tiles, zero_tail)


def grouped_mm_reference(x, w, offsets):
    """The per-expert loop: the same product, one F.linear per expert (rows past offsets[E] are zero)."""
    y = x.new_zeros(x.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        y[bounds[e]:bounds[e + 1]] = F.linear(x[bounds[e]:bounds[e + 1]], w[e])
    return y


# -----------------------------------------------------------------------------
# the whole expert FFN

def ffn_forward(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """moe.expert_sorted through the kernels: x (N, d) contiguous, experts (N, k), gates (N, k) float32, expert
    weights (E, f, d) and (E, d, f) -> y (N, d), then what ffn_backward needs: xs, g, u, out in expert order and
    the permutation (position, sorted_assign, offsets) (nanotanuki::moe_ffn). The SwiGLU between the products is
    PyTorch (elementwise)."""
    top_k = experts.shape[1]
    position, sorted_assign, offsets = permute(experts, w_gate.shape[0], capacity)
    tiles = tile_map(offsets, sorted_assign.numel(), _gemm_config(x)["fwd"][0])
    zero_tail = capacity is not None  # without capacity every sorted row belongs to an expert
    xs = _gather_launch(x, sorted_assign, top_k)[0]                            # (N*k, d) in expert order
    g = grouped_mm_input(xs, w_gate, offsets, tiles, False, zero_tail)        # (N*k, f)
    u = grouped_mm_input(xs, w_up, offsets, tiles, False, zero_tail)          # (N*k, f)
    out = grouped_mm_input(F.silu(g) * u, w_down, offsets, tiles, False, zero_tail)  # (N*k, d)
    y = _combine_launch(out, position, top_k, gates.contiguous())
    return y, xs, g, u, out, position, sorted_assign, offsets


def ffn_backward(dy, gates, w_gate, w_up, w_down, xs, g, u, out, position, sorted_assign, offsets, capacity=None):
    """-> dx, d_gates, dw_gate, dw_up, dw_down: the forward's chain rule step by step, each product's backward
    the grouped GEMM on transposed weights (dx) and the per-expert dW kernel (nanotanuki::moe_ffn_backward)."""
    E, top_k = w_gate.shape[0], gates.shape[1]
    tiles = tile_map(offsets, sorted_assign.numel(), _gemm_config(xs)["fwd"][0])
    zero_tail = capacity is not None
    gates = gates.contiguous()
    d_out, d_gates = _gather_launch(dy, sorted_assign, top_k, gates, out)     # the combine's backward
    h = F.silu(g) * u                                                         # recomputed: elementwise, cheap
    d_h = grouped_mm_input(d_out, w_down, offsets, tiles, True, zero_tail)
    dw_down = grouped_mm_weight(d_out, h, offsets, E, w_down.dtype)
    d_g = torch.ops.aten.silu_backward(d_h * u, g)
    d_u = d_h * F.silu(g)
    d_xs = (grouped_mm_input(d_g, w_gate, offsets, tiles, True, zero_tail)
            + grouped_mm_input(d_u, w_up, offsets, tiles, True, zero_tail))
    dw_gate = grouped_mm_weight(d_g, xs, offsets, E, w_gate.dtype)
    dw_up = grouped_mm_weight(d_u, xs, offsets, E, w_up.dtype)
    dx = _combine_launch(d_xs, position, top_k)                               # the gather's backward
    return dx, d_gates, dw_gate, dw_up, dw_down


def moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """moe.expert_sorted through the kernels, differentiable through the custom op of kernels/__init__.py."""
    import kernels
    return kernels.moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)


# -----------------------------------------------------------------------------
# launch configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the interpreter runs programs one at a
# time on the CPU, where a few small ones keep the tests quick

# forward and d_input: 128 x 128 output tiles over 64-wide K steps with 8 warps and a 3-deep pipeline, the shape of
# Triton's Hopper matmul tutorial; d_weight sums 64 rows per step into a 128 x 128 float32 tile of dW
GEMM_CONFIGS = {"fwd": (128, 128, 64, 8, 3), "dw": (64, 128, 128, 8, 3)}
FLOAT32_GEMM_CONFIG = {"fwd": (32, 32, 32, 4, 2), "dw": (32, 32, 32, 4, 2)}  # a checking path: IEEE on FMA units
INTERPRETER_GEMM_CONFIG = {"fwd": (16, 32, 32, 1, 1), "dw": (16, 32, 32, 1, 1)}
# router: 1024 (token, expert) scores per program, 8 per thread of 4 warps: 128 tokens at E = 8, 16 at E = 64
# (64 tokens at E = 64 spill, ptxas says). Permutation: 512 assignments per block (16 blocks for the
# 8x8B's 4096 tokens x top-2, so the one-program scan is short); the rank kernel's (512, 16) cumulative sum spills
# at 1024 x 8 warps (ptxas), not at 512 x 8. Gather/combine: 16 rows x 512 columns per step (8 warps x 8 bf16 x 8
# rows)
ROUTER_BLOCK, ROUTER_WARPS = 1024, 4
PERMUTE_BLOCK, PERMUTE_WARPS = 512, 8
ROW_CONFIG = (16, 512, 8)
INTERPRETER_ROW_CONFIG = (16, 64, 1)


def aot_specs():
    """What `bench.py --aot` compiles for H100: Tanuki-8x8B (d_model 4096, ffn 14336, E = 8, top-2), bf16."""
    from kernels.aot import spec
    ptrs = {"LOGITS": "fp32", "BIAS": "fp32", "EXPERTS": "i64", "GATES": "fp32", "PROBS": "fp32",
            "PARTIAL": "i32", "BLOCK_START": "i32", "OFFSETS": "i32", "POSITION": "i32", "SORTED": "i32",
            "SRC": "bf16", "DST": "bf16", "OUT": "bf16", "D_GATES": "fp32", "X": "bf16", "W": "bf16", "Y": "bf16",
            "TILE_EXPERT": "i32", "TILE_ROW": "i32", "DY": "bf16", "DW": "bf16"}
    small = ("n_experts", "capacity", "top_k", "n_blocks")
    out = [
        spec("moe_router", f"E8 top2 topk_softmax {ROUTER_BLOCK // 8} tokens w{ROUTER_WARPS}", _router, ptrs,
             {"K": 2, "MODE": 0, "HAS_BIAS": False, "BLOCK_T": ROUTER_BLOCK // 8, "BLOCK_E": 8}, ROUTER_WARPS, 1,
             matmul=False, small=small),
        # the largest router the kernel takes, in the renormalized mode with the balancing bias
        spec("moe_router", f"E64 top8 softmax_topk_renorm bias {ROUTER_BLOCK // 64} tokens w{ROUTER_WARPS}",
             _router, ptrs, {"K": 8, "MODE": 2, "HAS_BIAS": True, "BLOCK_T": ROUTER_BLOCK // 64, "BLOCK_E": 64},
             ROUTER_WARPS, 1, matmul=False, small=small),
        spec("moe_count", f"E8 {PERMUTE_BLOCK} assignments w{PERMUTE_WARPS}", _count, ptrs,
             {"BLOCK": PERMUTE_BLOCK, "BLOCK_E": 8}, PERMUTE_WARPS, 1, matmul=False, small=small),
        spec("moe_scan", "E8 w1", _scan, ptrs, {"BLOCK_E": 8}, 1, 1, matmul=False, small=small),
        spec("moe_rank", f"E8 {PERMUTE_BLOCK} assignments w{PERMUTE_WARPS}", _rank, ptrs,
             {"BLOCK": PERMUTE_BLOCK, "BLOCK_E": 8}, PERMUTE_WARPS, 1, matmul=False, small=small),
        spec("moe_gather", f"d4096 {ROW_CONFIG[0]}x{ROW_CONFIG[1]} w{ROW_CONFIG[2]}", _gather, ptrs,
             {"HAS_GATE": False, "BLOCK_M": ROW_CONFIG[0], "BLOCK_D": ROW_CONFIG[1]}, ROW_CONFIG[2], 1,
             matmul=False, small=small),
        spec("moe_gather_bwd", f"d4096 {ROW_CONFIG[0]}x{ROW_CONFIG[1]} w{ROW_CONFIG[2]}, gate grad", _gather, ptrs,
             {"HAS_GATE": True, "BLOCK_M": ROW_CONFIG[0], "BLOCK_D": ROW_CONFIG[1]}, ROW_CONFIG[2], 1,
             matmul=False, small=small),
        spec("moe_combine", f"d4096 top2 {ROW_CONFIG[0]}x{ROW_CONFIG[1]} w{ROW_CONFIG[2]}", _combine, ptrs,
             {"K": 2, "HAS_GATE": True, "BLOCK_T": ROW_CONFIG[0], "BLOCK_D": ROW_CONFIG[1]}, ROW_CONFIG[2], 1,
             matmul=False, small=small),
    ]
    block_m, block_n, block_k, warps, stages = GEMM_CONFIGS["fwd"]
    label = f"{block_m}x{block_n}x{block_k} w{warps} s{stages}"
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRECISION": "tf32"}
    # the forward (x W^T) reads W[e] (14336, 4096) along its rows, d_input (dy W) along its columns: one kernel,
    # two load layouts, so both are compiled. The contiguous stride is 1, which Triton's launcher turns into a
    # constant (it specializes integer arguments equal to 1), so it is one here too
    out.append(spec("moe_grouped_mm", f"x W^T {label}", _grouped_mm, ptrs, {**blocks, "stride_wk": 1}, warps,
                    stages, matmul=True, small=small))
    out.append(spec("moe_grouped_mm_dx", f"dy W {label}", _grouped_mm, ptrs, {**blocks, "stride_wn": 1}, warps,
                    stages, matmul=True, small=small))
    block_m, block_n, block_k, warps, stages = GEMM_CONFIGS["dw"]
    out.append(spec("moe_grouped_mm_dw", f"dy^T x {block_m} rows x {block_n}x{block_k} w{warps} s{stages}",
                    _grouped_mm_dw, ptrs, {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                           "PRECISION": "tf32"}, warps, stages, matmul=True, small=small))
    return out
