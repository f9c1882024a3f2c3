"""
Chunked fused linear + cross-entropy: the language-model loss without the (tokens, vocab) logits
(the approach of Liger-Kernel's FusedLinearCrossEntropy: Hsu et al. 2024, "Liger Kernel").

At Tanuki-8B's vocab of 65,536, the float32 logits of a 4 x 4096-token micro-batch are 4 GiB, and autograd keeps
them, plus their gradient of the same size: the largest activation of the whole model. Instead, the tokens are taken
`chunk` at a time:

    logits_c = x_c W^T                         (chunk, vocab), in x's dtype, by the usual matmul (cuBLAS on CUDA)
    Triton, one program per row:  L = logsumexp(logits_c[i]) (online over vocab blocks, in float32);
                                  loss_i = L - logits_c[i, t_i];  then, in place,
                                  logits_c[i] <- (softmax(logits_c[i]) - onehot(t_i)) * w_i / sum(w)
    dx_c = dlogits_c W,   dW += dlogits_c^T x_c

so only one chunk of logits ever exists, and it is overwritten by its own gradient. The gradients are computed in
the forward (the loss is a scalar, so its backward only scales them by the incoming gradient, in place: `backward`);
a call that needs no gradient skips them. w_i is the per-token weight: 0 for ignored targets (-1) and for tokens the
loss mask drops, and the loss is sum_i w_i loss_i / max(sum_i w_i, 1), model.py's definition. The Triton kernel only
reads and writes rows (the products are cuBLAS's), so it needs no tensor cores; it is memory-bound at 3 passes over
each logit row.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows(LOGITS, TARGETS, WEIGHTS, LOSS, INV_TOTAL, stride_row, n_cols,
             COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 at 32k tokens of a 65,536 vocab
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK)
    target = tl.load(TARGETS + row)
    weight = tl.load(WEIGHTS + row).to(tl.float32)
    # pass 1: running max and sum of exponentials over the vocab, BLOCK columns at a time
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        z = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # lanes past the vocab's end have seen only -inf: subtract 0 there, as exp(-inf - -inf) would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    # an ignored target (-1) has weight 0; clamp it to a valid column so the load stays in bounds
    target_logit = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
    tl.store(LOSS + row, lse - target_logit)
    if COMPUTE_GRAD:
        # pass 2: overwrite the row with its gradient (softmax - onehot) * w / sum(w)
        scale = weight * tl.load(INV_TOTAL)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            z = tl.load(base + offs, mask=offs < n_cols, other=0.0)
            grad = (tl.exp(z.to(tl.float32) - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(base + offs, grad.to(z.dtype), mask=offs < n_cols)


# 8 warps x 8 bf16 per thread and 16-byte loads: one 2048-column block per step, 32 steps over a 65,536 vocab
BLOCK_V = 2048
NUM_WARPS = 8
# production chunk: 2048 tokens x 65,536 vocab in bf16 = 256 MiB of logits at a time, against 4 GiB of float32
# logits (and 4 GiB of their gradient) for an unfused 16k-token micro-batch; large enough that each chunk's
# products keep the tensor cores busy
CHUNK = 2048


def token_weights(targets, loss_mask=None):
    """1 where a target counts: not ignored (-1) and, with a loss mask, inside it (model.py's convention)."""
    weights = (targets != -1).float()
    return weights if loss_mask is None else weights * loss_mask.float()


def forward(x, weight, targets, weights, chunk, needs_grad):
    """x (N, d), weight (vocab, d), targets and weights (N,) -> the loss, and its gradients dx, dW (empty without
    needs_grad), all computed here while each chunk's logits exist (nanotanuki::linear_cross_entropy)."""
    n_tokens = x.shape[0]
    # the normalizer is known before any chunk, so each chunk's gradient is final when written. It stays on
    # the device (the kernel loads it): no host sync
    inv_total = 1.0 / weights.sum().clamp(min=1)
    losses = torch.empty(n_tokens, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if needs_grad else x.new_empty(0)
    # dW in the weight's dtype, the gradient autograd would have made: float32 would cost another 1 GiB at 8B. Not
    # zeroed: the first chunk's product is written over it, which saves a pass over 512 MiB at 8B
    dw = torch.empty_like(weight) if needs_grad else weight.new_empty(0)
    if needs_grad and n_tokens == 0:
        dw.zero_()
    block = min(BLOCK_V, triton.next_power_of_2(weight.shape[0]))
    for start in range(0, n_tokens, chunk):
        x_c = x[start : start + chunk]
        logits = x_c @ weight.T  # (chunk, vocab): the only logits alive at any time
        _ce_rows[(x_c.shape[0],)](logits, targets[start : start + chunk], weights[start : start + chunk],
                                  losses[start : start + chunk], inv_total, logits.stride(0), logits.shape[1],
                                  COMPUTE_GRAD=needs_grad, BLOCK=block, num_warps=NUM_WARPS)
        if needs_grad:  # `logits` now holds d loss / d logits
            torch.mm(logits, weight, out=dx[start : start + chunk])
            # the matmul accumulates in float32 and adds dW in float32 before rounding: one rounding per chunk
            if start == 0:
                torch.mm(logits.T, x_c, out=dw)
            else:
                dw.addmm_(logits.T, x_c)
    return (losses * weights).sum() * inv_total, dx, dw


def backward(dx, dw, grad_loss):
    """The loss's backward (nanotanuki::linear_cross_entropy's): the forward's dx and dW times the incoming gradient,
    in place, so the backward makes no second weight-sized buffer (`dw * grad` made one every micro-batch). Autograd
    then adds the returned dW into the weight's existing .grad in place (under gradient accumulation, every
    micro-batch after the first), or adopts this buffer as the .grad when there is none, and torch.autograd.grad
    returns it without touching .grad.

    Accumulating into .grad already in the forward would skip the forward's buffer too, but the incoming gradient
    (train.py's 1 / grad_accum, or any weight a caller puts on the loss) is known only here, and a backward that wrote
    .grad itself would bypass autograd (torch.autograd.grad, hooks, FSDP's reduction of the gradient it returns).
    Scaling the saved tensors in place bumps their version, so a second backward through the same graph
    (retain_graph=True) fails with autograd's in-place error instead of returning twice-scaled gradients."""
    dx.mul_(grad_loss.to(dx.dtype))
    dw.mul_(grad_loss.to(dw.dtype))
    return dx, dw


# -----------------------------------------------------------------------------
# Per-token losses (DPO's per-sequence log-probs). The incoming gradient differs token by token, so the gradient
# cannot be made in the forward as above (it is not known yet): the forward keeps no logits, and the backward makes
# each chunk's logits again and lets the same row kernel turn them into their gradient, with the incoming gradient as
# the per-token weight and 1 as the normalizer. One more (chunk, vocab) product than an unfused backward, the price
# activation checkpointing pays; on CPU the same chunks run in PyTorch.


def rows_forward(x, weight, targets, chunk, use_kernel):
    """x (N, d), weight (vocab, d), targets (N,) all valid -> each token's loss -log p(target), float32 (N,)."""
    losses = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    block = min(BLOCK_V, triton.next_power_of_2(weight.shape[0]))
    for start in range(0, x.shape[0], chunk):
        logits = x[start : start + chunk] @ weight.T  # (chunk, vocab)
        t = targets[start : start + chunk]
        if use_kernel:  # weights and normalizer are read only for the gradient: ones
            ones = torch.ones(logits.shape[0], device=x.device, dtype=torch.float32)
            _ce_rows[(logits.shape[0],)](logits, t, ones, losses[start : start + chunk], ones, logits.stride(0),
                                         logits.shape[1], COMPUTE_GRAD=False, BLOCK=block, num_warps=NUM_WARPS)
        else:
            logits = logits.float()
            losses[start : start + chunk] = logits.logsumexp(-1) - logits.gather(1, t[:, None]).squeeze(1)
    return losses


def rows_backward(x, weight, targets, grad, chunk, use_kernel):
    """The gradients (dx, dW) of sum_i grad_i * loss_i, the chunks' logits made again one chunk at a time."""
    dx, dw = torch.empty_like(x), torch.zeros_like(weight)
    grad = grad.float().contiguous()
    one = torch.ones((), device=x.device, dtype=torch.float32)
    block = min(BLOCK_V, triton.next_power_of_2(weight.shape[0]))
    for start in range(0, x.shape[0], chunk):
        x_c, t, g = x[start : start + chunk], targets[start : start + chunk], grad[start : start + chunk]
        logits = x_c @ weight.T
        if use_kernel:  # in place: (softmax - onehot) * grad_i, the row kernel with grad as the weight
            _ce_rows[(logits.shape[0],)](logits, t, g, g.new_empty(logits.shape[0]), one, logits.stride(0),
                                         logits.shape[1], COMPUTE_GRAD=True, BLOCK=block, num_warps=NUM_WARPS)
        else:
            probs = logits.float().softmax(-1)
            probs[torch.arange(len(t), device=x.device), t] -= 1
            logits = (probs * g[:, None]).to(x.dtype)
        torch.mm(logits, weight, out=dx[start : start + chunk])
        dw.addmm_(logits.T, x_c)
    return dx, dw


def linear_cross_entropy(x, weight, targets, loss_mask=None, chunk=CHUNK):
    """x: (..., d_model), weight: (vocab, d_model), targets: (...) with -1 ignored, loss_mask: (...) or None.
    Returns the mean loss over the tokens that count, as model.py's forward computes it from full logits;
    differentiable through the custom op of kernels/__init__.py."""
    import kernels
    return kernels.linear_cross_entropy(x, weight, targets, loss_mask, chunk)


def reference(x, weight, targets, loss_mask=None):
    """The same loss from full float32 logits."""
    logits = (x @ weight.T).float()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                             reduction="none")
    weights = token_weights(targets.reshape(-1), None if loss_mask is None else loss_mask.reshape(-1))
    return (loss * weights).sum() / weights.sum().clamp(min=1)


def reference_per_row(x, weight, targets, loss_mask=None):
    """Each row's summed loss (B,) from full float32 logits: what linear_cross_entropy_per_row computes."""
    logits = (x @ weight.T).float()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                             reduction="none").view(targets.shape)
    weights = token_weights(targets, loss_mask)
    return (loss * weights).sum(dim=-1)


def aot_specs():
    """What `bench.py --aot` compiles for H100: the row kernel over a 65,536 vocab in bf16, with gradient."""
    from kernels.aot import spec
    ptrs = {"LOGITS": "bf16", "TARGETS": "i64", "WEIGHTS": "fp32", "LOSS": "fp32", "INV_TOTAL": "fp32"}
    return [spec("cross_entropy_rows", f"vocab block {BLOCK_V} w{NUM_WARPS}, grad", _ce_rows, ptrs,
                 {"COMPUTE_GRAD": True, "BLOCK": BLOCK_V}, NUM_WARPS, 1, matmul=False)]
