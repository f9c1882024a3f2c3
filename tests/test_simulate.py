"""simulate.py: train.py's step traced at the real world size on fake ranks and fake tensors. The sharding is
even over 128 ranks for the 8B and the 8x8B, the peak fits an H100, and the collective bytes equal a hand count;
with expert parallelism each rank gathers only its experts, the all-to-alls stay inside a node, and a hot expert's
rank receives, holds and computes its extra rows."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
# a model small enough to count by hand: head_dim 16 (the smallest the flash kernel takes), nothing padded over 8
TINY = ["--vocab_size=64", "--d_model=64", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=128",
        "--max_seq_len=16", "--seq_len=16", "--gpus=8"]
# by hand: embedding and lm_head 64 x 64; a block: 2 norms of 64, wq and wo 64 x 64, wk and wv 32 x 64, three FFN
# matrices 64 x 128; the final norm 64
EMBED = 64 * 64
BLOCK = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128
N = 2 * EMBED + 64 + 2 * BLOCK


# an MoE at 128 ranks with every dimension a multiple of 128 (head_dim 64, 2 K/V heads: 128 rows), so that only the
# routers (8 rows) shard unevenly; 8 experts of 512, top-2, 2 micro-batches of 1 x 32 tokens per rank
MOE = ["--vocab_size=512", "--d_model=256", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=512",
       "--max_seq_len=32", "--seq_len=32", "--gpus=128", "--n_experts=8", "--moe_top_k=2",
       f"--tokens_per_step={32 * 128 * 2}"]
EXPERTS = 3 * 8 * 512 * 256  # one layer's stacked experts


def simulate_all(*args):
    """Every SIMULATE result of a simulate.py run (one, or a sweep's: one per setting, then the last rank's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOTANUKI_KERNELS", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "simulate.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [json.loads(line[len("SIMULATE "):]) for line in result.stdout.splitlines() if line.startswith("SIMULATE ")]
    return runs, result.stdout


def simulate(*args):
    runs, out = simulate_all(*args)
    return runs[0], out


def table(r):  # the collectives without the seconds, which are floating-point sums in trace order
    return [(row["kind"], row["group"], row["link"], row["count"], row["bytes"]) for row in r["collectives"]]


def collectives(r, kind):
    rows = [row for row in r["collectives"] if row["kind"] == kind]
    return sum(row["count"] for row in rows), sum(row["bytes"] for row in rows)


def test_two_block_slices_of_8b_and_8x8b_shard_evenly_over_128_ranks_and_fit():
    for files in (["configs/8b.py"], ["configs/8b.py", "configs/8x8b.py"]):
        r, out = simulate(*files, "--n_layer=2", "--gpus=128")
        s = r["shard_elements"]
        for rank in ("first", "last", "busiest", "min"):  # the 8x8B's experts: Shard(1), an even 1/128 each
            assert abs(s[rank] / s["even"] - 1) < 0.05, (files, s)
        assert s["busiest"] <= 1.05 * s["min"]
        assert 0 < r["memory"]["peak"] < 80 * GiB
        assert "fits" in out and "MFU" in out and "not measured" in out


def test_collective_bytes_equal_a_hand_count():
    assert N == 82240
    # 5 micro-batches per rank
    r, _ = simulate(*TINY, f"--tokens_per_step={16 * 8 * 5}")
    assert r["grad_accum"] == 5 and r["params"] == N
    # forward gathers all of the bf16 weights; the backward gathers the blocks and the embedding again (they are
    # resharded after the forward), not the lm_head (kept gathered, common.shard_model): per micro-batch
    assert collectives(r, "all-gather") == (5 * 7, 5 * 2 * (N + 2 * BLOCK + EMBED))
    # every micro-batch reduce-scatters every float32 gradient, in four groups (embedding, 2 blocks, norm+lm_head)
    assert collectives(r, "reduce-scatter") == (5 * 4, 5 * 4 * N)
    # AdamW: exp_avg and exp_avg_sq, float32 shards of 1/8, and a float32 step count for each of the 21 parameters
    assert r["memory"]["optimizer"] == 2 * 4 * N / 8 + 4 * 21
    # the same with every micro-batch traced: micro-batch 1 stands for the middle ones exactly
    full, _ = simulate(*TINY, f"--tokens_per_step={16 * 8 * 5}", "--simulate_all_micro=True")
    assert table(full) == table(r) and full["memory"] == r["memory"]
    # and the last rank's trace allocates what rank 0's does
    last, _ = simulate(*TINY, f"--tokens_per_step={16 * 8 * 5}", "--simulate_rank=7")
    assert last["memory"] == r["memory"]


def test_grad_sync_and_reshard_after_forward_change_the_collectives_as_documented():
    base = [*TINY, f"--tokens_per_step={16 * 8 * 4}"]
    r, _ = simulate(*base, "--grad_sync=last")  # unsharded gradients kept: one reduce-scatter per group per step
    assert collectives(r, "reduce-scatter") == (4, 4 * N)
    full, _ = simulate(*base, "--grad_sync=last", "--simulate_all_micro=True")
    assert table(full) == table(r) and full["memory"] == r["memory"]
    # gathered from forward to backward: one all-gather per group per micro-batch, each weight once
    r, _ = simulate(*base, "--reshard_after_forward=False")
    assert collectives(r, "all-gather") == (4 * 4, 4 * 2 * N)
    # HSDP, 2 replicas of 4: reduce-scatter inside the 4, then the float32 shard all-reduced across the 2
    r, _ = simulate(*base, "--hsdp_replicas=2")  # (and the gradient norm's all-reduce of one float32 over all 8)
    assert {(row["kind"], row["group"]) for row in r["collectives"]} == {
        ("all-gather", 4), ("reduce-scatter", 4), ("all-reduce", 2), ("all-reduce", 8)}
    assert [row["bytes"] for row in r["collectives"] if row["kind"] == "all-reduce" and row["group"] == 2] == \
        [4 * 4 * N // 4]
    r, _ = simulate(*base, "--hsdp_replicas=2", "--grad_sync=last_all_reduce")  # across replicas on the last only
    assert [row["bytes"] for row in r["collectives"] if row["kind"] == "all-reduce" and row["group"] == 2] == [N]


def test_bad_input_is_a_clear_message():
    result = subprocess.run([sys.executable, "simulate.py", *TINY, "--hsdp_replicas=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "hsdp_replicas=3 must divide gpus=8" in result.stderr
    result = subprocess.run([sys.executable, "simulate.py", *TINY, "--expert_parallel=2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "expert_parallel=2 needs an MoE model" in result.stderr
    result = subprocess.run([sys.executable, "simulate.py", *MOE, "--expert_parallel=8", "--simulate_expert_load=0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "simulate_expert_load=0.0 must be in (0, n_experts]" in result.stderr


def gathered(r, group, kind="all-gather"):
    return sum(row["bytes"] for row in r["collectives"] if row["kind"] == kind and row["group"] == group)


def test_expert_parallel_gathers_an_eighth_of_the_experts_and_exchanges_rows_inside_a_node():
    # one process traces EP=1 and EP=8 (each in a fresh fake world), then the best setting again as rank 127
    (one, eight, last), out = simulate_all(*MOE, "--simulate_ep=1,8")
    assert (one["expert_parallel"], eight["expert_parallel"], last["traced_rank"]) == (1, 8, 127)
    # EP=8: the experts are gathered and reduce-scattered over the 16 ranks that hold the same expert (across
    # nodes), the rest over all 128. EP=1 gathers the same dense parameters inside the blocks' gathers: what is
    # left is the experts', all of them (2 layers x forward and backward x 2 micro-batches, bf16)
    experts_one = gathered(one, 128) - gathered(eight, 128)
    for r, expected in ((one, experts_one), (eight, gathered(eight, 16))):  # bench's own count of the experts' part
        assert sum(row["expert_bytes"] for row in r["collectives"] if row["kind"] == "all-gather") == expected
    assert experts_one == 2 * 2 * 2 * EXPERTS * 2
    assert 0 < gathered(eight, 16) <= experts_one / 8
    assert {row["link"] for row in eight["collectives"] if row["group"] == 16} == {"InfiniBand"}
    # all-to-alls only with expert parallelism, inside a node (groups of 8 consecutive ranks): per layer and
    # micro-batch two in the forward, two in its recomputation, two in the backward, each of the N*k bf16 rows
    # (balanced routing, simulate.routed_splits); and per forward one gather of the 8 ranks' 8 int64 counts
    assert not [row for row in one["collectives"] if row["kind"] in ("all-to-all", "counts gather")]
    a2a = [row for row in eight["collectives"] if row["kind"] == "all-to-all"]
    assert [(row["group"], row["link"], row["count"], row["bytes"]) for row in a2a] == \
        [(8, "NVLink", 2 * 2 * 6, 2 * 2 * 6 * 32 * 2 * 256 * 2)]
    assert gathered(eight, 8, "counts gather") == 2 * 2 * 2 * 8 * 8 * 8
    # every rank's share within 5% of the others (placements), and the same peak on rank 0 and rank 127 (traced)
    for r in (one, eight):
        assert r["shard_elements"]["max"] <= 1.05 * r["shard_elements"]["min"]
    assert abs(last["memory"]["peak"] / eight["memory"]["peak"] - 1) < 0.05
    assert eight["memory"]["peak"] < one["memory"]["peak"]  # a rank gathers one expert of 8, not all
    assert "best that fits 80 GiB: expert_parallel=8" in out and "every rank within 5%" in out
    assert "ASSUMED BALANCED" in out
    # nothing of the first world leaks into the second: EP=8 alone traces the same
    alone, _ = simulate(*MOE, "--expert_parallel=8")
    assert table(alone) == table(eight) and alone["memory"] == eight["memory"]
    # a hot expert: the traced rank's gets 3x its share of every rank's rows (dropless: it runs them all). It
    # receives 3x the balanced 64 rows per layer and micro-batch; the all-to-alls carry its own 64 out and the 192
    # back (each three times, as above); its activations grow, and the step waits for its extra products
    hot, out = simulate(*MOE, "--expert_parallel=8", "--simulate_expert_load=3")
    assert hot["expert_rows"] == {"received": 192, "fair": 64} and eight["expert_rows"]["received"] == 64
    a2a = [row["bytes"] for row in hot["collectives"] if row["kind"] == "all-to-all"]
    assert a2a == [2 * 2 * 3 * (64 + 192) * 256 * 2]
    assert hot["memory"]["activations"] > eight["memory"]["activations"]
    assert hot["hot_expert_flops"] == (192 - 64) * 3 * 3 * 2 * 256 * 512 * 2 * 2 and eight["hot_expert_flops"] == 0
    assert hot["ceilings"]["serial"]["mfu"] < eight["ceilings"]["serial"]["mfu"]
    assert "routing SKEWED" in out and "3.00x the balanced rows" in out


def test_moe_blocks_keep_only_their_input_under_full_recomputation():
    # activation checkpointing reruns each block's forward in the backward; a rerun that recorded the routers'
    # losses on the module kept its whole graph alive (~830 MiB per 8x8B layer at micro-batch 1, 1.4 GiB at 6). Each
    # further block must add only its checkpointed bf16 input, as a dense block does
    three, _ = simulate("configs/8b.py", "configs/8x8b.py", "--n_layer=3", "--micro_batch_size=1", "--gpus=128")
    five, _ = simulate("configs/8b.py", "configs/8x8b.py", "--n_layer=5", "--micro_batch_size=1", "--gpus=128")
    per_block = (five["memory"]["activations"] - three["memory"]["activations"]) / 2
    assert abs(per_block - 4096 * 4096 * 2) < 0.1 * 4096 * 4096 * 2, per_block / 2**20
