"""Claims about common.py and checkpoint.py: strict configuration, every config instantiates, checkpoints
round-trip and survive a crash mid-write, the LR schedules hit their endpoints, distributed init works under torchrun
with gloo."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import common  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402


def defaults():
    return {"learning_rate": 1e-3, "max_iters": 100, "out_dir": "out", "compile": False, "betas": (0.9, 0.95),
            "init_from": None, "_private": 1, "torch": torch}


def test_config_typo_names_the_key_and_the_valid_ones():
    with pytest.raises(SystemExit) as err:
        common.load_config(defaults(), ["--lerning_rate=1"])
    message = str(err.value)
    assert "lerning_rate" in message and "Did you mean learning_rate" in message and "max_iters" in message


def test_config_override_order_and_types(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("import math\nlearning_rate = 3e-4\nmax_iters = 200\n_helper = math.pi\n")
    scope = defaults()
    config = common.load_config(scope, [str(config_file), "--max_iters=1e3", "--out_dir=out/x", "--compile=True",
                                        "--betas=[0.8, 0.9]", "--init_from=ckpt"])
    assert scope["learning_rate"] == 3e-4 and config["max_iters"] == 1000 and type(config["max_iters"]) is int
    assert config["out_dir"] == "out/x" and config["compile"] is True and config["betas"] == (0.8, 0.9)
    assert config["init_from"] == "ckpt" and "_private" not in config and "torch" not in config
    assert common.load_config(defaults(), ["--learning_rate=1"])["learning_rate"] == 1.0  # an int is a float
    assert common.load_config(defaults(), ["--compile"])["compile"] is True  # a bare --flag for a boolean


@pytest.mark.parametrize("arg", ["--max_iters=1.5", "--compile=1", "--learning_rate=fast", "--max_iters"])
def test_config_wrong_type_is_an_error(arg):
    with pytest.raises(SystemExit, match="max_iters|compile|learning_rate|key=value"):
        common.load_config(defaults(), [arg])


def test_config_file_with_an_unknown_key_is_an_error(tmp_path):
    config_file = tmp_path / "bad.py"
    config_file.write_text("lr = 1e-4\n")
    with pytest.raises(SystemExit, match="unknown config key 'lr'"):
        common.load_config(defaults(), [str(config_file)])
    with pytest.raises(SystemExit, match="not found"):
        common.load_config(defaults(), [str(tmp_path / "missing.py")])


def test_config_folder_spelled_config_reads_configs(tmp_path):
    # the model card's command is `torchrun train.py config/8b.py`; the repo's folder is configs/
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.py").write_text("max_iters = 7\n")
    assert common.load_config(defaults(), [str(tmp_path / "config" / "run.py")])["max_iters"] == 7
    with pytest.raises(SystemExit, match="not found"):
        common.load_config(defaults(), [str(tmp_path / "config" / "other.py")])
    # from the repo, as the card spells it
    run = subprocess.run([sys.executable, "bench.py", "config/8b.py", "--plan"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0 and "(7.516B)" in run.stdout, run.stderr[-2000:]


# configs that are layered on top of another one: `train.py configs/8b.py configs/8x8b.py`
BASE_CONFIG = {"8x8b.py": "8b.py", "tiny_moe.py": "tiny.py"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_instantiates(path):
    scope = {}
    base = BASE_CONFIG.get(os.path.basename(path))
    for file in ([os.path.join(ROOT, "configs", base)] if base else []) + [path]:
        exec(open(file, encoding="utf-8").read(), scope)
    cfg = common.model_config_from(scope)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() > 0
    if "tokens_per_step" in scope:  # the batch in tokens must be whole micro-batches of whole sequences
        assert scope["tokens_per_step"] % (scope["micro_batch_size"] * scope["seq_len"]) == 0
        assert scope["seq_len"] <= cfg.max_seq_len


def test_tiny_config_runs_forward_and_backward():
    scope = {}
    exec(open(os.path.join(ROOT, "configs", "tiny.py"), encoding="utf-8").read(), scope)
    model = Transformer(common.model_config_from(scope))
    idx = torch.randint(0, scope["vocab_size"], (2, scope["seq_len"]))
    _, loss = model(idx, idx)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(scope["vocab_size"])).item()) < 0.5  # near uniform at init


@pytest.fixture(scope="module")
def enc():
    text = "The quick brown fox jumps over the lazy dog. 吾輩は猫である。名前はまだ無い。 " * 50
    return train_tokenizer(iter([text]), vocab_size=300)


def test_checkpoint_round_trip(tmp_path, enc):
    cfg = common.model_config_from(dict(vocab_size=enc.n_vocab, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                        ffn_hidden=64, max_seq_len=32, tie_embeddings=True))
    model = Transformer(cfg)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, enc, stage="test", extra={"step": 7})
    loaded, enc2, meta = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert meta["stage"] == "test" and meta["step"] == 7 and meta["model"]["d_model"] == 32
    assert enc2.encode_ordinary("吾輩は猫") == enc.encode_ordinary("吾輩は猫")
    idx = torch.randint(0, enc.n_vocab, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.embed.weight


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, enc, monkeypatch):
    cfg = common.model_config_from(dict(vocab_size=enc.n_vocab, d_model=32, n_layer=1, n_head=2, n_kv_head=2,
                                        ffn_hidden=64, max_seq_len=32))
    first, second = Transformer(cfg), Transformer(cfg)
    checkpoint.save_checkpoint(tmp_path / "ckpt", first, enc, stage="first")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the tokenizer")

    monkeypatch.setattr(checkpoint, "save_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "ckpt", second, enc, stage="second")
    monkeypatch.undo()
    loaded, _, meta = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert meta["stage"] == "first"
    assert torch.equal(loaded.embed.weight, first.embed.weight)
    # the leftover is cleared, not in the way
    checkpoint.save_checkpoint(tmp_path / "ckpt", second, enc, stage="second")
    assert checkpoint.load_checkpoint(tmp_path / "ckpt")[2]["stage"] == "second"


def test_load_checkpoint_refuses_a_mismatched_tokenizer(tmp_path, enc):
    import json
    cfg = common.model_config_from(dict(vocab_size=enc.n_vocab, d_model=32, n_layer=1, n_head=2, n_kv_head=2,
                                        ffn_hidden=64, max_seq_len=32))
    checkpoint.save_checkpoint(tmp_path / "ckpt", Transformer(cfg), enc, stage="test")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["tokenizer_hash"] = "0" * 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_checkpoint(tmp_path / "nothing")


def test_lr_schedules():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert common.lr_at(0, **kw) == pytest.approx(0.1) and common.lr_at(9, **kw) == pytest.approx(1.0)
    assert common.lr_at(10, **kw) == pytest.approx(1.0)
    assert common.lr_at(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert common.lr_at(110, **kw) == pytest.approx(0.1) and common.lr_at(500, **kw) == pytest.approx(0.1)
    cosine = [common.lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    wsd = [common.lr_at(s, schedule="wsd", decay_frac=0.2, **kw) for s in range(111)]
    assert wsd[10:88] == [1.0] * 78 and wsd[110] == pytest.approx(0.1)  # stable until the last 22 steps
    assert all(a >= b for a, b in zip(wsd[10:], wsd[11:]))
    with pytest.raises(ValueError, match="schedule"):
        common.lr_at(50, schedule="linear", **kw)


def test_peak_flops_table():
    assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.peak_flops("cpu") is None and common.mfu(1e9, 1e3, "cpu") is None
    assert common.mfu(6 * 8e9, 3000, "NVIDIA H100 80GB HBM3") == pytest.approx(6 * 8e9 * 3000 / 989e12)


def test_distributed_init_with_gloo_under_torchrun(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "import torch, torch.distributed as dist, common\n"
        "rank, local_rank, world, device = common.setup_distributed(device='cpu', timeout_minutes=1)\n"
        "t = torch.tensor([rank + 1.0]); dist.all_reduce(t)\n"
        "assert world == 2 and device == 'cpu' and t.item() == 3.0, (world, device, t)\n"
        "common.print0('all_reduce ok'); common.cleanup_distributed()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("all_reduce ok") == 1  # print0: rank 0 only


THREADS_PROBE = """import json, os, sys
sys.path.insert(0, {root!r})
import torch, common  # libgomp has sized its pool from the whole affinity by now
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:{cores}]))  # as taskset or a cpuset would
common.setup_distributed(device="cpu")
print(json.dumps({{"threads": torch.get_num_threads()}}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores this process may use (Linux)")
@pytest.mark.parametrize("cores,env,expected", [
    (1, {}, 1),                                # the cores this process may use, not the machine's
    (2, {"LOCAL_WORLD_SIZE": "2"}, 1),         # shared by the ranks of a node
    (2, {"OMP_NUM_THREADS": "1"}, 1),          # a user's explicit count wins (the rule alone would give 2)
])
def test_stage_threads_follow_the_allowed_cores(cores, env, expected):
    """common.set_cpu_threads, through setup_distributed as every torch stage reaches it."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE.format(root=ROOT, cores=cores)], capture_output=True,
                         text=True, timeout=120, env={**child_env, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["threads"] == expected
