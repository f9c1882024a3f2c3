"""
The grouped matrix multiplies of the MoE layer: every expert's product on its contiguous slice of the rows in expert
order, all experts in one launch. kernels/moe.py chains them into the layer's forward and backward; the reference
of each is a per-expert loop of F.linear (grouped_mm_reference, moe.expert_loop).

Rows are in expert order (kernels/moe.py's permutation): expert e owns sorted rows [offsets[e], offsets[e + 1]).
The row-tiled kernels run one program per (tile, column block), where a tile is BLOCK_M rows of one expert (a map
built from the offsets says which), so an expert with 3 rows costs one tile, not the largest expert's count.

    gate_up        g = x W_gate[e]^T and u = x W_up[e]^T from one pass over x (two accumulators), h = silu(g) u in
                   the epilogue. x is read through the sorted index (the gather into expert order is the load),
                   so the (N*k, d) copy of x in expert order is never written, nor kept for the backward.
    grouped_mm     y = a W[e]^T, or a W[e] with W's strides swapped (d_input); with TWO_B a holds [dg | du] and
                   y = dg W_gate[e] + du W_up[e]: the gate and up products' d_input in one pass.
    down_backward  p = dy[token] W_down[e], dy read through the index, and in the epilogue the combine's and the
                   SwiGLU's backward: the gate's gradient dy . out = (dy W_down) . h as per-column-block partial
                   sums (out is never kept), dh = gate p, du = dh silu(g), dg = dh u silu'(g), and h for dW_down.
    grouped_dw     dW[e] = a[rows of e]^T b[rows of e], either operand optionally read through the index (gate *
                   dy[token], x[token]); output rows past `split` go to a second tensor (dW_gate | dW_up from one
                   [dg | du] operand).

Program order and memory traffic (H100: 50 MB of L2, 132 SMs; Tanuki-8x8B: d 4096, ffn 14336, 8 experts, 4096
tokens x top-2 = 8192 rows, ~1024 per expert, bf16; |x rows| = |dy rows| = 8192 x 4096 x 2 B = 67 MB,
|dg| = |du| = |h| = 8192 x 14336 x 2 B = 235 MB, |W_gate| = |W_up| = |W_down| = 0.94 GB):
  row-tiled kernels: grouped ("GROUP_M") order. GROUP_M consecutive tiles take every column block before the next
      GROUP_M tiles start. The programs running at once are then GROUP_M tiles x a few dozen column blocks: a
      column block of W[e] is read from DRAM once per group, by the group's tiles side by side, and the group's
      rows (8 x 128 rows x 4096 x 2 B = 8 MB for gate_up) stay in L2 while the columns sweep. With GROUP_M = 8,
      about the tiles of one expert, each expert's weights are read once (twice where a group straddles two
      experts) and the rows once: gate_up ~ 1.9 GB of weights + 67 MB of x rows. In the plain order (tile fastest,
      column block slowest) the programs at once held every tile for a few column blocks, so the rows were read
      again for each few columns: x rows ~56 times (3.8 GB) for gate_up, [dg | du] ~8 times (3.8 GB) for d_input.
  grouped_dw: one program per (expert, output row block, output column block); expert slowest, and of the two
      operands, the narrower one's blocks fastest. The programs at once then hold a few blocks of the wide operand
      (each read from DRAM once, by the programs side by side) and every block of the narrow one, whose expert
      slice (~1024 rows x 4096 x 2 B = 8 MB) stays in L2 while the wide operand's blocks sweep (an expert that
      took every token would need 32 MB of it there: still under the 50 MB). Each dY tile is read ~once:
          dW_gate | dW_up  [dg | du] (470 MB) once + x rows (67 MB) once      = 0.54 GB
          dW_down          h (235 MB) once + gate * dy rows (67 MB) once      = 0.30 GB
      Before (expert fastest, then row block, column block slowest), the programs at once held one column block
      of every expert and row block, so the whole dY operand was read again for every column block: dg 32 times
      (4096 / 128) = 7.5 GB, du the same, and for dW_down dy 112 times (14336 / 128) = 7.5 GB: 22.5 GB per layer's
      backward where 0.84 GB now suffices.
Every product accumulates in float32 and rounds to the output's dtype once.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(TILE_EXPERT, TILE_ROW, n_tiles, n_out, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # this program's (expert, first row, column block) in grouped order; expert -1 for a spare tile
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(n_out, BLOCK_N)
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)  # the last group may be short
    tile = first + (pid % per_group) % size
    return tl.load(TILE_EXPERT + tile), tl.load(TILE_ROW + tile), (pid % per_group) // size


@triton.jit
def _mainloop(acc, a_rows, live, b_ptrs, cols, n_out, n_in, stride_bn, stride_bk,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # acc += a[rows, :n_in] @ B, a_rows the pointers to each row's first element, B (n_in, n_out) through strides
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + ks[None, :]
    b_ptrs = b_ptrs + cols[None, :] * stride_bn + ks[:, None] * stride_bk
    for k0 in range(0, n_in, BLOCK_K):
        a = tl.load(a_ptrs, mask=live[:, None] & (k0 + ks[None, :] < n_in), other=0.0)
        b = tl.load(b_ptrs, mask=(k0 + ks[:, None] < n_in) & (cols[None, :] < n_out), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gate_up(X, W_GATE, W_UP, GU, H, SORTED, TILE_EXPERT, TILE_ROW, OFFSETS, n_tiles, ffn, d, top_k,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
             PRECISION: tl.constexpr):
    # GU[p, :ffn] = g = x[token] W_gate[e]^T, GU[p, ffn:] = u = x[token] W_up[e]^T, H[p] = silu(g) u
    e, row, col_block = _tile(TILE_EXPERT, TILE_ROW, n_tiles, ffn, BLOCK_N, GROUP_M)
    if e < 0:  # one of the spare programs past the last real tile
        return
    rows = row + tl.arange(0, BLOCK_M)
    live = rows < tl.load(OFFSETS + e + 1)
    token = (tl.load(SORTED + rows, mask=live, other=0) // top_k).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + token[:, None] * d + ks[None, :]
    # W[e] is (ffn, d); the tile is read as (BLOCK_K, BLOCK_N) of its transpose
    w_offs = e.to(tl.int64) * ffn * d + cols[None, :] * d + ks[:, None]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        x = tl.load(x_ptrs, mask=live[:, None] & (k0 + ks[None, :] < d), other=0.0)
        w_mask = (k0 + ks[:, None] < d) & (cols[None, :] < ffn)
        acc_g = tl.dot(x, tl.load(W_GATE + w_offs, mask=w_mask, other=0.0).to(x.dtype), acc_g,
                       input_precision=PRECISION)
        acc_u = tl.dot(x, tl.load(W_UP + w_offs, mask=w_mask, other=0.0).to(x.dtype), acc_u,
                       input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_offs += BLOCK_K
    # SwiGLU on the rounded g and u: the values the backward reads back from GU
    g = acc_g.to(GU.dtype.element_ty)
    u = acc_u.to(GU.dtype.element_ty)
    mask = live[:, None] & (cols[None, :] < ffn)
    gu_ptrs = GU + rows.to(tl.int64)[:, None] * 2 * ffn + cols[None, :]
    tl.store(gu_ptrs, g, mask=mask)
    tl.store(gu_ptrs + ffn, u, mask=mask)
    g = g.to(tl.float32)
    h = g * tl.sigmoid(g) * u.to(tl.float32)
    tl.store(H + rows.to(tl.int64)[:, None] * ffn + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_mm(A, B, B2, Y, TILE_EXPERT, TILE_ROW, OFFSETS, n_tiles, n_out, n_in,
                stride_be, stride_bn, stride_bk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                TWO_B: tl.constexpr, PRECISION: tl.constexpr):
    # Y[rows, cols] = A[rows] B[e], B[e] read as (n_in, n_out) through its strides; with TWO_B, A has 2 * n_in
    # columns and Y = A[:, :n_in] B[e] + A[:, n_in:] B2[e]
    e, row, col_block = _tile(TILE_EXPERT, TILE_ROW, n_tiles, n_out, BLOCK_N, GROUP_M)
    if e < 0:
        return
    rows = row + tl.arange(0, BLOCK_M)
    live = rows < tl.load(OFFSETS + e + 1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    if TWO_B:
        a_rows = A + rows.to(tl.int64) * 2 * n_in
    else:
        a_rows = A + rows.to(tl.int64) * n_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(acc, a_rows, live, B + e.to(tl.int64) * stride_be, cols, n_out, n_in, stride_bn, stride_bk,
                    BLOCK_K, PRECISION)
    if TWO_B:
        acc = _mainloop(acc, a_rows + n_in, live, B2 + e.to(tl.int64) * stride_be, cols, n_out, n_in, stride_bn,
                        stride_bk, BLOCK_K, PRECISION)
    tl.store(Y + rows.to(tl.int64)[:, None] * n_out + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=live[:, None] & (cols[None, :] < n_out))


@triton.jit
def _down_backward(DY, W_DOWN, GU, GATES, D_GU, H, D_GATE_PART, SORTED, TILE_EXPERT, TILE_ROW, OFFSETS, n_tiles,
                   ffn, d, top_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    # p = dy[token] W_down[e] on this tile's rows and ffn columns, then the backward of out * gate and of SwiGLU:
    #   D_GATE_PART[p, column block] = sum over the block's columns of p * h  (dy . out = (dy W_down) . h)
    #   D_GU[p] = [dg | du] with dh = gate * p, du = dh silu(g), dg = dh u silu'(g);  H[p] = h
    e, row, col_block = _tile(TILE_EXPERT, TILE_ROW, n_tiles, ffn, BLOCK_N, GROUP_M)
    if e < 0:
        return
    rows = row + tl.arange(0, BLOCK_M)
    live = rows < tl.load(OFFSETS + e + 1)
    assignment = tl.load(SORTED + rows, mask=live, other=0)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # W_down[e] is (d, ffn): read as it is, (d, ffn) = (n_in, n_out)
    acc = _mainloop(acc, DY + (assignment // top_k).to(tl.int64) * d, live, W_DOWN + e.to(tl.int64) * d * ffn,
                    cols, ffn, d, 1, ffn, BLOCK_K, PRECISION)
    # the epilogue: one offset tensor serves [g | u] and [dg | du] (same layout), and silu'(g) = sig + silu (1 - sig)
    # is formed before the products so g and sig can die: with fewer values live it fits in registers (ptxas)
    mask = live[:, None] & (cols[None, :] < ffn)
    offs = rows.to(tl.int64)[:, None] * 2 * ffn + cols[None, :]
    g = tl.load(GU + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + offs + ffn, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    d_silu = sig + silu * (1 - sig)
    h = silu * u
    tl.store(H + rows.to(tl.int64)[:, None] * ffn + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    tl.store(D_GATE_PART + rows.to(tl.int64) * tl.cdiv(ffn, BLOCK_N) + col_block, tl.sum(acc * h, 1), mask=live)
    dh = acc * tl.load(GATES + assignment, mask=live, other=0.0)[:, None]
    tl.store(D_GU + offs, (dh * u * d_silu).to(D_GU.dtype.element_ty), mask=mask)
    tl.store(D_GU + offs + ffn, (dh * silu).to(D_GU.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_dw(A, B, DW, DW2, SORTED, GATES, OFFSETS, n_out, n_in, split, top_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, A_GATHER: tl.constexpr,
                B_GATHER: tl.constexpr, PRECISION: tl.constexpr):
    # DW[e][n, k] = sum over expert e's rows r of A[r, n] B[r, k]; A_GATHER: A's row r is gate * A[token], B_GATHER:
    # B's is B[token]. Rows n >= split land in DW2[e][n - split]. Programs: expert slowest, then the blocks of the
    # wider operand, the narrower operand's blocks fastest (see the top of the file)
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(n_in, BLOCK_K)
    n_blocks = tl.cdiv(n_out, BLOCK_N)
    e = pid // (n_blocks * k_blocks)
    rest = pid % (n_blocks * k_blocks)
    if n_out > n_in:
        n_block, k_block = rest // k_blocks, rest % k_blocks
    else:
        n_block, k_block = rest % n_blocks, rest // n_blocks
    cols_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        live = rows < end
        a_rows = rows.to(tl.int64)
        b_rows = rows.to(tl.int64)
        if A_GATHER:
            assignment = tl.load(SORTED + rows, mask=live, other=0)
            a_rows = (assignment // top_k).to(tl.int64)
        if B_GATHER:
            b_rows = (tl.load(SORTED + rows, mask=live, other=0) // top_k).to(tl.int64)
        a = tl.load(A + a_rows[:, None] * n_out + cols_n[None, :], mask=live[:, None] & (cols_n[None, :] < n_out),
                    other=0.0)
        if A_GATHER:  # gate * dy, rounded as the unfused combine's backward rounded it
            a = (a.to(tl.float32) * tl.load(GATES + assignment, mask=live, other=0.0)[:, None]).to(a.dtype)
        b = tl.load(B + b_rows[:, None] * n_in + cols_k[None, :], mask=live[:, None] & (cols_k[None, :] < n_in),
                    other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    acc = acc.to(DW.dtype.element_ty)
    k_ok = cols_k[None, :] < n_in
    first = cols_n[:, None] < split
    tl.store(DW + e.to(tl.int64) * split * n_in + cols_n[:, None] * n_in + cols_k[None, :], acc, mask=first & k_ok)
    second = (cols_n[:, None] - split).to(tl.int64)
    tl.store(DW2 + e.to(tl.int64) * (n_out - split) * n_in + second * n_in + cols_k[None, :], acc,
             mask=(cols_n[:, None] >= split) & (cols_n[:, None] < n_out) & k_ok)


# -----------------------------------------------------------------------------
# launches

def tile_map(offsets, n_rows, block_m):
    """Which expert and first row each BLOCK_M-row tile has: (expert (T,), row (T,)) int32 with
    T = cdiv(n_rows, block_m) + E, the most tiles E groups of n_rows rows can need; spare tiles get -1. Built on the
    device from the offsets (searchsorted over the running tile count), so nothing waits for the host."""
    E = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tiles = (counts + block_m - 1) // block_m                          # (E,) tiles per expert
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(n_rows, block_m) + E, device=offsets.device)
    expert = torch.searchsorted(ends, t, right=True)                   # E for the spare tiles
    e = expert.clamp(max=E - 1)
    row = offsets[e].long() + (t - (ends - tiles)[e]) * block_m
    return torch.where(expert < E, e, -1).int(), row.int()


def config(x, kernel):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M) of a kernel for x's device and dtype."""
    if x.device.type == "cpu":
        return INTERPRETER_CONFIG
    return FLOAT32_CONFIG if x.dtype == torch.float32 else CONFIGS[kernel]


