"""Claims about moe.py: the balance and z losses are what the papers define, the sorted dispatch equals the
loop over experts on both CPU backends, the per-expert op and torch._grouped_mm (gradients, empty experts, capacity,
every routing mode, float32 and float16 against float64 included), the routing modes do what they say, and a
transformer block, dense or MoE, compiles as one graph (common.shard_model compiles each with fullgraph=True)."""

import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe  # noqa: E402
from model import Block, ModelConfig, rope_factors, rope_tables  # noqa: E402
from moe import (MoE, balance_loss, expert_counts, expert_loop, expert_sorted, route, router_z_loss,  # noqa: E402
                 update_expert_bias)


def layer_config(**overrides):
    return SimpleNamespace(**{**dict(d_model=16, ffn_hidden=24, n_experts=4, moe_top_k=2, moe_router="topk_softmax",
                                     moe_capacity_factor=0.0, moe_bias_update_rate=0.0), **overrides})


def make_layer(**overrides):
    torch.manual_seed(0)
    layer = MoE(layer_config(**overrides))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_balance_loss_by_hand_and_uniform_is_one():
    # 4 tokens, 2 experts each, E = 4: assignments 0,1 | 0,2 | 0,1 | 3,1 -> f = [3, 3, 1, 1] / 8
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.3, 0.2, 0.4]])
    f = torch.tensor([3, 3, 1, 1]) / 8
    P = probs.mean(0)
    assert balance_loss(probs, expert_counts(experts, 4)).item() == pytest.approx(4 * (f * P).sum().item())
    uniform_probs = torch.full((8, 4), 0.25)
    uniform_experts = torch.tensor([[0, 1], [2, 3]] * 4)
    assert balance_loss(uniform_probs, expert_counts(uniform_experts, 4)).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2 + math.e ** 3) ** 2 + math.log(3) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_losses_reach_the_router():
    layer = make_layer()
    layer(torch.randn(2, 5, 16))
    for loss in (layer.aux_loss, layer.z_loss):
        layer.zero_grad()
        loss.backward(retain_graph=True)
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


BACKENDS = pytest.mark.parametrize("backend", moe.GEMM_BACKENDS)  # NANOTANUKI_MOE_GEMM: ours, torch._grouped_mm


@BACKENDS
@pytest.mark.parametrize("f", [24, 26])  # 26: rows of 104 bytes, which torch._grouped_mm rejects: the plain loop
@pytest.mark.parametrize("capacity", [None, 3])
def test_sorted_dispatch_equals_loop_with_empty_experts(monkeypatch, backend, capacity, f):
    monkeypatch.setenv("NANOTANUKI_MOE_GEMM", backend)
    torch.manual_seed(0)
    E, d, N = 6, 16, 11
    x = torch.randn(N, d, requires_grad=True)
    w = [torch.randn(E, f, d, requires_grad=True), torch.randn(E, f, d, requires_grad=True),
         torch.randn(E, d, f, requires_grad=True)]
    experts = torch.randint(0, 3, (N, 2))  # experts 3, 4, 5 get no token at all
    experts[:, 1] = (experts[:, 0] + 1) % 3
    experts[0] = torch.tensor([5, 0])      # ... except expert 5, which gets exactly one
    gates = torch.rand(N, 2, requires_grad=True)
    outputs, grads = [], []
    for dispatch in (expert_loop, expert_sorted):
        y = dispatch(x, experts, gates, *w, capacity=capacity)
        (y * torch.linspace(-1, 1, d)).sum().backward()
        outputs.append(y.detach())
        grads.append([t.grad.clone() for t in (x, gates, *w)])
        for t in (x, gates, *w):
            t.grad = None
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)
    assert grads[1][2][3:5].abs().sum() == 0  # experts without tokens get no gradient


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
@pytest.mark.parametrize("mode", moe.ROUTER_MODES)
def test_layer_equals_float64_loop_in_every_routing_mode(monkeypatch, mode, capacity_factor, dtype, backend):
    """The whole layer on the CPU (the per-expert op by default, torch._grouped_mm with NANOTANUKI_MOE_GEMM) in
    float32 and float16: its output and the gradients of the input and every parameter (the router's through the
    gates, the balance and z losses) equal the same layer run in float64 with moe.expert_loop."""
    monkeypatch.setenv("NANOTANUKI_MOE_GEMM", backend)
    layer = make_layer(moe_router=mode, moe_capacity_factor=capacity_factor, d_model=32, ffn_hidden=48,
                       n_experts=6)
    x = torch.randn(3, 11, 32).to(dtype)  # rounded first: both runs route the same input
    dy = torch.randn(3, 11, 32)
    results = []
    for dt, dispatch in ((dtype, expert_sorted), (torch.float64, expert_loop)):
        layer.to(dt).zero_grad()
        layer.dispatch = dispatch
        x_in = x.to(dt).requires_grad_()
        y = layer(x_in)
        loss = (y.double() * dy.double()).sum() + layer.aux_loss + layer.z_loss
        results.append([y, *torch.autograd.grad(loss, [x_in, *layer.parameters()]), layer.stats["dropped"]])
    (*ours, dropped), (*ref, ref_dropped) = results
    assert dropped == ref_dropped and (dropped > 0) == (capacity_factor > 0)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    for name, a, b in zip(["y", "x", *dict(layer.named_parameters())], ours, ref):
        assert a.dtype == dtype, name
        assert ((a.double() - b).abs().max() / b.abs().max()).item() <= tolerance, name


