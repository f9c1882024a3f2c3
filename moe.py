"""
The Mixture-of-Experts FFN of Tanuki-8x8B (docs/recipe.md "Upcycling 8B to 8x8B"): 8 SwiGLU experts, each token
sent to the top 2, their outputs summed with the router's gates. model.py uses `MoE` in place of `SwiGLU` when
`n_experts > 0`.

    x (N tokens, d) -> router (float32) -> top-k experts + gates per token
      -> sort the N*k (token, expert) assignments by expert -> one SwiGLU per expert on its contiguous slice
         (all experts in one grouped matrix multiply) -> weight by the gates and add back into token order

Experts are stacked weights, w_gate/w_up (E, ffn_hidden, d) and w_down (E, d, ffn_hidden), laid out as nn.Linear's
(out, in) so that expert e of an upcycled model is literally the dense FFN's matrices (upcycle.py), and so that a
grouped matrix multiply can run all experts in one kernel (kernels/, issue "kernels").

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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


def balance_loss(probs, experts, n_experts):
    """Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i with f_i the fraction of the N*k
    assignments that went to expert i and P_i the mean router probability of expert i. 1.0 when uniform.
    f is counted, not differentiable; the gradient reaches the router through P."""
    f = expert_counts(experts, n_experts).float() / experts.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


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
# grouped matrix multiply: every expert's product on its contiguous slice of the sorted rows, in one call.
# torch._grouped_mm does exactly this, but torch.compile's shape rules for it (its meta function) accept only
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


def expert_sorted(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """Dropless (unless `capacity` is set) dispatch: sort the N*k assignments by expert so that each expert's
    tokens are one contiguous slice, run all experts at once with a grouped GEMM, and add the gated outputs back
    by token. Every shape is fixed by N, k and E alone, never by the routing (torch.compile traces it whole):
    capacity does not remove the dropped assignments, it zeroes their gates, which gives the same output and
    the same gradients (a dropped row's product is multiplied by 0; its gate's gradient is 0)."""
    if kernels.use_triton(x):  # on CUDA: kernels/moe.py, whose reference is the rest of this function
        return kernels.moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)
    N, k = experts.shape
    E = w_gate.size(0)
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
    # ---- on CUDA kernels/moe.py does this part too (dispatched above), with its own grouped GEMM that skips the
    # dropped rows
    xs = x[token]                                           # (N*k, d) in expert order
    ends = ends.int()
    h = F.silu(grouped_mm(xs, w_gate, ends)) * grouped_mm(xs, w_up, ends)
    out = grouped_mm(h, w_down, ends) * gate[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.n_experts, cfg.d_model, cfg.ffn_hidden
        self.n_experts, self.top_k = E, cfg.moe_top_k
        self.mode, self.capacity_factor = cfg.moe_router, cfg.moe_capacity_factor
        self.router = nn.Linear(d, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, f, d))
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))
        # auxiliary-loss-free balancing (DeepSeek-V3): a selection bias that is state, not a learned weight; it is
        # saved with the model so a resumed or exported run routes as the trained one did
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)  # since the last bias update
        self.use_bias = cfg.moe_bias_update_rate > 0
        self.dispatch = expert_sorted
        self.aux_loss = self.z_loss = None
        self.stats = {}

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (N, d)
        logits = F.linear(x.float(), self.router.weight.float())       # (N, E) the router runs in float32
        experts, gates, probs = route(logits, self.top_k, self.mode, self.expert_bias if self.use_bias else None)
        capacity = None
        if self.capacity_factor > 0:  # GShard/Switch: each expert takes at most cf * its fair share of N*k
            capacity = math.ceil(self.capacity_factor * x.size(0) * self.top_k / self.n_experts)
        y = self.dispatch(x, experts, gates, self.w_gate, self.w_up, self.w_down, capacity)
        aux_loss, z_loss = balance_loss(probs, experts, self.n_experts), router_z_loss(logits)
        # activation checkpointing reruns this forward inside the backward; losses recorded by the rerun would keep
        # its whole graph (and everything it saved) alive until the next forward: ~1.4 GiB per layer at 8x8B and
        # micro-batch 6 (bench.py --simulate). Only the real forward records them. (Compiled, the check is skipped:
        # the rerun is inside the compiled backward and records nothing.)
        record = torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1
        if record:
            self.aux_loss, self.z_loss = aux_loss, z_loss
        with torch.no_grad():  # kept as tensors: turning them into numbers here would sync the GPU every layer
            counts = expert_counts(experts, self.n_experts).float()
            if self.training and record:  # counted once per forward, not again by the rerun
                self.tokens_per_expert += counts
            load = counts / experts.numel()
            kept = counts.sum() if capacity is None else counts.clamp(max=capacity).sum()
            self.stats = {
                "aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach(), "expert_load": load,
                "load_max": load.max(), "load_min": load.min(),
                # mean entropy of the router's distribution: log(E) = undecided, 0 = one expert per token
                "router_entropy": -(probs * probs.clamp(min=1e-20).log()).sum(-1).mean(),
                "dropped": experts.numel() - kept,
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
