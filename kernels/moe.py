"""
The MoE layer of moe.py in Triton: the router's top-k, the permutation into expert order, the expert FFN on the
grouped GEMMs of kernels/moe_gemm.py, and the gated combine back into token order. Each kernel's plain-PyTorch
reference is moe.py itself (`route`, `sort_by_expert`, `expert_loop`); tests/test_moe_kernels.py compares them.

    router    one program per block of tokens: softmax over the E logits, k rounds of argmax over the selection
              scores (probs + bias), then the k gates in the routing mode. Forward only: the gates' gradient with
              respect to the logits is a few PyTorch ops on the saved indices (route_backward).
    permute   the N*k (token, expert) assignments, sorted by expert with token order kept inside an expert (a
              stable counting sort, the order moe.sort_by_expert's stable argsort gives):
                _count   each block of assignments counts its own per-expert histogram
                _scan    one program adds the histograms up in block order: each block's starting rank inside
                         every expert, and the experts' offsets (exclusive prefix sum of the kept counts)
                _rank    each assignment's rank inside its expert = its block's starting rank + a cumulative
                         sum inside the block; rank >= capacity drops it; otherwise its sorted position is
                         offset[expert] + rank
              Every value has exactly one writer: no atomics, so the result never depends on scheduling.
    FFN       forward: gate_up (x read through the sorted index, SwiGLU in the epilogue) -> down -> combine.
              backward: down_backward (dy read through the index; the combine's and SwiGLU's backward in the
              epilogue) -> the weight gradients and the gate/up products' d_input -> the gather's backward.
    combine   y[t] = sum_j gate[t, j] * out[position of (t, j)], one program per block of tokens, so each output
              row has one writer; without gates it is the gather's backward (dx from the rows' d_input).

The whole forward syncs nothing to the host: the sorted buffers have N*k rows whatever capacity drops (the dropped
assignments' rows sit past offsets[E], where no tile reaches), and the grid of each grouped GEMM is its upper bound
of tiles, cdiv(N*k, BLOCK_M) + E, the spare programs returning at once. Every product accumulates in float32 and
rounds to the input's dtype once.
"""

import torch
import triton
import triton.language as tl

from kernels import moe_gemm as gemm

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


# -----------------------------------------------------------------------------
# combine back into token order

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


def combine(src, position, top_k, gates=None):
    """src (N*k, d) in expert order -> (N, d): each token's k rows summed (times its gates (N, k) float32 if given),
    dropped assignments left out. With gates it is the layer's output, without it the gather's backward."""
    n_tokens, d = position.numel() // top_k, src.shape[1]
    dst = torch.empty(n_tokens, d, device=src.device, dtype=src.dtype)
    block_t, block_d, warps = ROW_CONFIG if src.is_cuda else INTERPRETER_ROW_CONFIG
    _combine[(triton.cdiv(n_tokens, block_t),)](src, dst, position, gates, n_tokens, d, K=top_k,
                                                HAS_GATE=gates is not None, BLOCK_T=block_t, BLOCK_D=block_d,
                                                num_warps=warps)
    return dst


# -----------------------------------------------------------------------------
# the whole expert FFN
#
# The gather into expert order is fused into the loads of the products that read token rows (gate_up reads
# x[token], down_backward dy[token], the weight gradients x[token] and gate * dy[token]): no (N*k, d) copy of x or
# dy in expert order is written, and none is kept for the backward. The combine is not fused into the down
# product's epilogue, nor its backward (summing dx) into the d_input product's: a token's k rows come from k
# different experts, i.e. different programs, so a fused epilogue would scatter-add with atomics into a float32
# buffer that must first be zeroed and then rounded to the output dtype: 4 + 8k + 6 bytes per token and column
# against the separate kernel's 2k + 2k + 2 (bf16, read back from L2 or HBM), and with k > 2 float atomics add in
# a different order on every run. The combine is one read of the products and one write of the tokens, ~1% of the
# layer's time at 8x8B's shapes; it stays a kernel of its own, deterministic.