def test_capacity_drops_and_counts():
    layer = make_layer(moe_capacity_factor=0.5)
    x = torch.randn(1, 16, 16)
    layer(x)
    capacity = math.ceil(0.5 * 16 * 2 / 4)  # 4 slots per expert for 32 assignments: at least 16 dropped
    assert layer.stats["dropped"].item() >= 32 - 4 * capacity
    dropless = make_layer()
    dropless(x)
    assert dropless.stats["dropped"].item() == 0


def test_routing_modes():
    torch.manual_seed(0)
    logits = torch.randn(7, 8)
    experts, gates, probs = route(logits, 2, "topk_softmax")
    assert torch.allclose(gates.sum(-1), torch.ones(7))
    assert torch.equal(experts, logits.topk(2, dim=-1).indices)
    _, gates_sub, _ = route(logits, 2, "softmax_topk")
    assert torch.all(gates_sub.sum(-1) < 1) and torch.allclose(gates_sub, probs.gather(-1, experts))
    _, gates_renorm, _ = route(logits, 2, "softmax_topk_renorm")
    assert torch.allclose(gates_renorm, gates, atol=1e-6)  # renormalized softmax == softmax over the top k
    with pytest.raises(ValueError, match="moe_router"):
        route(logits, 2, "sigmoid")


def test_bias_changes_selection_not_gates():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    experts, gates, probs = route(logits, 2, "softmax_topk", bias=bias)
    assert experts.tolist() == [[3, 0]]
    assert torch.allclose(gates, probs[:, [3, 0]])  # gates from the unbiased probabilities


def test_bias_update_moves_toward_balance():
    layer = make_layer(moe_bias_update_rate=0.01)
    model = torch.nn.Module()
    model.layer = layer
    layer.train()
    with torch.no_grad():  # a router that sends everything to experts 0 and 1
        layer.router.weight.zero_()
        layer.router.weight[0] += 1.0
        layer.router.weight[1] += 0.5
    x = torch.ones(1, 32, 16)
    layer(x)
    assert layer.stats["load_max"].item() == pytest.approx(0.5)
    update_expert_bias(model, rate=0.01)
    assert torch.allclose(layer.expert_bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    assert layer.tokens_per_expert.sum() == 0


# -----------------------------------------------------------------------------
# torch.compile: one graph per block

def block_config(**overrides):
    return ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=48, max_seq_len=16,
                       **overrides)