def rows_per_tile(x):
    """BLOCK_M of the row-tiled kernels (one tile map serves all of them)."""
    return config(x, "grouped_mm")[0]


def precision(dtype):
    # float32 multiplies in IEEE float32 (not tf32) so the float32 path is a tight check; 16-bit products are exact
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid(tiles, n_out, block_n):
    return (tiles[0].numel() * triton.cdiv(n_out, block_n),)


def gate_up(x, w_gate, w_up, sorted_assign, offsets, tiles, top_k):
    """-> gu (N*k, 2 ffn) = [g | u] and h = silu(g) u (N*k, ffn), rows in expert order, x (N, d) in token order."""
    block_m, block_n, block_k, warps, stages, group = config(x, "gate_up")
    n_rows, (_, ffn, d) = sorted_assign.numel(), w_gate.shape
    gu = torch.empty(n_rows, 2 * ffn, device=x.device, dtype=x.dtype)
    h = torch.empty(n_rows, ffn, device=x.device, dtype=x.dtype)
    _gate_up[_grid(tiles, ffn, block_n)](
        x, w_gate.contiguous(), w_up.contiguous(), gu, h, sorted_assign, *tiles, offsets, tiles[0].numel(), ffn, d,
        top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group, PRECISION=precision(x.dtype),
        num_warps=warps, num_stages=stages)
    return gu, h


