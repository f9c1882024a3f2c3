"""
The Mixture-of-Experts FFN of Tanuki-8x8B (docs/recipe.md "Upcycling 8B to 8x8B"): 8 SwiGLU experts, each token
sent to the top 2, their outputs summed with the router's gates. model.py uses `MoE` in place of `SwiGLU` when
`n_experts > 0`.

    x (N tokens, d) -> router (float32) -> top-k experts + gates per token
      -> sort the N*k (token, expert) assignments by expert -> one SwiGLU per expert on its contiguous slice
         -> weight by the gates and add back into token order

Experts are stacked weights, w_gate/w_up (E, ffn_hidden, d) and w_down (E, d, ffn_hidden), laid out as nn.Linear's
(out, in) so that expert e of an upcycled model is literally the dense FFN's matrices (upcycle.py), and so that a
grouped matrix multiply can run all experts in one kernel. Three implementations of the sorted dispatch, equal to
the plain loop `expert_loop` (tests/test_moe.py, tests/test_moe_kernels.py):
  CUDA (default)        kernels/moe.py: a grouped GEMM for gate and up with SwiGLU in its epilogue, x read through
                        the sorted index, the backward's SwiGLU and combine in the epilogue of the down product's
  CPU (default)         `_moe_experts` below: expert by expert, by hand, forward and backward, the fastest here
  NANOTANUKI_MOE_GEMM=grouped_mm   torch._grouped_mm for every product, on any device, to compare against

Routing modes (`moe_router`):
  topk_softmax          softmax over the top-k logits only: the gates sum to 1 (Mixtral)
  softmax_topk          softmax over all experts, then keep the top k: the gates sum to less than 1 (Switch, GShard)
  softmax_topk_renorm   as softmax_topk, then the k gates divided by their sum: the combined expert outputs are
                        normalized, which is what Tanuki did when combining experts. (Mathematically equal to
                        topk_softmax; both exist because checkpoints and papers name them differently.)
Load balancing: the Switch Transformer loss E * sum_i f_i * P_i (1.0 when balanced, the value Tanuki's balance
loss stayed at), the ST-MoE router z-loss mean(logsumexp(logits)^2) (coefficient 0 by default: Tanuki dropped it
because with the normalization it made the grad norm erratic), and optionally DeepSeek-V3's auxiliary-loss-free
balancing: a per-expert bias added to the scores for selection only, nudged toward balance after each step.
"""

import math
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import kernels

ROUTER_MODES = ("topk_softmax", "softmax_topk", "softmax_topk_renorm")


def route(logits, top_k, mode, bias=None):
    """logits (N, E) float32 -> (experts (N, k) ids, gates (N, k), probs (N, E) softmax over all experts).
    `bias` (E,) shifts the scores that pick the experts, never the gates (auxiliary-loss-free balancing)."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"unknown moe_router '{mode}': use one of {ROUTER_MODES}")
    if kernels.use_triton(logits):  # on CUDA one fused kernel does all of the below (kernels/moe.py)
        return kernels.moe_route(logits, top_k, mode, bias)
    probs = logits.softmax(dim=-1)
    # softmax is monotonic, so picking on probs picks the same experts as on logits; the bias is added to probs
    # because that is the scale DeepSeek-V3's update step is tuned for (affinity scores in [0, 1])
    scores = probs if bias is None else probs + bias
    experts = scores.topk(top_k, dim=-1).indices
    if mode == "topk_softmax":
        gates = logits.gather(-1, experts).softmax(dim=-1)
    else:
        gates = probs.gather(-1, experts)
        if mode == "softmax_topk_renorm":
            gates = gates / gates.sum(dim=-1, keepdim=True)
    return experts, gates, probs


def expert_counts(experts, n_experts):
    """(E,) int64: how many of the N*k assignments went to each expert. A bincount of static length: torch.bincount's
    output size depends on the data, which torch.compile cannot trace without a graph break."""
    flat = experts.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(probs, counts):
    """Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i with f_i the fraction of the N*k
    assignments that went to expert i (counts (E,): expert_counts) and P_i the mean router probability of expert i
    (probs (N, E)). 1.0 when uniform. f is counted, not differentiable; the gradient reaches the router through P.
    With expert parallelism the counts are the group's and P this rank's: the mean over ranks of this loss, which
    data parallelism's gradient averaging takes, is the loss of the group's tokens as one batch."""
    f = counts.float() / counts.sum()
    return probs.size(1) * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits):
    """ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return logits.logsumexp(dim=-1).square().mean()