def assert_compiles_whole(cfg, expect_ops=()):
    """Block(cfg) in training mode: dynamo finds no graph break, and torch.compile(fullgraph=True) (aot_eager:
    dynamo and AOT autograd without a C++ compiler, which is where graph breaks and tracing failures happen) gives
    eager's output, balance and z losses, routing counts and gradients to 1e-5. `expect_ops`: names the compiled
    graph must call (the kernels' custom ops)."""
    torch.manual_seed(0)
    block = Block(cfg, 0).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    is_moe = isinstance(block.ffn, MoE)
    if is_moe:
        block.ffn.expert_bias.normal_(std=0.05)
    x = torch.randn(2, 8, cfg.d_model)
    cos, sin = rope_factors(*rope_tables(cfg.head_dim, 8, cfg.rope_theta), x.dtype)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, cos, sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    called = {str(node.target) for gm in explanation.graphs for node in gm.graph.nodes}
    assert all(any(op in name for name in called) for op in expect_ops), called

    def step(fn):
        block.zero_grad()
        if is_moe:
            block.ffn.tokens_per_expert.zero_()
        x_in = x.clone().requires_grad_()
        y = fn(x_in, cos, sin)
        loss = (y * torch.linspace(-1, 1, cfg.d_model)).sum()
        extra = []
        if is_moe:
            loss = loss + block.ffn.aux_loss + block.ffn.z_loss
            extra = [block.ffn.aux_loss.detach(), block.ffn.z_loss.detach(), block.ffn.tokens_per_expert.clone(),
                     block.ffn.stats["dropped"], block.ffn.stats["router_entropy"]]
        loss.backward()
        return [y.detach(), x_in.grad, *extra, *(p.grad for p in block.parameters())]

    eager = step(block)
    compiled = step(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5)
    return eager


def test_dense_block_compiles_whole():
    assert_compiles_whole(block_config())


@pytest.mark.parametrize("bias_rate", [0.0, 1e-3])  # DeepSeek-V3's selection bias off / on
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])  # dropless / capacity that drops assignments
@pytest.mark.parametrize("mode", moe.ROUTER_MODES)
def test_moe_block_compiles_whole(mode, capacity_factor, bias_rate):
    """No graph break in any routing mode: counts of static length (no bincount), the grouped GEMM an opaque op of
    known shape, capacity zeroing gates instead of removing rows (no data-dependent shapes)."""
    eager = assert_compiles_whole(block_config(n_experts=8, moe_top_k=2, moe_router=mode,
                                               moe_capacity_factor=capacity_factor, moe_bias_update_rate=bias_rate),
                                  expect_ops=["nanotanuki.moe_experts"])
    dropped = eager[5]
    assert (dropped > 0) == (capacity_factor > 0)  # 16 tokens x top-2 over 8 experts at capacity 4: some drop


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_moe_block_on_torch_grouped_mm_compiles_whole(monkeypatch, capacity_factor):
    """The torch._grouped_mm backend too: its products are opaque ops, the rest fixed-shape PyTorch."""
    monkeypatch.setenv("NANOTANUKI_MOE_GEMM", "grouped_mm")
    assert_compiles_whole(block_config(n_experts=8, moe_top_k=2, moe_router="softmax_topk_renorm",
                                       moe_capacity_factor=capacity_factor), expect_ops=["nanotanuki.grouped_mm"])


def test_recomputation_in_the_backward_does_not_replace_the_forwards_losses():
    # with activation checkpointing the block's forward runs again inside the backward; had the rerun recorded its
    # balance loss on the module, that loss would keep the rerun's whole graph alive until the next forward
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from model import Block, ModelConfig, rope_factors, rope_tables
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=16,
                      n_experts=4)
    block = checkpoint_wrapper(Block(cfg), preserve_rng_state=False)
    cos, sin = rope_factors(*rope_tables(cfg.head_dim, 16, cfg.rope_theta), torch.float32)
    x = torch.randn(2, 16, 32, requires_grad=True)
    y = block(x, cos, sin)
    moe = block._checkpoint_wrapped_module.ffn
    aux, counts = moe.aux_loss, moe.tokens_per_expert.clone()
    (y.square().mean() + moe.aux_loss).backward()
    assert moe.aux_loss is aux and torch.equal(moe.tokens_per_expert, counts) and counts.sum() == 2 * 16 * 2