def grouped_mm_input(a, w, offsets, tiles, transposed, w2=None):
    """a (M, K) in expert order @ w[e]^T per group, w (E, N, K); with `transposed`, a @ w[e], w read as (E, K, N).
    With w2 (transposed only): a (M, 2K) = [a1 | a2] -> a1 @ w[e] + a2 @ w2[e]. Rows past offsets[E] are left
    unset: nothing reads them."""
    block_m, block_n, block_k, warps, stages, group = config(a, "dx" if transposed else "grouped_mm")
    _, p, q = w.shape
    n_out, n_in = (q, p) if transposed else (p, q)
    w = w.contiguous()
    s_e, s_p, s_q = w.stride()
    y = torch.empty(a.shape[0], n_out, device=a.device, dtype=a.dtype)
    _grouped_mm[_grid(tiles, n_out, block_n)](
        a, w, w if w2 is None else w2.contiguous(), y, *tiles, offsets, tiles[0].numel(), n_out, n_in, s_e,
        *((s_q, s_p) if transposed else (s_p, s_q)), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group, TWO_B=w2 is not None, PRECISION=precision(a.dtype), num_warps=warps, num_stages=stages)
    return y


def down_backward(dy, w_down, gu, gates, sorted_assign, offsets, tiles, top_k):
    """-> d_gu (N*k, 2 ffn) = [dg | du], h (N*k, ffn), and each sorted row's gate gradient (N*k,) float32 (rows
    past the kept ones unset). gates (N*k,) float32 in assignment order."""
    block_m, block_n, block_k, warps, stages, group = config(dy, "down_backward")
    n_rows, (_, d, ffn) = gu.shape[0], w_down.shape
    d_gu = torch.empty_like(gu)
    h = torch.empty(n_rows, ffn, device=dy.device, dtype=dy.dtype)
    # one partial sum per (row, column block), added up below in a fixed order: no atomics
    part = torch.empty(n_rows, triton.cdiv(ffn, block_n), device=dy.device, dtype=torch.float32)
    _down_backward[_grid(tiles, ffn, block_n)](
        dy, w_down.contiguous(), gu, gates, d_gu, h, part, sorted_assign, *tiles, offsets, tiles[0].numel(), ffn, d,
        top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group, PRECISION=precision(dy.dtype),
        num_warps=warps, num_stages=stages)
    return d_gu, h, part.sum(1)


