"""bench.py --simulate: train.py's step traced at the real world size on fake ranks and fake tensors. The sharding is
even over 128 ranks for the 8B and the 8x8B, the peak fits an H100, and the collective bytes equal a hand count."""

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


def simulate(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("NANOTANUKI_KERNELS", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "bench.py", "--simulate", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("SIMULATE "))
    return json.loads(line[len("SIMULATE "):]), result.stdout


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
    r, _ = simulate(*base, "--hsdp_replicas=2")
    assert {(row["kind"], row["group"]) for row in r["collectives"]} == {
        ("all-gather", 4), ("reduce-scatter", 4), ("all-reduce", 2)}
    assert [row["bytes"] for row in r["collectives"] if row["kind"] == "all-reduce" and row["group"] == 2] == \
        [4 * 4 * N // 4]
    r, _ = simulate(*base, "--hsdp_replicas=2", "--grad_sync=last_all_reduce")  # across replicas on the last only
    assert [row["bytes"] for row in r["collectives"] if row["kind"] == "all-reduce" and row["group"] == 2] == [N]


def test_bad_input_is_a_clear_message():
    result = subprocess.run([sys.executable, "bench.py", "--simulate", *TINY, "--hsdp_replicas=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "hsdp_replicas=3 must divide gpus=8" in result.stderr


def test_moe_blocks_keep_only_their_input_under_full_recomputation():
    # activation checkpointing reruns each block's forward in the backward; a rerun that recorded the routers'
    # losses on the module kept its whole graph alive (~830 MiB per 8x8B layer at micro-batch 1, 1.4 GiB at 6). Each
    # further block must add only its checkpointed bf16 input, as a dense block does
    four, _ = simulate("configs/8b.py", "configs/8x8b.py", "--n_layer=4", "--micro_batch_size=1", "--gpus=128")
    eight, _ = simulate("configs/8b.py", "configs/8x8b.py", "--n_layer=8", "--micro_batch_size=1", "--gpus=128")
    per_block = (eight["memory"]["activations"] - four["memory"]["activations"]) / 4
    assert abs(per_block - 4096 * 4096 * 2) < 0.1 * 4096 * 4096 * 2, per_block / 2**20
