"""Claims about the MoE kernels (kernels/moe.py, kernels/moe_gemm.py): the router, the permutation, the grouped GEMMs
and the whole expert FFN compute what moe.py's PyTorch code computes, values and gradients, checked in Triton's
interpreter on the CPU in float32 and float16 against float64; torch._grouped_mm (NANOTANUKI_MOE_GEMM=grouped_mm)
computes the same grouped product. Their compile for H100 is checked with every other kernel's in
tests/test_kernels.py.

TRITON_INTERPRET=1 must be set before the kernels are decorated; it is set here, for this whole pytest process, and
the kernel modules are reloaded in case a test collected earlier imported them without it (tests/test_kernels.py
does the same)."""

import importlib
import os
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
import moe  # noqa: E402
from kernels import moe as kmoe  # noqa: E402
from kernels import moe_gemm as gemm  # noqa: E402

for _module in (gemm, kmoe):  # moe_gemm first: kernels/moe.py binds it at import
    importlib.reload(_module)

# fp32: the interpreter multiplies in float32, as the kernels do on H100 for float32 inputs (IEEE, no tf32).
# fp16: inputs, outputs and the intermediate products round to 11 bits of mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)


def max_rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the error against the scale of the result, never NaN-tolerant."""
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def float64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def skewed_experts(n_tokens=29):
    """n_tokens x top-2 over 5 experts: experts 0, 2 and 4 get many tokens, 1 none and 3 exactly one."""
    torch.manual_seed(0)
    experts = torch.tensor([[0, 2], [2, 4], [4, 0]])[torch.randint(0, 3, (n_tokens,))]
    experts[7, 1] = 3
    return experts


# -----------------------------------------------------------------------------
# router and permutation

@pytest.mark.parametrize("n_experts, top_k", [(6, 2), (64, 8)])  # 6: not a power of two; 64 x top-8: the limits
@pytest.mark.parametrize("mode", moe.ROUTER_MODES)
def test_fused_router_equals_route(mode, n_experts, top_k):
    """Same experts in the same order, same gates and probs, and the same gradient to the logits through both the
    gates and the probs (the balance loss differentiates the probs), with and without a selection bias."""
    torch.manual_seed(n_experts)
    logits = 2 * torch.randn(45, n_experts)  # 45 tokens: the router's last block of tokens is masked
    for bias in (None, 0.05 * torch.randn(n_experts)):
        ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours, ref = kmoe.route(ours_in, top_k, mode, bias), moe.route(ref_in, top_k, mode, bias)
        assert torch.equal(ours[0], ref[0])
        for a, b in zip(ours[1:], ref[1:]):
            assert max_rel_err(a, b) <= 1e-6
        d_gates, d_probs = torch.randn(45, top_k), torch.randn(45, n_experts)
        grads = [torch.autograd.grad((g * d_gates).sum() + (p * d_probs).sum(), x)[0]
                 for (_, g, p), x in ((ours, ours_in), (ref, ref_in))]
        assert max_rel_err(*grads) <= 1e-5


@pytest.mark.parametrize("capacity", [None, 5])
def test_permutation_then_combine_is_identity(capacity):
    """The counting sort gives the stable argsort's order, offsets and drops (moe.sort_by_expert, the CPU path's),
    each kept assignment's position and the row holding it are inverse maps, and rows gathered into expert order
    and combined back with gates (1, 0) return x bit for bit (a dropped first assignment: zeros)."""
    experts = skewed_experts()
    position, sorted_assign, offsets = kmoe.permute(experts, 5, capacity)
    for ours, ref in zip((position, sorted_assign, offsets), moe.sort_by_expert(experts, 5, capacity)):
        assert torch.equal(ours, ref)
    counts = offsets[1:] - offsets[:-1]
    assert counts[1] == 0 and counts[3] == 1 and (capacity is None or counts.max() == capacity)
    kept = position >= 0
    assert torch.equal(sorted_assign[position[kept].long()], torch.arange(58, dtype=torch.int32)[kept])
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(29, 40, dtype=dtype)
        xs = x[sorted_assign.clamp(min=0).long() // 2]
        first = torch.tensor([[1.0, 0.0]]).expand(29, 2).contiguous()
        back = kmoe.combine(xs, position, 2, first)
        assert torch.equal(back, torch.where(kept.view(29, 2)[:, :1], x, 0))
        both = kmoe.combine(xs, position, 2)  # no gates: the gather's backward, each token's kept rows summed
        assert torch.equal(both, (x.double() * kept.view(29, 2).sum(1, keepdim=True)).to(dtype))


# -----------------------------------------------------------------------------
# grouped GEMMs

@DTYPES
def test_grouped_gemm_equals_per_expert_loop_and_torch_grouped_mm(dtype):
    """Forward, d_input and d_weight over groups of 0, 1, 17, 0 and 33 rows (one tile holds 16 rows under the
    interpreter, so groups end mid-tile; an empty expert's weight gradient is 0), with K = 40 and N = 48 not
    multiples of the blocks: the Triton kernels and torch._grouped_mm (moe.grouped_mm, the grouped_mm backend)
    against the per-expert loop in float64."""
    torch.manual_seed(0)
    offsets = torch.tensor([0, 0, 1, 18, 18, 51], dtype=torch.int32)
    x = torch.randn(51, 40, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(5, 48, 40)).to(dtype).requires_grad_()
    dy = torch.randn(51, 48, dtype=dtype)
    x64, w64 = float64(x, w)
    ref = gemm.grouped_mm_reference(x64, w64, offsets)
    ref_grads = torch.autograd.grad(ref, (x64, w64), dy.double())
    for product in (lambda x, w: gemm.grouped_mm(x, w, offsets), lambda x, w: moe.grouped_mm(x, w, offsets[1:])):
        y = product(x, w)
        grads = torch.autograd.grad(y, (x, w), dy)
        assert y.dtype == dtype and max_rel_err(y, ref) <= TOLERANCE[dtype]
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype and max_rel_err(g, r) <= TOLERANCE[dtype]
        assert not grads[1][0].any() and not grads[1][3].any()


def routed(dtype, n_tokens=29, d=40, ffn=48, capacity=None):
    """A layer's inputs with skewed_experts' routing and its permutation: x, gates, w_gate, w_up, w_down, experts,
    (position, sorted_assign, offsets), tiles."""
    experts = skewed_experts(n_tokens)
    torch.manual_seed(1)
    x = torch.randn(n_tokens, d, dtype=dtype)
    gates = torch.rand(n_tokens, 2)
    w_gate, w_up = [(0.3 * torch.randn(5, ffn, d)).to(dtype) for _ in range(2)]
    w_down = (0.3 * torch.randn(5, d, ffn)).to(dtype)
    perm = kmoe.permute(experts, 5, capacity)
    tiles = gemm.tile_map(perm[2], experts.numel(), gemm.rows_per_tile(x))
    return x, gates, w_gate, w_up, w_down, experts, perm, tiles


def kept_rows(perm):
    """The kept rows in expert order (a slice) and the assignment each holds."""
    _, sorted_assign, offsets = perm
    return slice(0, int(offsets[-1])), sorted_assign[:int(offsets[-1])].long()


@DTYPES
def test_fused_gate_up_swiglu_and_its_backward(dtype):
    """gate_up reads x through the sorted index (the gather fused into its loads) and gives g, u and
    h = silu(g) u; the backward's kernels give d_input of both products in one pass (dg W_gate + du W_up) and
    dW_gate, dW_up from one [dg | du] operand with x read through the index again: all against float64."""
    x, _, w_gate, w_up, _, _, perm, tiles = routed(dtype)
    _, sorted_assign, offsets = perm
    rows, assign = kept_rows(perm)
    gu, h = gemm.gate_up(x, w_gate, w_up, sorted_assign, offsets, tiles, 2)
    x64, wg64, wu64 = float64(x, w_gate, w_up)
    xs = x64[assign // 2]
    g = gemm.grouped_mm_reference(xs, wg64, offsets)
    u = gemm.grouped_mm_reference(xs, wu64, offsets)
    assert max_rel_err(gu[rows, :48], g) <= TOLERANCE[dtype] and max_rel_err(gu[rows, 48:], u) <= TOLERANCE[dtype]
    assert max_rel_err(h[rows], F.silu(g) * u) <= TOLERANCE[dtype]
    d_gu = torch.randn(58, 96, dtype=dtype)
    d_xs = gemm.grouped_mm_input(d_gu, w_gate, offsets, tiles, True, w2=w_up)
    ref = torch.cat([d_gu[a:b, :48].double() @ wg64[e] + d_gu[a:b, 48:].double() @ wu64[e]
                     for e, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    assert max_rel_err(d_xs[rows], ref) <= TOLERANCE[dtype]
    dw_gate, dw_up = gemm.grouped_mm_weight(d_gu, x, offsets, dtype, split=48, sorted_assign=sorted_assign,
                                            top_k=2, b_gather=True)
    for dw, half in ((dw_gate, slice(0, 48)), (dw_up, slice(48, 96))):
        ref = torch.stack([d_gu[a:b, half].double().t() @ xs[a:b]
                           for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
        assert dw.dtype == dtype and dw.is_contiguous() and max_rel_err(dw, ref) <= TOLERANCE[dtype]


@DTYPES
def test_fused_down_backward_and_combine_backward(dtype):
    """down_backward reads dy through the index, and its epilogue gives the gates' gradient, [dg | du] and h; the
    down weight's gradient reads gate * dy[token] through the index: against float64 autograd of
    gate * (silu(g) u) W_down^T on the same g and u."""
    x, gates, w_gate, w_up, w_down, _, perm, tiles = routed(dtype)
    _, sorted_assign, offsets = perm
    rows, assign = kept_rows(perm)
    gu, _ = gemm.gate_up(x, w_gate, w_up, sorted_assign, offsets, tiles, 2)
    dy = torch.randn(29, 40, dtype=dtype)
    d_gu, h, d_gate = gemm.down_backward(dy, w_down, gu, gates, sorted_assign, offsets, tiles, 2)
    dw_down = gemm.grouped_mm_weight(dy, h, offsets, dtype, sorted_assign=sorted_assign, top_k=2, a_gather=True,
                                     gates=gates)
    g, u = (gu[rows, :48].double().requires_grad_(), gu[rows, 48:].double().requires_grad_())
    gate = gates.reshape(-1)[assign].double().requires_grad_()
    wd64 = w_down.double().requires_grad_()
    out = gemm.grouped_mm_reference(F.silu(g) * u, wd64, offsets) * gate[:, None]
    ref = torch.autograd.grad(out, (g, u, gate, wd64), dy.double()[assign // 2])
    assert max_rel_err(d_gu[rows, :48], ref[0]) <= TOLERANCE[dtype]
    assert max_rel_err(d_gu[rows, 48:], ref[1]) <= TOLERANCE[dtype]
    assert max_rel_err(d_gate[rows], ref[2]) <= TOLERANCE[dtype]
    assert max_rel_err(dw_down, ref[3]) <= TOLERANCE[dtype]
    assert max_rel_err(h[rows], F.silu(g) * u) <= TOLERANCE[dtype]


@pytest.mark.parametrize("capacity", [None, 5])
@DTYPES
def test_expert_ffn_equals_expert_loop(dtype, capacity):
    """The whole fused FFN (nanotanuki::moe_ffn: permutation, gate_up, down, combine, and its backward) against
    moe.expert_loop in float64, with an empty expert, a one-row expert and, with capacity, dropped assignments."""
    x, gates, w_gate, w_up, w_down, experts, _, _ = routed(dtype, capacity=capacity)
    inputs = [t.requires_grad_() for t in (x, gates, w_gate, w_up, w_down)]
    dy = torch.randn(29, 40, dtype=dtype)
    y = kernels.moe_ffn(x, experts, gates, w_gate, w_up, w_down, capacity)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_inputs = float64(*inputs)
    ref = moe.expert_loop(ref_inputs[0], experts, *ref_inputs[1:], capacity=capacity)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    assert y.dtype == dtype and max_rel_err(y, ref) <= TOLERANCE[dtype]
    for name, t, g, r in zip(("x", "gates", "w_gate", "w_up", "w_down"), inputs, grads, ref_grads):
        assert g.dtype == t.dtype and max_rel_err(g, r) <= TOLERANCE[dtype], name


# -----------------------------------------------------------------------------
# the layer

@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])  # dropless, and a capacity that drops assignments
@DTYPES
def test_moe_layer_with_kernels_equals_reference(monkeypatch, dtype, capacity_factor):
    """moe.MoE through the kernels (router, permutation, grouped GEMMs, combine) gives the PyTorch path's output,
    and the same gradients to the input and every parameter, with the balance and z losses in the loss."""
    torch.manual_seed(0)
    layer = moe.MoE(SimpleNamespace(d_model=32, ffn_hidden=48, n_experts=6, moe_top_k=2,
                                    moe_router="softmax_topk_renorm", moe_capacity_factor=capacity_factor,
                                    moe_bias_update_rate=1e-3))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.expert_bias.normal_(std=0.02)
    layer.to(dtype)
    x = torch.randn(2, 13, 32, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 13, 32, dtype=dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
        layer.zero_grad()
        y = layer(x)
        loss = (y.float() * dy.float()).sum() + layer.aux_loss + layer.z_loss
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        results[backend] = y, grads, layer.stats["dropped"]
    (y_ref, grads_ref, dropped), (y, grads, dropped_kernels) = results["torch"], results["triton"]
    assert dropped == dropped_kernels and (dropped > 0) == (capacity_factor > 0)
    assert max_rel_err(y, y_ref) <= TOLERANCE[dtype]
    for name, g, r in zip(["x", *dict(layer.named_parameters())], grads, grads_ref):
        assert g.dtype == r.dtype and max_rel_err(g, r) <= TOLERANCE[dtype], name


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NANOTANUKI_KERNELS", raising=False)
    assert not kernels.use_triton(cpu)  # the default on a CPU is PyTorch
    monkeypatch.setenv("NANOTANUKI_KERNELS", "triton")
    assert kernels.use_triton(cpu)  # allowed here because TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_triton(cpu)
    monkeypatch.setenv("NANOTANUKI_KERNELS", "torch")
    assert not kernels.use_triton(cpu)
    monkeypatch.setenv("NANOTANUKI_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernels.use_triton(cpu)
    monkeypatch.delenv("NANOTANUKI_MOE_GEMM", raising=False)
    assert moe.gemm_backend() == "auto"
    monkeypatch.setenv("NANOTANUKI_MOE_GEMM", "grouped_mm")
    assert moe.gemm_backend() == "grouped_mm"
    monkeypatch.setenv("NANOTANUKI_MOE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="NANOTANUKI_MOE_GEMM"):
        moe.gemm_backend()