def grouped_mm_weight(a, b, offsets, dtype, split=None, sorted_assign=None, top_k=1, a_gather=False,
                      b_gather=False, gates=None):
    """dW (E, N, K) with dW[e] = a[rows of e]^T b[rows of e], a (M, N), b (M, K); or (dW[:, :split], dW[:, split:])
    as two contiguous tensors. a_gather: a's row r is gates[sorted_assign[r]] * a[sorted_assign[r] // top_k]
    (a in token order); b_gather: b's is b[sorted_assign[r] // top_k]. Zero for an expert without rows."""
    block_m, block_n, block_k, warps, stages, _ = config(b, "dw")
    E, n_out, n_in = offsets.numel() - 1, a.shape[1], b.shape[1]
    split = n_out if split is None else split
    dw = torch.empty(E, split, n_in, device=b.device, dtype=dtype)
    # without a split nothing lands in the second tensor, and an empty one has no address to pass
    dw2 = torch.empty(E, n_out - split, n_in, device=b.device, dtype=dtype) if split < n_out else dw
    index = offsets if sorted_assign is None else sorted_assign  # never read without a gather
    _grouped_dw[(E * triton.cdiv(n_out, block_n) * triton.cdiv(n_in, block_k),)](
        a, b, dw, dw2, index, gates, offsets, n_out, n_in, split, top_k, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, A_GATHER=a_gather, B_GATHER=b_gather, PRECISION=precision(b.dtype), num_warps=warps,
        num_stages=stages)
    return dw if split == n_out else (dw, dw2)


