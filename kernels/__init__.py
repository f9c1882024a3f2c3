"""
Triton kernels, each beside the plain-PyTorch reference of the same function
(docs/design.md "Running without a GPU"):

    attention.py      flash attention, forward + backward, causal, grouped-query, packed documents (doc_ids)
    rmsnorm.py        fused RMSNorm, forward + backward
    cross_entropy.py  chunked fused lm_head + cross-entropy (no (tokens, vocab) logits)
    moe.py            MoE routing: fused router top-k, permutation into expert order, combine; the expert FFN
    moe_gemm.py       the MoE's grouped GEMMs (gate+up with SwiGLU, down, their backward, weight gradients)
    aot.py            compile all of them for H100 without a GPU; `python bench.py --aot` prints the report
    bench.py          each kernel's FLOPs and fewest bytes, and on a GPU its time against PyTorch (`python bench.py`)

Which implementation runs: the Triton kernels for CUDA tensors, PyTorch elsewhere. NANOTANUKI_KERNELS=torch forces
PyTorch everywhere (to rule the kernels out when a run misbehaves); NANOTANUKI_KERNELS=triton forces the kernels
on CPU tensors too, which works only under TRITON_INTERPRET=1 (Triton's interpreter, for the tests). The variable
is read at every call, so a test can switch it.

The kernel modules are imported on first use: a CPU run that never uses them never imports Triton.

Each entry point the model calls is a custom op, nanotanuki::<name>, with its backward a second op. A launch picks
its grid on the host (and MoE's reads sizes from the data), which torch.compile cannot trace: as custom ops the
compiler sees one node each, of output shapes given by the register_fake functions below (no Triton needed to
trace), and compiles whole blocks with fullgraph=True around them. The "nanotanuki." prefix is also what common.py's
selective activation checkpointing keeps as a product's output. The ops return what their backward needs (the
attention's log-sum-exp, RMSNorm's 1/rms, the MoE's expert-order buffers) as extra outputs, so nothing is hidden in
Python state; the kernel modules' `forward` / `backward` functions do the work, unchanged.
"""

import os
from typing import Optional

import torch
from torch import Tensor


