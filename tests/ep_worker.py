"""One rank of tests/test_expert_parallel.py, under torchrun with gloo: moe.expert_parallel_ffn on this rank's tokens
and local experts against moe.expert_loop on the same tokens with all experts, forward and gradients, for each
routing case and both CPU expert backends (moe.gemm_backend). Exits non-zero (the assertion's message on stderr)
at the first difference.
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ep_worker.py"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import torch.distributed as dist

from common import cleanup_distributed
from moe import expert_loop, expert_parallel_ffn, route

E, d, f, k = 4, 16, 24, 2
TOKENS = (10, 7)  # different on each rank: the exchanges' splits are uneven both ways

dist.init_process_group("gloo")
rank, ep = dist.get_rank(), dist.get_world_size()
group = dist.group.WORLD
E_local = E // ep
mine = slice(rank * E_local, (rank + 1) * E_local)


def routing(case, n, gen):
    """(experts, gates) of n tokens. "random": the router's top-2; "one_expert": every token of rank 0 picks expert
    0 (and 1 second), so rank 0 sends rank 1 nothing; "idle_rank": every token on every rank picks experts 0 and 1,
    so rank 1 receives no rows at all and its experts' gradients are zero."""
    logits = torch.randn(n, E, generator=gen)
    if case == "one_expert" and rank == 0 or case == "idle_rank":
        logits[:, 0] += 10
        logits[:, 1] += 5
    experts, gates, _ = route(logits, k, "topk_softmax")
    return experts, gates


for backend, case in ((b, c) for b in ("auto", "grouped_mm") for c in ("random", "one_expert", "idle_rank")):
    os.environ["NANOTANUKI_MOE_GEMM"] = backend
    full_gen = torch.Generator().manual_seed(0)  # the same full weights on every rank
    full = [torch.randn(E, f, d, generator=full_gen) * 0.3, torch.randn(E, f, d, generator=full_gen) * 0.3,
            torch.randn(E, d, f, generator=full_gen) * 0.3]
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens on each rank
    x = torch.randn(TOKENS[rank], d, generator=gen)
    experts, gates = routing(case, TOKENS[rank], gen)
    dy = torch.randn(TOKENS[rank], d, generator=gen)

    ref_in = [t.clone().requires_grad_() for t in (x, gates, *full)]
    y_ref = expert_loop(ref_in[0], experts, ref_in[1], *ref_in[2:])
    y_ref.backward(dy)
    for t in ref_in[2:]:
        dist.all_reduce(t.grad)  # every rank's tokens train every expert: the weights' gradient is the group's sum

    ep_in = [t.clone().requires_grad_() for t in (x, gates)] + [w[mine].clone().requires_grad_() for w in full]
    y = expert_parallel_ffn(ep_in[0], experts, ep_in[1], *ep_in[2:], group)
    y.backward(dy)

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{backend} {case} rank {rank} y: {m}")
    for name, a, b in (("x", ep_in[0], ref_in[0]), ("gates", ep_in[1], ref_in[1])):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{backend} {case} rank {rank} d{name}: {m}")
    for name, a, b in zip(("w_gate", "w_up", "w_down"), ep_in[2:], ref_in[2:]):
        torch.testing.assert_close(a.grad, b.grad[mine], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{backend} {case} rank {rank} d{name}: {m}")
    if case == "idle_rank" and rank == 1:
        assert all(w.grad.abs().max() == 0 for w in ep_in[2:]), "an expert without rows got a gradient"

try:
    expert_parallel_ffn(x, experts, gates, *(w[mine] for w in full), group, capacity=4)
    raise AssertionError("capacity was accepted")
except NotImplementedError as e:
    assert "dropless" in str(e)
print(f"rank {rank} ok")
cleanup_distributed()  # the common exit: no gloo teardown abort