class GroupedMM(torch.autograd.Function):
    """y = x[rows of e] @ w[e]^T for every expert e; x (M, K) contiguous in expert order, w (E, N, K)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        x = x.contiguous()
        tiles = tile_map(offsets, x.shape[0], rows_per_tile(x))
        ctx.save_for_backward(x, w, offsets, *tiles)
        return grouped_mm_input(x, w, offsets, tiles, False)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, *tiles = ctx.saved_tensors
        dy = dy.contiguous()
        return (grouped_mm_input(dy, w, offsets, tiles, True), grouped_mm_weight(dy, x, offsets, w.dtype), None)


def grouped_mm(x, w, offsets):
    """The grouped GEMM alone, differentiable (rows past offsets[E] are left unset)."""
    return GroupedMM.apply(x, w, offsets)


def grouped_mm_reference(x, w, offsets):
    """The per-expert loop: the same product, one F.linear per expert (rows past offsets[E] are zero)."""
    y = x.new_zeros(x.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        y[bounds[e]:bounds[e + 1]] = torch.nn.functional.linear(x[bounds[e]:bounds[e + 1]], w[e])
    return y


# -----------------------------------------------------------------------------
# launch configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M; dw has no GROUP_M: its order is
# fixed, above); the interpreter runs programs one at a time on the CPU, where a few small ones keep the tests quick
# (GROUP_M 2 leaves a short last group)

# 128 x 128 output tiles over 64-wide K steps with 8 warps and a 3-deep pipeline, the shape of Triton's Hopper
# matmul tutorial. gate_up holds two accumulators and down_backward's epilogue holds g, u and their sigmoid beside
# its accumulator: 128 x 64 each keeps them in registers (ptxas spills down_backward at 128 x 128). dw sums 64 rows
# per step into a 128 x 128 tile. The row-tiled kernels share BLOCK_M (one tile map serves them all). GROUP_M 8:
# 8 tiles of 128 rows is the ~1024 rows an expert gets at 8x8B's shapes.
CONFIGS = {"gate_up": (128, 64, 64, 8, 3, 8), "grouped_mm": (128, 128, 64, 8, 3, 8), "dx": (128, 128, 64, 8, 3, 8),
           "down_backward": (128, 64, 64, 8, 3, 8), "dw": (64, 128, 128, 8, 3, None)}
FLOAT32_CONFIG = (32, 32, 32, 4, 2, 8)  # a checking path: IEEE float32 on the FMA units
INTERPRETER_CONFIG = (16, 32, 32, 1, 1, 2)


def aot_specs(ptrs, small):
    """The GEMMs at Tanuki-8x8B's shapes in bf16 (kernels/moe.py's aot_specs adds them to the rest)."""
    from kernels.aot import spec

    def label(kernel, what):
        block_m, block_n, block_k, warps, stages, group = CONFIGS[kernel]
        order = "narrow operand fastest" if kernel == "dw" else f"group {group}"
        return f"{what} {block_m}x{block_n}x{block_k} w{warps} s{stages} {order}"

    def blocks(kernel, **extra):
        block_m, block_n, block_k, _, _, group = CONFIGS[kernel]
        out = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRECISION": "tf32", **extra}
        return out if kernel == "dw" else {**out, "GROUP_M": group}

    def one(name, kernel, what, fn, **extra):
        warps, stages = CONFIGS[kernel][3:5]
        return spec(name, label(kernel, what), fn, ptrs, blocks(kernel, **extra), warps, stages, matmul=True,
                    small=small)

    # a weight read as W^T along its rows has a contiguous stride of 1, which Triton's launcher turns into a
    # constant (it specializes integer arguments equal to 1), so it is one here too; read as W, the other one is
    return [
        one("moe_gate_up", "gate_up", "x[token] [W_gate|W_up]^T, SwiGLU epilogue", _gate_up),
        one("moe_grouped_mm", "grouped_mm", "h W_down^T", _grouped_mm, TWO_B=False, stride_bk=1),
        one("moe_grouped_mm_dx", "dx", "dy W", _grouped_mm, TWO_B=False, stride_bn=1),
        one("moe_gate_up_dx", "dx", "dg W_gate + du W_up", _grouped_mm, TWO_B=True, stride_bn=1),
        one("moe_down_backward", "down_backward", "dy[token] W_down, SwiGLU backward epilogue", _down_backward),
        one("moe_grouped_mm_dw", "dw", "dy^T x", _grouped_dw, A_GATHER=False, B_GATHER=False),
        one("moe_down_dw", "dw", "(gate dy[token])^T h", _grouped_dw, A_GATHER=True, B_GATHER=False),
        one("moe_gate_up_dw", "dw", "[dg|du]^T x[token]", _grouped_dw, A_GATHER=False, B_GATHER=True),
    ]