def use_triton(tensor):
    """Whether the Triton kernels handle this tensor (see the module docstring)."""
    choice = os.environ.get("NANOTANUKI_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"NANOTANUKI_KERNELS={choice}: use triton, torch, or leave it unset")
    if choice == "torch":
        return False
    if choice == "triton" and tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("NANOTANUKI_KERNELS=triton on a CPU needs TRITON_INTERPRET=1 set before triton is "
                           "imported (Triton's interpreter runs the kernels on the CPU)")
    return choice == "triton" or tensor.device.type == "cuda"


# -----------------------------------------------------------------------------
# flash attention (attention.py)

@torch.library.custom_op("nanotanuki::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                     doc_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    from kernels.attention import forward
    return forward(q, k, v, causal, doc_ids)


@_flash_attention.register_fake
def _(q, k, v, causal, doc_ids):
    B, H, T, D = q.shape  # O is a (B, H, T, D) view of a (B, T, H, D) buffer, as attention.forward allocates it
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanotanuki::flash_attention_backward", mutates_args=())
def _flash_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                              doc_ids: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.attention import backward
    return backward(do, q, k, v, o, lse, causal, doc_ids)


@_flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, causal, doc_ids):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention_setup(ctx, inputs, output):
    q, k, v, causal, doc_ids = inputs
    ctx.save_for_backward(q, k, v, *output, doc_ids)
    ctx.causal = causal


def _flash_attention_grad(ctx, do, _):
    *saved, doc_ids = ctx.saved_tensors
    return *_flash_attention_backward(do, *saved, ctx.causal, doc_ids), None, None


_flash_attention.register_autograd(_flash_attention_grad, setup_context=_flash_attention_setup)


def flash_attention(q, k, v, causal=True, doc_ids=None):
    """q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, T, head_dim) -> (B, n_head, T, head_dim). doc_ids: (B, T)
    integer ids for sequences packed from several documents, each run of equal consecutive ids one document: a
    query sees only keys of its own (document_attention below computes the same on the CPU)."""
    return _flash_attention(q, k, v, causal, doc_ids)[0]


def document_starts(doc_ids):
    """(B, T) -> (B, T): the position where each token's document begins. A document is a run of equal consecutive
    ids (an id that comes back later starts a new document). The model's positions restart there; the kernels'
    bounds (attention.document_bounds) are these and the same taken from the other end."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(starts, t, 0).cummax(dim=1).values


def document_attention(q, k, v, doc_ids, causal=True):
    """flash_attention's document masking in plain PyTorch (SDPA a chunk of queries at a time), for the CPU."""
    from kernels.attention import document_attention
    return document_attention(q, k, v, doc_ids, causal)


# -----------------------------------------------------------------------------
# RMSNorm (rmsnorm.py)

@torch.library.custom_op("nanotanuki::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from kernels.rmsnorm import forward
    return forward(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


@torch.library.custom_op("nanotanuki::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    from kernels.rmsnorm import backward
    return backward(dy, x, weight, rstd)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _):
    return *_rms_norm_backward(dy, *ctx.saved_tensors), None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def rms_norm(x, weight, eps):
    return _rms_norm(x, weight, eps)[0]


# -----------------------------------------------------------------------------
# lm_head + cross-entropy (cross_entropy.py). Its forward computes the gradients too (chunk by chunk, while each
# chunk's logits exist); the backward only scales them by the incoming gradient, plain PyTorch, so it needs no op

@torch.library.custom_op("nanotanuki::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, chunk: int,
                          needs_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.cross_entropy import forward
    return forward(x, weight, targets, weights, chunk, needs_grad)


@_linear_cross_entropy.register_fake
def _(x, weight, targets, weights, chunk, needs_grad):
    # without gradients dx and dW are empty: a custom op cannot return None
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape if needs_grad else (0,)),
            weight.new_empty(weight.shape if needs_grad else (0,)))


def _linear_cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _linear_cross_entropy_grad(ctx, grad_loss, *_):
    # the saved gradients scaled in place and handed over: no second weight-sized buffer per micro-batch (autograd
    # adds this one into .grad, or adopts it as .grad on the first)
    from kernels.cross_entropy import backward
    return *backward(*ctx.saved_tensors, grad_loss), None, None, None, None


_linear_cross_entropy.register_autograd(_linear_cross_entropy_grad, setup_context=_linear_cross_entropy_setup)


def linear_cross_entropy(x, weight, targets, loss_mask=None, chunk=None):
    """x: (..., d_model), weight: (vocab, d_model), targets: (...) with -1 ignored, loss_mask: (...) or None.
    Returns the mean loss over the tokens that count, as model.py's forward computes it from full logits."""
    from kernels.cross_entropy import CHUNK, token_weights
    x = x.reshape(-1, x.shape[-1])
    targets = targets.reshape(-1)
    weights = token_weights(targets, None if loss_mask is None else loss_mask.reshape(-1))
    # the op's forward runs under no autograd, so whether gradients are wanted is decided out here
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _linear_cross_entropy(x, weight, targets, weights, chunk or CHUNK, needs_grad)[0]


# Per-token losses for per-row sums (DPO): the backward makes each chunk's logits again (cross_entropy.py)

@torch.library.custom_op("nanotanuki::linear_cross_entropy_rows", mutates_args=())
def _linear_cross_entropy_rows(x: Tensor, weight: Tensor, targets: Tensor, chunk: int, use_kernel: bool) -> Tensor:
    from kernels.cross_entropy import rows_forward
    return rows_forward(x, weight, targets, chunk, use_kernel)


@_linear_cross_entropy_rows.register_fake
def _(x, weight, targets, chunk, use_kernel):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("nanotanuki::linear_cross_entropy_rows_backward", mutates_args=())
def _linear_cross_entropy_rows_backward(x: Tensor, weight: Tensor, targets: Tensor, grad: Tensor, chunk: int,
                                        use_kernel: bool) -> tuple[Tensor, Tensor]:
    from kernels.cross_entropy import rows_backward
    return rows_backward(x, weight, targets, grad, chunk, use_kernel)


@_linear_cross_entropy_rows_backward.register_fake
def _(x, weight, targets, grad, chunk, use_kernel):
    return torch.empty_like(x), torch.empty_like(weight)


def _linear_cross_entropy_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.chunk, ctx.use_kernel = inputs[3], inputs[4]


def _linear_cross_entropy_rows_grad(ctx, grad):
    x, weight, targets = ctx.saved_tensors
    dx, dw = _linear_cross_entropy_rows_backward(x, weight, targets, grad, ctx.chunk, ctx.use_kernel)
    return dx, dw, None, None, None


_linear_cross_entropy_rows.register_autograd(_linear_cross_entropy_rows_grad,
                                             setup_context=_linear_cross_entropy_rows_setup)


def linear_cross_entropy_per_row(x, weight, targets, loss_mask=None, chunk=None):
    """x: (B, T, d_model), weight: (vocab, d_model), targets: (B, T) with -1 ignored, loss_mask: (B, T) or None.
    Returns each row's summed loss over the tokens that count (B,), float32, as from full logits, without them: only
    the counted tokens go through the lm_head, `chunk` at a time (on CPU 2^24 logits a chunk: 256 tokens at a
    65,536 vocab, 64 MiB)."""
    from kernels.cross_entropy import CHUNK, token_weights
    B = targets.shape[0]
    counted = token_weights(targets, loss_mask).reshape(-1) > 0
    rows = torch.arange(B, device=x.device).repeat_interleave(targets.shape[1])[counted]
    use_kernel = use_triton(x)
    chunk = chunk or (CHUNK if use_kernel else max(1, 2**24 // weight.shape[0]))
    losses = _linear_cross_entropy_rows(x.reshape(-1, x.shape[-1])[counted], weight, targets.reshape(-1)[counted],
                                        chunk, use_kernel)
    return torch.zeros(B, device=x.device, dtype=torch.float32).index_add(0, rows, losses)


# -----------------------------------------------------------------------------
# MoE routing (moe.py). The router's backward is a few PyTorch ops on the saved indices, no kernel: the compiler
# traces it like any other code

@torch.library.custom_op("nanotanuki::moe_route", mutates_args=())
def _moe_route(logits: Tensor, bias: Optional[Tensor], top_k: int, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.moe import route_forward
    return route_forward(logits, bias, top_k, mode)


@_moe_route.register_fake
def _(logits, bias, top_k, mode):
    N, E = logits.shape
    return (logits.new_empty(N, top_k, dtype=torch.int64), logits.new_empty(N, top_k), logits.new_empty(N, E))


def _moe_route_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)
    ctx.mode = inputs[3]


def _moe_route_grad(ctx, _, d_gates, d_probs):
    from kernels.moe import route_backward
    return route_backward(d_gates, d_probs, *ctx.saved_tensors, ctx.mode), None, None, None


_moe_route.register_autograd(_moe_route_grad, setup_context=_moe_route_setup)


def moe_route(logits, top_k, mode, bias=None):
    """moe.route through the fused kernel: (experts, gates, probs)."""
    return _moe_route(logits, bias, top_k, mode)


# -----------------------------------------------------------------------------
# the MoE experts (moe.py's expert_sorted)

@torch.library.custom_op("nanotanuki::moe_ffn", mutates_args=())
def _moe_ffn(x: Tensor, experts: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
             capacity: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from kernels.moe import ffn_forward
    return ffn_forward(x, experts, gates, w_gate, w_up, w_down, capacity)


@_moe_ffn.register_fake
def _(x, experts, gates, w_gate, w_up, w_down, capacity):
    # y, then what the backward needs: the gate and up products [g | u] in expert order (N*k rows whatever
    # capacity drops), each assignment's row, each row's assignment, the experts' row offsets. x itself is read
    # again by the backward (through the index), so no copy of it in expert order is kept
    (N, d), rows, f = x.shape, experts.numel(), w_gate.shape[1]
    index = experts.new_empty(rows, dtype=torch.int32)
    return (x.new_empty(N, d), x.new_empty(rows, 2 * f), index, torch.empty_like(index),
            index.new_empty(w_gate.shape[0] + 1))


@torch.library.custom_op("nanotanuki::moe_ffn_backward", mutates_args=())
def _moe_ffn_backward(dy: Tensor, x: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                      gu: Tensor, position: Tensor, sorted_assign: Tensor,
                      offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from kernels.moe import ffn_backward
    return ffn_backward(dy, x, gates, w_gate, w_up, w_down, gu, position, sorted_assign, offsets)


@_moe_ffn_backward.register_fake
def _(dy, x, gates, w_gate, w_up, w_down, gu, position, sorted_assign, offsets):
    return (torch.empty_like(dy), torch.empty_like(gates), torch.empty_like(w_gate), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _moe_ffn_setup(ctx, inputs, output):
    x, _, gates, w_gate, w_up, w_down, _ = inputs
    ctx.save_for_backward(x, gates, w_gate, w_up, w_down, *output[1:])
    # the extra outputs are for the backward only and never get a gradient: no zero tensors made for them
    # (448 MiB per 4096 tokens at 8x8B)
    ctx.set_materialize_grads(False)


def _moe_ffn_grad(ctx, dy, *_):
    dx, d_gates, dw_gate, dw_up, dw_down = _moe_ffn_backward(dy.contiguous(), *ctx.saved_tensors)
    return dx, None, d_gates, dw_gate, dw_up, dw_down, None


_moe_ffn.register_autograd(_moe_ffn_grad, setup_context=_moe_ffn_setup)


def moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    """moe.expert_sorted through the kernels: x (N, d), experts/gates (N, k), expert weights (E, f, d) and
    (E, d, f) -> y (N, d). The gates are combined in float32 (kernels/moe.py's combine)."""
    return _moe_ffn(x.contiguous(), experts, gates.to(torch.float32), w_gate, w_up, w_down, capacity)[0]
