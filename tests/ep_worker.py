"""One rank of tests/test_expert_parallel.py, under torchrun with gloo: moe.expert_parallel_ffn on this rank's tokens
and local experts against moe.expert_loop with all experts on every rank's tokens as one batch, forward and
gradients, for each routing case, with and without a capacity, and both CPU expert backends (moe.gemm_backend).
Exits non-zero (the assertion's message on stderr) at the first difference.
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


def rank_data(case, r):
    """Rank r's tokens, routing and output gradient: every rank makes every rank's, for the reference."""
    gen = torch.Generator().manual_seed(100 + r)
    x = torch.randn(TOKENS[r], d, generator=gen)
    logits = torch.randn(TOKENS[r], E, generator=gen)
    if case == "one_expert" and r == 0 or case in ("idle_rank", "all_one_expert"):
        # "one_expert": rank 0's tokens all pick experts 0 and 1, so it sends rank 1 nothing; "idle_rank": every
        # rank's do, so rank 1 receives no rows at all; "all_one_expert": expert 0 first for every token
        logits[:, 0] += 10
        logits[:, 1] += 5 if case != "all_one_expert" else 0
    experts, gates, _ = route(logits, k, "topk_softmax")
    return x, experts, gates, torch.randn(TOKENS[r], d, generator=gen)


# (backend, routing case, capacity): capacity 3 of the group's 17 tokens x 2 drops rows of the busy experts, on
# both ranks (rank 1's assignments come after rank 0's); capacity 12 with every token on expert 0 drops all of
# rank 1's rows to it and 2 of rank 0's
cases = [(b, c, None) for b in ("auto", "grouped_mm") for c in ("random", "one_expert", "idle_rank")]
cases += [("auto", "random", 3), ("grouped_mm", "random", 3), ("auto", "all_one_expert", 8)]
for backend, case, capacity in cases:
    os.environ["NANOTANUKI_MOE_GEMM"] = backend
    full_gen = torch.Generator().manual_seed(0)  # the same full weights on every rank
    full = [torch.randn(E, f, d, generator=full_gen) * 0.3, torch.randn(E, f, d, generator=full_gen) * 0.3,
            torch.randn(E, d, f, generator=full_gen) * 0.3]
    data = [rank_data(case, r) for r in range(ep)]
    x, experts, gates, dy = data[rank]
    mine_tokens = slice(sum(TOKENS[:rank]), sum(TOKENS[:rank + 1]))
    # the reference: one rank with every rank's tokens in rank order and all experts
    ref_in = [torch.cat([dat[i] for dat in data]).requires_grad_() for i in (0, 2)] + \
        [t.clone().requires_grad_() for t in full]
    y_ref = expert_loop(ref_in[0], torch.cat([dat[1] for dat in data]), ref_in[1], *ref_in[2:], capacity=capacity)
    y_ref.backward(torch.cat([dat[3] for dat in data]))

    ep_in = [t.clone().requires_grad_() for t in (x, gates)] + [w[mine].clone().requires_grad_() for w in full]
    y = expert_parallel_ffn(ep_in[0], experts, ep_in[1], *ep_in[2:], group, capacity)
    y.backward(dy)

    what = f"{backend} {case} capacity {capacity} rank {rank}"
    torch.testing.assert_close(y, y_ref[mine_tokens], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} y: {m}")
    for name, a, b in (("x", ep_in[0], ref_in[0]), ("gates", ep_in[1], ref_in[1])):
        torch.testing.assert_close(a.grad, b.grad[mine_tokens], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what} d{name}: {m}")
    for name, a, b in zip(("w_gate", "w_up", "w_down"), ep_in[2:], ref_in[2:]):
        torch.testing.assert_close(a.grad, b.grad[mine], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} d{name}: {m}")
    if case == "idle_rank" and rank == 1:
        assert all(w.grad.abs().max() == 0 for w in ep_in[2:]), "an expert without rows got a gradient"
    if case == "all_one_expert" and rank == 1:
        assert torch.equal(y, y_ref[mine_tokens]) and (ep_in[1].grad[:, 0] == 0).all(), "rank 1 kept a dropped row"

print(f"rank {rank} ok")
cleanup_distributed()  # the common exit: no gloo teardown abort
