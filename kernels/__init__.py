"""
Triton kernels, each beside the plain-PyTorch reference of the same function (DESIGN.md "Running without a GPU"):

    attention.py      flash attention, forward + backward, causal, grouped-query
    rmsnorm.py        fused RMSNorm, forward + backward
    cross_entropy.py  chunked fused lm_head + cross-entropy (no (tokens, vocab) logits)
    moe.py            MoE routing: fused router top-k, permutation into expert order, grouped GEMM, combine
    aot.py            compile all of them for H100 without a GPU; `python bench.py --aot` prints the report

Which implementation runs: the Triton kernels for CUDA tensors, PyTorch elsewhere. NANOTANUKI_KERNELS=torch forces
PyTorch everywhere (to rule the kernels out when a run misbehaves); NANOTANUKI_KERNELS=triton forces the kernels
on CPU tensors too, which works only under TRITON_INTERPRET=1 (Triton's interpreter, for the tests). The variable
is read at every call, so a test can switch it.

The kernel modules are imported on first use: a CPU run that never uses them never imports Triton.
"""

import os


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


def flash_attention(q, k, v, causal=True):
    from kernels.attention import flash_attention
    return flash_attention(q, k, v, causal)


def rms_norm(x, weight, eps):
    from kernels.rmsnorm import rms_norm
    return rms_norm(x, weight, eps)


def linear_cross_entropy(x, weight, targets, loss_mask=None):
    from kernels.cross_entropy import linear_cross_entropy
    return linear_cross_entropy(x, weight, targets, loss_mask)


def moe_route(logits, top_k, mode, bias=None):
    from kernels.moe import route
    return route(logits, top_k, mode, bias)


def moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity=None):
    from kernels.moe import moe_ffn
    return moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)
