"""Claims about checkpoint.py's trust boundary: a training checkpoint is loaded only when its files match the
manifest.json written when it was committed (a flipped, truncated, missing or extra file is refused with a message
naming it, and the newest checkpoint that passes is used); one without a manifest only on explicit opt-in; a model
whose weights hold NaN/Inf is never written; a model checkpoint's config.json is checked against the safetensors
header before anything is built (n_layer=10**6 fails in well under a second, in bounded memory); a broken tokenizer
file is named with its line. End to end, through train.py: tests/test_train.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def fake_train_checkpoint(directory, step, seed):
    """A directory with the files of a 1-rank training checkpoint (DCP's .metadata and shard, meta.json, the RNG
    file), random bytes in place of the tensors, committed with a manifest as save_train_checkpoint commits one."""
    os.makedirs(directory)
    data = torch.randint(0, 256, (3 * 4096 + 17,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    (directory / "__0_0.distcp").write_bytes(data.numpy().tobytes())
    (directory / ".metadata").write_bytes(data[:999].numpy().tobytes())
    (directory / "rng_rank0.pt").write_bytes(data[:300].numpy().tobytes())
    (directory / "meta.json").write_text(json.dumps({"step": step}))
    checkpoint.write_manifest(directory, checkpoint.file_digests(directory, checkpoint.list_files(directory)))
    return directory


@pytest.fixture
def root(tmp_path):
    for step in (4, 8, 12):
        fake_train_checkpoint(tmp_path / f"step_{step:08d}", step, seed=step)
    os.makedirs(tmp_path / "step_00000016.tmp")  # an interrupted save: never a candidate
    return tmp_path


def test_a_checkpoint_that_matches_its_manifest_is_picked(root, capsys):
    assert checkpoint.latest_checkpoint(root) == str(root / "step_00000012")
    assert checkpoint.latest_checkpoint(root, max_step=11) == str(root / "step_00000008")
    assert checkpoint.latest_checkpoint(root / "nothing") is None
    assert "refused" not in capsys.readouterr().out


def test_flipped_truncated_missing_or_extra_files_are_refused_and_the_previous_checkpoint_is_used(root, capsys):
    newest = root / "step_00000012"
    shard = bytearray((newest / "__0_0.distcp").read_bytes())
    shard[4096:8192] = bytes(b ^ 0xFF for b in shard[4096:8192])  # 4 KB of flipped bytes, same size
    (newest / "__0_0.distcp").write_bytes(bytes(shard))
    assert checkpoint.latest_checkpoint(root) == str(root / "step_00000008")
    out = capsys.readouterr().out
    assert "step_00000012" in out and "__0_0.distcp" in out and "sha256" in out and "refused" in out
    for damage, names in [
        (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:100]), [".metadata", "bytes"]),
        (lambda d: (d / "meta.json").write_text('{"step": 8, "loa'), ["meta.json"]),
        (lambda d: (d / "rng_rank0.pt").unlink(), ["rng_rank0.pt", "missing"]),
        (lambda d: (d / "__1_0.distcp").write_bytes(b"planted"), ["__1_0.distcp", "not in"]),
        (lambda d: (d / "manifest.json").write_text('{"files": {"__0_0'), ["manifest.json"]),
    ]:
        broken = root / "step_00000008"
        damage(broken)
        assert checkpoint.latest_checkpoint(root) == str(root / "step_00000004")
        out = capsys.readouterr().out
        assert "step_00000008" in out and all(name in out for name in names), (names, out)
        shutil.rmtree(broken)
        fake_train_checkpoint(broken, 8, seed=8)
    # every checkpoint refused: an error naming each, not a silent start from scratch
    for d in ("step_00000004", "step_00000008"):
        (root / d / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="step_00000004.*meta.json") as error:
        checkpoint.latest_checkpoint(root)
    assert "step_00000012" in str(error.value)


def test_a_checkpoint_without_a_manifest_needs_an_explicit_opt_in(root, capsys):
    for d in ("step_00000004", "step_00000008", "step_00000012"):
        (root / d / "manifest.json").unlink()  # as an older version wrote them
    with pytest.raises(SystemExit, match="manifest.json.*pickle.*--trust_unverified_checkpoint"):
        checkpoint.latest_checkpoint(root)
    assert checkpoint.latest_checkpoint(root, trust_unverified=True) == str(root / "step_00000012")
    # an explicit directory is refused the same way, before DCP reads its .metadata
    with pytest.raises(SystemExit, match="step_00000008.*--trust_unverified_checkpoint"):
        checkpoint.load_train_checkpoint(str(root / "step_00000008"), None, None)


def tiny(enc, **overrides):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab_size=enc.n_vocab, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                             ffn_hidden=64, max_seq_len=32), **overrides}))


def test_a_model_with_nan_or_inf_weights_is_never_written(tmp_path, enc):
    checkpoint.save_checkpoint(tmp_path / "ckpt", tiny(enc), enc, stage="first")
    model = tiny(enc)
    with torch.no_grad():
        model.blocks[1].attn.wq.weight[3, 5] = float("nan")
        model.norm.weight[0] = float("inf")
    with pytest.raises(SystemExit, match="NaN/Inf.*blocks.1.attn.wq.weight.*norm.weight"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", model, enc, stage="second")
    assert checkpoint.load_checkpoint(tmp_path / "ckpt")[2]["stage"] == "first"  # the previous one, untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing half-written beside it


def edit_config(directory, **changes):
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    meta["model"].update(changes)
    path.write_text(json.dumps(meta))


PROBE = """
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from checkpoint import load_checkpoint
# 1 GB of address space above what the imports took: a load that grows without bound stops there, not the machine
used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))
before, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    load_checkpoint(sys.argv[2])
    error = None
