"""
Our MoE layer (moe.MoE, its CPU path: moe.expert_sorted's per-expert op) against Hugging Face transformers'
MixtralSparseMoeBlock on the CPU, forward + backward, with the same weights.

    pip install transformers      # for this benchmark only; the project never imports it
    python benchmarks/moe_cpu_vs_mixtral.py [--tokens=4096] [--d_model=256] [--ffn=512] [--experts=8] [--top_k=2]
                                            [--threads=2] [--runs=15]

Both layers route the same way (softmax over the experts, top-k, the k gates renormalized: our
"softmax_topk_renorm", Mixtral's router) and get the same weights: Mixtral's gate_up_proj is our [w_gate | w_up]
along ffn, its down_proj our w_down. Before timing, the outputs and the gradients of the input and of every weight
are checked equal (to float32 rounding). A step is forward, then backward of y against a fixed random dy, with
the input requiring its gradient and every weight's gradient computed. Mixtral's block is built from its config
alone, so its experts run its default ("eager") loop over experts; `experts_implementation="grouped_mm"` is timed
too, as a third row, for reference. A fourth row, "products alone", is the floor: the nine products per expert
(forward, d_input and d_weight of gate, up and down) with nothing around them, on cache-warm buffers. Every layer's
fwd+bwd runs these FLOPs; Mixtral's time over this floor is the largest ratio any implementation could show.

The machine may be shared, so the runs are interleaved: each round times one step of every layer, in an order that
rotates from round to round, and the ratio is taken per round (their time / ours) before the median, so that a
neighbour's burst slows both sides of a round alike. Reported: median step times, and the median (min-max) of the
per-round ratios.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe  # noqa: E402

try:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.utils import logging
except ImportError:
    sys.exit("this benchmark compares against transformers' Mixtral: pip install transformers")

settings = {"tokens": 4096, "d_model": 256, "ffn": 512, "experts": 8, "top_k": 2, "threads": 2, "runs": 15}
for arg in sys.argv[1:]:
    key, _, value = arg[2:].partition("=")
    if key not in settings:
        sys.exit(f"unknown option {arg}: use " + " ".join(f"--{k}=N" for k in settings))
    settings[key] = int(value)
T, C, F, E, k = (settings[key] for key in ("tokens", "d_model", "ffn", "experts", "top_k"))
torch.set_num_threads(settings["threads"])
logging.set_verbosity_error()  # a block built without a model warns that its experts implementation is unset

torch.manual_seed(0)
ours = moe.MoE(type("Config", (), dict(d_model=C, ffn_hidden=F, n_experts=E, moe_top_k=k,
                                       moe_router="softmax_topk_renorm", moe_capacity_factor=0.0,
                                       moe_bias_update_rate=0.0)))
for p in ours.parameters():
    torch.nn.init.normal_(p, std=0.05)
theirs = {}
for implementation in ("eager", "grouped_mm"):
    config = MixtralConfig(hidden_size=C, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    if implementation != "eager":
        config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.w_gate, ours.w_up], 1))
        block.experts.down_proj.copy_(ours.w_down)
    theirs[implementation] = block
x = torch.randn(1, T, C)
dy = torch.randn(1, T, C)


def step(layer):
    """One forward + backward; returns y and the gradients (input, router, gate, up, down) in our layout."""
    layer.zero_grad(set_to_none=True)
    x_in = x.clone().requires_grad_()
    y = layer(x_in)
    y.backward(dy)
    if layer is ours:
        return y, [x_in.grad, ours.router.weight.grad, ours.w_gate.grad, ours.w_up.grad, ours.w_down.grad]
    gate_up = layer.experts.gate_up_proj.grad
    return y, [x_in.grad, layer.gate.weight.grad, gate_up[:, :F], gate_up[:, F:], layer.experts.down_proj.grad]


y_ours, grads_ours = step(ours)
for name, block in theirs.items():
    y, grads = step(block)
    assert torch.allclose(y, y_ours, atol=1e-5), f"outputs differ from Mixtral ({name})"
    for what, a, b in zip(("x", "router", "w_gate", "w_up", "w_down"), grads, grads_ours):
        assert torch.allclose(a, b, atol=1e-4), f"gradient of {what} differs from Mixtral ({name})"

# the floor: the nine products per expert that any implementation of the layer must run (gate, up and down: forward,
# d_input, d_weight), alone, on an even split of the rows, into buffers allocated once and warm in cache
rows = T * k // E
a_d, a_f = torch.randn(rows, C), torch.randn(rows, F)
w_fd, w_df = torch.randn(E, F, C), torch.randn(E, C, F)
o_d, o_f, o_fd, o_df = torch.empty(rows, C), torch.empty(rows, F), torch.empty(F, C), torch.empty(C, F)


def products():
    for e in range(E):
        for _ in range(2):  # gate and up: forward, d_input, d_weight
            torch.mm(a_d, w_fd[e].t(), out=o_f)
            torch.mm(a_f, w_fd[e], out=o_d)
            torch.mm(a_f.t(), a_d, out=o_fd)
        torch.mm(a_f, w_df[e].t(), out=o_d)  # down: forward, d_input, d_weight
        torch.mm(a_d, w_df[e], out=o_f)
        torch.mm(a_d.t(), a_f, out=o_df)


layers = {"ours": lambda: step(ours), "mixtral eager": lambda: step(theirs["eager"]),
          "mixtral grouped_mm": lambda: step(theirs["grouped_mm"]), "products alone": products}
names = list(layers)
for name in names:  # warm-up: first calls allocate and load code
    layers[name]()
times = {name: [] for name in names}
for r in range(settings["runs"]):
    for name in names[r % len(names):] + names[:r % len(names)]:
        t0 = time.perf_counter()
        layers[name]()
        times[name].append(time.perf_counter() - t0)

print(f"MoE layer forward+backward on the CPU: {T} tokens, d_model {C}, ffn {F}, {E} experts, top-{k}, float32, "
      f"{settings['threads']} threads, {settings['runs']} interleaved rounds; ours on NANOTANUKI_MOE_GEMM="
      f"{moe.gemm_backend()}")
print(f"{'layer':20s} {'median ms':>10s} {'ratio to ours, median (min-max) of rounds':>44s}")
# "products alone" below 1x: how much of our time is anything but the products; Mixtral's ratio can be no higher
# than its ratio to the products alone (what a layer doing nothing else would reach)
for name in names:
    ratios = [a / b for a, b in zip(times[name], times["ours"])]
    spread = "" if name == "ours" else (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
                                        f"{max(ratios):.2f}x)")
    print(f"{name:20s} {statistics.median(times[name]) * 1e3:10.1f} {spread:>44s}")