def swiglu(x, w_gate, w_up, w_down):
    # one expert: the same SwiGLU as model.py's dense FFN, on weights stored as (out, in)
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def expert_loop(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """The reference: for each expert, the tokens that chose it, in token order (the first `capacity` of them if
    set). Plain and slow; the sorted path below must equal it."""
    y = torch.zeros_like(x)
    for e in range(w_gate.size(0)):
        token, slot = torch.where(experts == e)  # row-major: token order
        if capacity is not None:
            token, slot = token[:capacity], slot[:capacity]
        out = swiglu(x[token], w_gate[e], w_up[e], w_down[e])
        y.index_add_(0, token, out * gates[token, slot, None].to(x.dtype))
    return y


# -----------------------------------------------------------------------------
# sorted dispatch: the N*k (token, expert) assignments sorted by expert, so that each expert's rows are one slice

GEMM_BACKENDS = ("auto", "grouped_mm")


def gemm_backend():
    """NANOTANUKI_MOE_GEMM picks what multiplies the experts' matrices: "auto" (unset) is the Triton kernels for CUDA
    tensors (kernels/moe.py) and the per-expert PyTorch path below elsewhere, the fastest on each; "grouped_mm" is
    torch._grouped_mm for every expert product, on any device (kept to compare against: CPU in any float dtype,
    CUDA in bf16 from sm90). Read at every call, like NANOTANUKI_KERNELS, so a test can switch it."""
    choice = os.environ.get("NANOTANUKI_MOE_GEMM", "auto")
    if choice not in GEMM_BACKENDS:
        raise ValueError(f"NANOTANUKI_MOE_GEMM={choice}: use one of {GEMM_BACKENDS}, or leave it unset")
    return choice


def expert_sorted(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """Dropless (unless `capacity` is set: each expert keeps its first `capacity` assignments in token order)
    dispatch: sort the N*k assignments by expert so that each expert's tokens are one contiguous slice, run every
    expert's SwiGLU on its slice, and add the gated outputs back by token. Equal to expert_loop, gradients
    included. Each implementation is one opaque custom op (or ops of fixed output shapes), so torch.compile traces
    the layer whole whatever the routing."""
    if gemm_backend() == "grouped_mm":
        return expert_grouped_mm(x, experts, gates, w_gate, w_up, w_down, capacity)
    if kernels.use_triton(x):  # on CUDA: kernels/moe.py
        return kernels.moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)
    return _moe_experts(x.contiguous(), experts, gates, w_gate, w_up, w_down, capacity)[0]


def sort_by_expert(experts, n_experts, capacity=None):
    """experts (N, k) -> (position (N*k,) int32: each assignment's row in expert order, -1 if dropped;
    sorted_assign (N*k,) int32: the assignment at each row, -1 past the kept rows; offsets (E + 1,) int32: expert e
    owns rows [offsets[e], offsets[e + 1])). A stable sort keeps token order inside an expert, so capacity keeps
    the first tokens. The reference of kernels/moe.py's counting sort (`permute`), which returns the same."""
    flat = experts.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(experts, n_experts)
    if capacity is not None:
        rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
        order, counts = order[rank < capacity], counts.clamp(max=capacity)
    position = torch.full((n,), -1, dtype=torch.int32, device=flat.device)
    position[order] = torch.arange(order.numel(), dtype=torch.int32, device=flat.device)
    sorted_assign = torch.full((n,), -1, dtype=torch.int32, device=flat.device)
    sorted_assign[:order.numel()] = order.int()
    return position, sorted_assign, F.pad(torch.cumsum(counts, 0), (1, 0)).int()


# -----------------------------------------------------------------------------
# The per-expert path, written out by hand, forward and backward. On a CPU the layer's time is its nine matrix
# products per expert (three forward, six backward) plus whatever passes over memory surround them; this path
# makes those passes few and cache-sized:
#   - one expert at a time, so each elementwise step (SwiGLU, its backward, the gate scaling) runs on an expert's
#     ~n/E rows right after the product that made them, while they are still in cache, rather than streaming
#     (N*k, ffn) tensors through memory between whole-batch products
#   - products write into row slices of preallocated buffers (torch.mm(out=)), never into column slices: MKL runs
#     ~8% slower writing or reading a strided half of a [g | u] buffer (measured), so g and u, dg and du are
#     separate contiguous tensors. Each is under glibc's 32 MiB mmap ceiling at this benchmark's shapes, so after
#     the first step its memory comes back from the heap instead of being mapped and zeroed by the OS again
#   - the gather into expert order is an index_select per expert; the combine is one index_select of the products
#     (dropped assignments read a zero row) and one batched (1 x k) @ (k x d) per token; its backward sums the k
#     rows read in (k, N) order (a sum over a leading dimension: contiguous adds)
#   - nothing is recomputed except h = silu(g) u, and nothing is saved twice: g, u and the unscaled products
#     (for the gates' gradient) are the op's extra outputs
# The expert boundaries are read on the host (one .tolist()), hidden inside the custom op: torch.compile sees one
# node of known output shapes.

def _sorted_rows(position, n_rows):
    # each assignment's row in expert order, and for a dropped one the zero row at n_rows
    return torch.where(position >= 0, position, n_rows)


@torch.library.custom_op("nanotanuki::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                 w_up: torch.Tensor, w_down: torch.Tensor, capacity: Optional[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """-> y (N, d), then for the backward: g, u (N*k, f) and out (N*k + 1, d, the last row zero) in expert order,
    and the permutation (position, sorted_assign, offsets)."""
    N, k = experts.shape
    E, f, d = w_gate.shape
    position, sorted_assign, offsets = sort_by_expert(experts, E, capacity)
    bounds = offsets.tolist()
    token = sorted_assign // k
    g, u = x.new_empty(N * k, f), x.new_empty(N * k, f)
    out = x.new_empty(N * k + 1, d)
    out[-1] = 0
    h = x.new_empty(max(b - a for a, b in zip(bounds, bounds[1:])), f)
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        xs = x.index_select(0, token[a:b])
        torch.mm(xs, w_gate[e].t(), out=g[a:b])
        torch.mm(xs, w_up[e].t(), out=u[a:b])
        torch.mul(F.silu(g[a:b]), u[a:b], out=h[:b - a])
        torch.mm(h[:b - a], w_down[e].t(), out=out[a:b])
    picked = out.index_select(0, _sorted_rows(position, N * k)).view(N, k, d)
    y = torch.bmm(gates.to(x.dtype).view(N, 1, k), picked).view(N, d)
    return y, g, u, out, position, sorted_assign, offsets


@_moe_experts.register_fake
def _(x, experts, gates, w_gate, w_up, w_down, capacity):
    (N, d), rows, f = x.shape, experts.numel(), w_gate.shape[1]
    index = experts.new_empty(rows, dtype=torch.int32)
    return (x.new_empty(N, d), x.new_empty(rows, f), x.new_empty(rows, f), x.new_empty(rows + 1, d), index,
            torch.empty_like(index), index.new_empty(w_gate.shape[0] + 1))


@torch.library.custom_op("nanotanuki::moe_experts_backward", mutates_args=())
def _moe_experts_backward(dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                          w_up: torch.Tensor, w_down: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                          out: torch.Tensor,
                          position: torch.Tensor, sorted_assign: torch.Tensor, offsets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx, d_gates, dw_gate, dw_up, dw_down: per expert, the chain rule of y = gate * (silu(g) u) W_down^T with
    g, u = x W_gate^T, x W_up^T, on the expert's rows while they are in cache."""
    N, k = gates.shape
    E, f, d = w_gate.shape
    bounds = offsets.tolist()
    token = sorted_assign // k
    gate = gates.reshape(-1).to(x.dtype)[sorted_assign.clamp(min=0)]          # each sorted row's gate
    d_xs, d_gate = x.new_empty(N * k + 1, d), x.new_empty(N * k + 1)           # + the zero row, as in the forward
    d_xs[-1], d_gate[-1] = 0, 0
    dw_gate, dw_up, dw_down = torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)
    most = max(b - a for a, b in zip(bounds, bounds[1:]))
    silu, h, dg, du = (x.new_empty(most, f) for _ in range(4))  # one expert's rows at a time
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if a == b:  # no rows: no gradient
            dw_gate[e], dw_up[e], dw_down[e] = 0, 0, 0
            continue
        n, ge, ue = b - a, g[a:b], u[a:b]
        d_out = dy.index_select(0, token[a:b])
        torch.linalg.vecdot(d_out, out[a:b], out=d_gate[a:b])                 # d gate = dy . out
        d_out.mul_(gate[a:b, None])                                            # d out = gate dy
        torch.ops.aten.silu.out(ge, out=silu[:n])
        torch.mul(silu[:n], ue, out=h[:n])
        torch.mm(d_out.t(), h[:n], out=dw_down[e])
        dh = torch.mm(d_out, w_down[e], out=h[:n])                             # h is no longer needed
        torch.mul(dh, silu[:n], out=du[:n])
        torch.ops.aten.silu_backward.grad_input(dh.mul_(ue), ge, grad_input=dg[:n])  # dg = dh u silu'(g)
        xs = x.index_select(0, token[a:b])
        torch.mm(dg[:n].t(), xs, out=dw_gate[e])
        torch.mm(du[:n].t(), xs, out=dw_up[e])
        torch.mm(dg[:n], w_gate[e], out=d_xs[a:b]).addmm_(du[:n], w_up[e])
    rows = _sorted_rows(position, N * k)
    dx = d_xs.index_select(0, rows.view(N, k).t().reshape(-1)).view(k, N, d).sum(0)
    return dx, d_gate.index_select(0, rows).view(N, k).to(gates.dtype), dw_gate, dw_up, dw_down


@_moe_experts_backward.register_fake
def _(dy, x, gates, w_gate, w_up, w_down, g, u, out, position, sorted_assign, offsets):
    return (torch.empty_like(x), torch.empty_like(gates), torch.empty_like(w_gate), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _moe_experts_setup(ctx, inputs, output):
    x, _, gates, w_gate, w_up, w_down, _ = inputs
    ctx.save_for_backward(x, gates, w_gate, w_up, w_down, *output[1:])
    ctx.set_materialize_grads(False)  # the extra outputs never get a gradient: no zero tensors made for them


def _moe_experts_grad(ctx, dy, *_):
    dx, d_gates, dw_gate, dw_up, dw_down = _moe_experts_backward(dy.contiguous(), *ctx.saved_tensors)
    return dx, None, d_gates, dw_gate, dw_up, dw_down, None


_moe_experts.register_autograd(_moe_experts_grad, setup_context=_moe_experts_setup)


# -----------------------------------------------------------------------------
# the torch._grouped_mm backend (NANOTANUKI_MOE_GEMM=grouped_mm): every expert's product on its contiguous slice of
# the sorted rows, in one call. torch.compile's shape rules for torch._grouped_mm (its meta function) accept only
# bfloat16 (PyTorch 2.13), and the CPU runs in float32. So it is wrapped as an opaque custom op: the compiler sees
# one node of known output shape and never looks inside, whatever the dtype. Its name starts with "nanotanuki.",
# which common.py's selective activation checkpointing keeps as a product's output.

def _grouped_mm_fits(*tensors):
    # torch._grouped_mm runs on the CPU in any float dtype and on CUDA in bf16 from sm90 (Hopper), with every
    # stride and start address a multiple of 16 bytes; anything else takes the per-expert loop
    def device_ok(t):
        return t.device.type == "cpu" or (t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)
                                          >= (9, 0))
    return all(device_ok(t) and t.data_ptr() % 16 == 0 and all(s == 1 or s * t.element_size() % 16 == 0
                                                                for s in t.stride()) for t in tensors)


@torch.library.custom_op("nanotanuki::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (M, K) sorted by expert, w (E, N, K), ends (E,) int32 with ends[E - 1] = M -> (M, N): x[rows of e] @ w[e]^T."""
    wt = w.transpose(-2, -1)
    if _grouped_mm_fits(x, wt):
        return torch._grouped_mm(x, wt, offs=ends)
    y, start = x.new_empty(x.shape[0], w.shape[1]), 0
    for e, end in enumerate(ends.tolist()):  # the reference: one product per expert (a host sync, hidden in here)
        y[start:end] = F.linear(x[start:end], w[e])
        start = end
    return y


@torch.library.custom_op("nanotanuki::grouped_mm_weight", mutates_args=())
def grouped_mm_weight(dy: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The weight gradient: dw (E, N, K) with dw[e] = dy[rows of e]^T x[rows of e]; zero for an expert without rows."""
    if _grouped_mm_fits(dy.t(), x):
        return torch._grouped_mm(dy.t(), x, offs=ends)
    dw, start = x.new_zeros(ends.shape[0], dy.shape[1], x.shape[1]), 0
    for e, end in enumerate(ends.tolist()):
        dw[e] = dy[start:end].t() @ x[start:end]
        start = end
    return dw


@grouped_mm.register_fake
def _(x, w, ends):
    return x.new_empty(x.shape[0], w.shape[1])


@grouped_mm_weight.register_fake
def _(dy, x, ends):
    return x.new_empty(ends.shape[0], dy.shape[1], x.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy):
    x, w, ends = ctx.saved_tensors
    dy = dy.contiguous()
    # dx = dy @ w[e] per group: the same op on w read as (E, K, N)
    return grouped_mm(dy, w.transpose(-2, -1), ends), grouped_mm_weight(dy, x, ends), None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def expert_grouped_mm(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """expert_sorted on torch._grouped_mm. Every shape is fixed by N, k and E alone, never by the routing:
    capacity does not remove the dropped assignments, it zeroes their gates, which gives the same output and the
    same gradients (a dropped row's product is multiplied by 0; its gate's gradient is 0)."""
    N, k = experts.shape
    E, f = w_gate.shape[:2]
    flat = experts.reshape(-1)                              # (N*k,) expert of each assignment
    order = torch.argsort(flat, stable=True)                # grouped by expert, token order kept inside a group
    counts = expert_counts(experts, E)                      # (E,) tokens per expert
    ends = torch.cumsum(counts, 0)                          # expert e owns sorted rows [ends[e-1], ends[e])
    gate = gates.reshape(-1)[order]                         # (N*k,) in expert order
    if capacity is not None:
        # rank of each sorted assignment inside its expert's group: the first `capacity` in token order stay
        rank = torch.arange(N * k, device=x.device) - (ends - counts)[flat[order]]
        gate = torch.where(rank < capacity, gate, 0)
    token = order // k                                      # which token each sorted assignment belongs to
    ends = ends.int()
    # gate and up as one product: the two weights side by side along ffn (one copy of them per call)
    gu = grouped_mm(x[token], torch.cat((w_gate, w_up), 1), ends)
    out = grouped_mm(F.silu(gu[:, :f]) * gu[:, f:], w_down, ends) * gate[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


# -----------------------------------------------------------------------------
# expert parallelism: the E experts split over the ranks of a process group (common.shard_model builds it from
# expert_parallel), rank r of the group holding experts [r * E_local, (r + 1) * E_local). Each token's rows travel
# to the ranks that hold its experts and back:
#
#   every rank's per-expert counts gathered (each rank learns what every peer sends to each of its experts, and
#   the group's load for the balance statistics) -> sort the N*k assignments by expert, drop those past capacity
#   -> all_to_all the rows -> the local experts through expert_sorted -> all_to_all the outputs back -> gate and
#   add into token order
#
# Both row exchanges are autograd collectives: the backward is the same exchange with the splits swapped, so dx
# comes home and each local expert's weight gradient sums the rows of every rank, as data parallelism would.

def gather_counts(counts, group):
    """(ep, E): expert_counts of every rank of `group`, row r from group rank r. One small all-gather per layer."""
    out = counts.new_empty(dist.get_world_size(group) * counts.numel())  # flat: gloo wants the input's shape
    dist.all_gather_single(out, counts, group=group)
    return out.view(-1, counts.numel())


def kept_counts(all_counts, capacity):
    """(ep, E) how many of its assignments to each expert every rank sends. With a capacity, expert e keeps its first
    `capacity` assignments over the group, rank 0's tokens first, then rank 1's, ...: the rows expert_loop keeps
    when the group's tokens are one batch in rank order."""
    if capacity is None:
        return all_counts
    before = torch.cumsum(all_counts, 0) - all_counts     # assignments to each expert from lower ranks
    return (capacity - before).clamp(min=0).minimum(all_counts)


def host_splits(keep, me, E_local):
    """The exchange's sizes as host integers (all_to_all's splits are lists): rows this rank sends to each peer,
    rows it receives from each, and (ep * E_local,) how many rows each peer sends to each local expert. The one host
    sync of a layer's forward; simulate.py, which has no real counts, replaces it with balanced ones."""
    keep = keep.tolist()  # one copy to the host, the rest in Python on (ep, E) numbers
    ep, mine = len(keep), slice(me * E_local, (me + 1) * E_local)
    send = [sum(keep[me][p * E_local:(p + 1) * E_local]) for p in range(ep)]
    per_expert = [n for row in keep for n in row[mine]]
    return send, [sum(row[mine]) for row in keep], per_expert


def expert_parallel_ffn(x, experts, gates, w_gate, w_up, w_down, group, capacity=None, all_counts=None):
    """expert_sorted with the experts spread over `group`, the expert-parallel process group: x (N, d), experts
    (N, k) global ids and gates (N, k) as for expert_sorted; w_gate/w_up (E_local, f, d) and w_down (E_local, d, f)
    this rank's experts. Every rank of the group must call it, each with its own tokens (N may differ). Equal to
    expert_loop over all E experts on the group's tokens in rank order (capacity counted over the group, see
    kept_counts), each rank getting its own tokens' outputs, with the weight gradients summed over the group.
    all_counts: gather_counts of this layer's routing, when the caller has it already (MoE.forward)."""
    ep, me = dist.get_world_size(group), dist.get_rank(group)
    E_local, k = w_gate.size(0), experts.size(1)
    E = E_local * ep
    flat = experts.reshape(-1)
    if all_counts is None:
        all_counts = gather_counts(expert_counts(experts, E), group)
    keep = kept_counts(all_counts, capacity)
    send_splits, recv_splits, per_expert = host_splits(keep, me, E_local)
    order = torch.argsort(flat, stable=True)           # assignments by expert, so each peer's rows are one slice
    if capacity is not None:  # drop each expert's assignments past what it keeps of this rank's (token order)
        rank_in_expert = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(all_counts[me], 0)
                                                                        - all_counts[me])[flat[order]]
        dropped = rank_in_expert >= keep[me][flat[order]]
        # the kept first, still by expert and token: a sort rather than a mask, so every shape is known on the host
        order = order[torch.argsort(dropped.int(), stable=True)[:sum(send_splits)]]
    token = order // k
    rows = funcol.wait_tensor(funcol.all_to_all_single_autograd(x[token], recv_splits, send_splits, group))
    # rows arrive peer by peer, each peer's sorted by expert: the local expert of each row, from the counts.
    # expert_sorted reorders them by expert and puts its outputs back in arrival order (k = 1, gate 1: the real
    # gates are applied at home, where their gradient belongs)
    local = torch.arange(E_local, device=x.device).repeat(ep).repeat_interleave(
        torch.tensor(per_expert, device=x.device), output_size=rows.size(0))
    out = expert_sorted(rows, local[:, None], rows.new_ones(rows.size(0), 1), w_gate, w_up, w_down)
    out = funcol.wait_tensor(funcol.all_to_all_single_autograd(out, send_splits, recv_splits, group))
    gate = gates.reshape(-1)[order]
    return torch.zeros_like(x).index_add_(0, token, out * gate[:, None].to(x.dtype))


class Router(nn.Linear):
    """The router: a bias-free nn.Linear (d -> E) that computes in float32 whatever its weight's and input's dtype
    (a bf16 model's routing decisions would otherwise flip on rounding). Its own class only for that forward."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.n_experts, cfg.d_model, cfg.ffn_hidden
        self.n_experts, self.top_k = E, cfg.moe_top_k
        self.mode, self.capacity_factor = cfg.moe_router, cfg.moe_capacity_factor
        self.router = Router(d, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, f, d))
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))
        # auxiliary-loss-free balancing (DeepSeek-V3): a selection bias that is state, not a learned weight; it is
        # saved with the model so a resumed or exported run routes as the trained one did
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)  # since the last bias update
        self.use_bias = cfg.moe_bias_update_rate > 0
        self.dispatch = expert_sorted
        # expert parallelism: the process group over which the experts are split (common.shard_model sets it, and
        # makes w_gate/w_up/w_down DTensors of this rank's experts); None: every rank holds all experts
        self.ep_group = None
        self.aux_loss = self.z_loss = None
        self.stats = {}

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (N, d)
        logits = self.router(x)                                        # (N, E) in float32
        experts, gates, probs = route(logits, self.top_k, self.mode, self.expert_bias if self.use_bias else None)
        local_counts = expert_counts(experts, self.n_experts)
        # with expert parallelism, the group's tokens count as one batch: the capacity, the balance loss's load f
        # and the logged statistics are over every rank of the group, as if one rank ran them all (tests compare
        # a 2-rank run with one rank's). Without it, over this rank's tokens.
        all_counts = None if self.ep_group is None else gather_counts(local_counts, self.ep_group)
        counts = local_counts if all_counts is None else all_counts.sum(0)
        capacity = None
        if self.capacity_factor > 0:  # GShard/Switch: each expert takes at most cf * its fair share of N*k
            if all_counts is None:
                capacity = math.ceil(x.size(0) * self.top_k * self.capacity_factor / self.n_experts)
            else:  # the same number in the same float64 arithmetic, left on the device: no host sync here (the
                # exchange's sizes are the layer's one, moe.host_splits)
                capacity = torch.ceil(all_counts.sum().double() * self.capacity_factor / self.n_experts).long()
        if self.ep_group is None:
            y = self.dispatch(x, experts, gates, self.w_gate, self.w_up, self.w_down, capacity)
        else:  # under FSDP the gathered experts are DTensors over the expert-parallel mesh: this rank's share
            y = expert_parallel_ffn(x, experts, gates, *(w.to_local() if isinstance(w, DTensor) else w
                                                         for w in (self.w_gate, self.w_up, self.w_down)),
                                    self.ep_group, capacity, all_counts)
        aux_loss, z_loss = balance_loss(probs, counts), router_z_loss(logits)
        # activation checkpointing reruns this forward inside the backward; losses recorded by the rerun would keep
        # its whole graph (and everything it saved) alive until the next forward: ~1.4 GiB per layer at 8x8B and
        # micro-batch 6 (simulate.py). Only the real forward records them. (Compiled, the check is skipped:
        # the rerun is inside the compiled backward and records nothing.)
        record = torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1
        if record:
            self.aux_loss, self.z_loss = aux_loss, z_loss
        with torch.no_grad():  # kept as tensors: turning them into numbers here would sync the GPU every layer
            if self.training and record:  # counted once per forward, not again by the rerun; summed over all ranks
                self.tokens_per_expert += local_counts  # by update_expert_bias
            counts = counts.float()
            load = counts / counts.sum()
            kept = counts.sum() if capacity is None else counts.clamp(max=capacity).sum()
            self.stats = {
                "aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach(), "expert_load": load,
                "load_max": load.max(), "load_min": load.min(),
                # mean entropy of the router's distribution: log(E) = undecided, 0 = one expert per token
                "router_entropy": -(probs * probs.clamp(min=1e-20).log()).sum(-1).mean(),
                "dropped": counts.sum() - kept,
            }
        return y.reshape(shape)


@torch.no_grad()
def update_expert_bias(model, rate):
    """DeepSeek-V3's auxiliary-loss-free balancing, called once per optimizer step: raise the selection bias of
    experts that got fewer than their share of tokens since the last call, lower the others', by `rate`
    (their gamma = 0.001). Counts are summed over data-parallel ranks so every rank keeps the same bias."""
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        counts = layer.tokens_per_expert
        if dist.is_initialized():
            dist.all_reduce(counts)
        layer.expert_bias += rate * torch.sign(counts.mean() - counts)
        counts.zero_()


def moe_stats(model):
    """Routing statistics of the last forward, for the training log: {layer index: {name: number or list}}."""
    return {i: {k: v.tolist() for k, v in block.ffn.stats.items()}
            for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoE) and block.ffn.stats}