def ffn_forward(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """moe.expert_sorted through the kernels: x (N, d) contiguous, experts (N, k), gates (N, k) float32, expert
    weights (E, f, d) and (E, d, f) -> y (N, d), then what ffn_backward needs: gu = [g | u] (N*k, 2f) in expert
    order and the permutation (position, sorted_assign, offsets) (nanotanuki::moe_ffn)."""
    top_k = experts.shape[1]
    position, sorted_assign, offsets = permute(experts, w_gate.shape[0], capacity)
    tiles = gemm.tile_map(offsets, sorted_assign.numel(), gemm.rows_per_tile(x))
    gu, h = gemm.gate_up(x, w_gate, w_up, sorted_assign, offsets, tiles, top_k)
    out = gemm.grouped_mm_input(h, w_down, offsets, tiles, False)                # (N*k, d), rows in expert order
    y = combine(out, position, top_k, gates.contiguous())
    return y, gu, position, sorted_assign, offsets


def ffn_backward(dy, x, gates, w_gate, w_up, w_down, gu, position, sorted_assign, offsets):
    """-> dx, d_gates, dw_gate, dw_up, dw_down (nanotanuki::moe_ffn_backward): the down product's backward with the
    combine's and SwiGLU's in its epilogue, then the three weight gradients and the gate and up products' d_input
    (one kernel for both), and the gather's backward (summing each token's rows)."""
    top_k, ffn = gates.shape[1], w_gate.shape[1]
    tiles = gemm.tile_map(offsets, sorted_assign.numel(), gemm.rows_per_tile(dy))
    gates = gates.contiguous()
    d_gu, h, d_gate_sorted = gemm.down_backward(dy, w_down, gu, gates, sorted_assign, offsets, tiles, top_k)
    d_gates = torch.where(position >= 0, d_gate_sorted[position.clamp(min=0)], 0).view_as(gates)
    dw_down = gemm.grouped_mm_weight(dy, h, offsets, w_down.dtype, sorted_assign=sorted_assign, top_k=top_k,
                                     a_gather=True, gates=gates)
    d_xs = gemm.grouped_mm_input(d_gu, w_gate, offsets, tiles, True, w2=w_up)     # (N*k, d) in expert order
    dw_gate, dw_up = gemm.grouped_mm_weight(d_gu, x, offsets, w_gate.dtype, split=ffn, sorted_assign=sorted_assign,
                                            top_k=top_k, b_gather=True)
    return combine(d_xs, position, top_k), d_gates, dw_gate, dw_up, dw_down


def moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """moe.expert_sorted through the kernels, differentiable through the custom op of kernels/__init__.py."""
    import kernels
    return kernels.moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)


# -----------------------------------------------------------------------------
# launch configurations of the routing kernels (the GEMMs' are in kernels/moe_gemm.py)

# router: 1024 (token, expert) scores per program, 8 per thread of 4 warps: 128 tokens at E = 8, 16 at E = 64
# (64 tokens at E = 64 spill, ptxas says). Permutation: 512 assignments per block (16 blocks for the
# 8x8B's 4096 tokens x top-2, so the one-program scan is short); the rank kernel's (512, 16) cumulative sum spills
# at 1024 x 8 warps (ptxas), not at 512 x 8. Combine: 16 rows x 512 columns per step (8 warps x 8 bf16 x 8 rows)
ROUTER_BLOCK, ROUTER_WARPS = 1024, 4
PERMUTE_BLOCK, PERMUTE_WARPS = 512, 8
ROW_CONFIG = (16, 512, 8)
INTERPRETER_ROW_CONFIG = (16, 64, 1)


def aot_specs():
    """What `bench.py --aot` compiles for H100: Tanuki-8x8B (d_model 4096, ffn 14336, E = 8, top-2), bf16."""
    from kernels.aot import spec
    ptrs = {"LOGITS": "fp32", "BIAS": "fp32", "EXPERTS": "i64", "GATES": "fp32", "PROBS": "fp32",
            "PARTIAL": "i32", "BLOCK_START": "i32", "OFFSETS": "i32", "POSITION": "i32", "SORTED": "i32",
            "SRC": "bf16", "DST": "bf16", "X": "bf16", "W_GATE": "bf16", "W_UP": "bf16", "W_DOWN": "bf16",
            "GU": "bf16", "H": "bf16", "A": "bf16", "B": "bf16", "B2": "bf16", "Y": "bf16", "DY": "bf16",
            "D_GU": "bf16", "D_GATE_PART": "fp32", "DW": "bf16", "DW2": "bf16", "TILE_EXPERT": "i32",
            "TILE_ROW": "i32"}
    small = ("n_experts", "capacity", "top_k", "n_blocks", "n_tiles")
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
        spec("moe_combine", f"d4096 top2 gated {ROW_CONFIG[0]}x{ROW_CONFIG[1]} w{ROW_CONFIG[2]}", _combine, ptrs,
             {"K": 2, "HAS_GATE": True, "BLOCK_T": ROW_CONFIG[0], "BLOCK_D": ROW_CONFIG[1]}, ROW_CONFIG[2], 1,
             matmul=False, small=small),
        spec("moe_combine_dx", f"d4096 top2 {ROW_CONFIG[0]}x{ROW_CONFIG[1]} w{ROW_CONFIG[2]}", _combine, ptrs,
             {"K": 2, "HAS_GATE": False, "BLOCK_T": ROW_CONFIG[0], "BLOCK_D": ROW_CONFIG[1]}, ROW_CONFIG[2], 1,
             matmul=False, small=small),
    ]
    return out + gemm.aot_specs(ptrs, small)