except BaseException as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"error": error, "seconds": time.perf_counter() - t,
                  "grown_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_config_that_does_not_match_the_weights_is_refused_before_anything_is_built(tmp_path, enc):
    checkpoint.save_checkpoint(tmp_path / "ckpt", tiny(enc), enc, stage="test")
    edit_config(tmp_path / "ckpt", n_layer=10**6)
    # measured before the check: 67 s and 1.9 GB of host memory building a million blocks on the meta device, until
    # a 2 GB limit stopped it (with no limit it goes on)
    run = subprocess.run([sys.executable, "-c", PROBE, ROOT, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["error"].startswith("ValueError") and "n_layer=1000000" in result["error"], result
    assert "2 blocks" in result["error"] and "config.json" in result["error"]
    assert result["seconds"] < 5 and result["grown_bytes"] < 20e6, result
    for changes, words in [(dict(n_layer=2, d_model=10**9), ["embed.weight", "[512, 32]", "1000000000"]),
                           (dict(d_model=32, n_experts=4), ["ffn"])]:
        edit_config(tmp_path / "ckpt", **changes)
        with pytest.raises(ValueError, match="does not match") as error:
            checkpoint.load_checkpoint(tmp_path / "ckpt")
        assert all(w in str(error.value) for w in words), str(error.value)
    # a vocabulary smaller than the tokenizer's: ids the model has no row for
    checkpoint.save_checkpoint(tmp_path / "small", tiny(enc, vocab_size=300), enc, stage="test")
    with pytest.raises(ValueError, match=f"tokenizer has {enc.n_vocab} ids.*vocab_size is 300"):
        checkpoint.load_checkpoint(tmp_path / "small")
    # a truncated weights file, and a header that claims more bytes than its tensors' shapes hold
    weights = tmp_path / "small" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        checkpoint.load_checkpoint(tmp_path / "small")
    (tmp_path / "small" / "config.json").write_text('{"model": {"d_model": 3')
    with pytest.raises(ValueError, match="config.json"):
        checkpoint.load_checkpoint(tmp_path / "small")


def test_a_broken_tokenizer_file_is_named_with_its_line(tmp_path, enc):
    checkpoint.save_checkpoint(tmp_path / "ckpt", tiny(enc), enc, stage="test")
    path = tmp_path / "ckpt" / "tokenizer.tiktoken"
    lines = path.read_text().splitlines()
    for bad in ("QQ==", "QQ== twelve", "!!! 3"):
        path.write_text("\n".join(lines[:6] + [bad] + lines[7:]) + "\n")
        with pytest.raises(ValueError, match=r"tokenizer.tiktoken:7: .*" + bad.split()[0]):
            checkpoint.load_checkpoint(tmp_path / "ckpt")
