"""Claims about upcycle.py: with noise 0 the MoE computes the dense function (every routing mode with an all-zero
router, and any router when the gates sum to 1); with Tanuki's 0.1% noise it stays close; the 8x8B is 47B / 13B."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from common import model_config_from  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    text = open(os.path.join(ROOT, "tests", "data", "en_sample.txt"), encoding="utf-8").read()
    enc = train_tokenizer(iter([text]), vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=enc.n_vocab, d_model=32, n_layer=3, n_head=4, n_kv_head=2, ffn_hidden=64,
                      max_seq_len=64, init_std=0.1)  # large weights: logits far from uniform, so "equal" means it
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    save_checkpoint(path, Transformer(cfg), enc, stage="train")
    return path


def upcycle(dense_path, out, *args):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py"), f"--init_from={dense_path}",
                          f"--out_dir={out}", "--n_experts=4", "--moe_top_k=2", *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_checkpoint(out)[0].eval()


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("mode", ["topk_softmax", "softmax_topk", "softmax_topk_renorm"])
def test_noise_zero_and_zero_router_keeps_the_function_in_every_mode(dense, tmp_path, mode):
    moe = upcycle(dense, tmp_path / "moe", "--noise_ratio=0", "--router_init_std=0", f"--moe_router={mode}")
    dense_model = load_checkpoint(dense)[0].eval()
    idx = torch.randint(0, dense_model.cfg.vocab_size, (2, 24))
    assert torch.allclose(logits_of(moe, idx), logits_of(dense_model, idx), atol=1e-5)


@pytest.mark.parametrize("mode", ["topk_softmax", "softmax_topk_renorm"])
def test_noise_zero_keeps_the_function_for_any_router_when_gates_sum_to_one(dense, tmp_path, mode):
    moe = upcycle(dense, tmp_path / "moe", "--noise_ratio=0", "--router_init_std=0.5", f"--moe_router={mode}")
    dense_model = load_checkpoint(dense)[0].eval()
    idx = torch.randint(0, dense_model.cfg.vocab_size, (2, 24))
    routed = moe.blocks[0].ffn
    moe(idx)
    assert routed.stats["load_max"] > routed.stats["load_min"]  # the router really routes differently per token
    assert torch.allclose(logits_of(moe, idx), logits_of(dense_model, idx), atol=1e-5)


def test_tanuki_noise_stays_close_and_experts_differ(dense, tmp_path):
    moe = upcycle(dense, tmp_path / "moe")  # defaults: noise 0.001, router std 0.001
    dense_model = load_checkpoint(dense)[0].eval()
    idx = torch.randint(0, dense_model.cfg.vocab_size, (2, 24))
    a, b = logits_of(moe, idx), logits_of(dense_model, idx)
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * b.abs().max()
    w = moe.blocks[1].ffn.w_up
    assert not torch.equal(w[0], w[1])
    cosine = torch.nn.functional.cosine_similarity(w[0].flatten(), w[1].flatten(), dim=0)
    assert cosine > 0.999  # experts start as near copies; training moves them apart
    assert torch.equal(moe.blocks[1].attn.wq.weight, dense_model.blocks[1].attn.wq.weight)


def test_every_second_layer(dense, tmp_path):
    moe = upcycle(dense, tmp_path / "moe", "--moe_layer_interval=2")
    kinds = [type(block.ffn).__name__ for block in moe.blocks]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU"]


def test_refuses_to_upcycle_twice(dense, tmp_path):
    upcycle(dense, tmp_path / "moe")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py"), f"--init_from={tmp_path / 'moe'}",
                          f"--out_dir={tmp_path / 'again'}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "already a Mixture of Experts" in run.stderr


def test_8x8b_is_47b_total_13b_active():
    scope = {}
    for name in ("8b.py", "8x8b.py"):  # 8x8b.py is layered on top of 8b.py
        exec(open(os.path.join(ROOT, "configs", name), encoding="utf-8").read(), scope)
    with torch.device("meta"):
        model = Transformer(model_config_from(scope))
    total, active = model.num_params(), model.num_params(active=True)
    print(f"\n8x8b: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active")
    assert 46.5e9 < total < 47.5e9 and 13.0e9 < active < 13.4e9  # docs/recipe.md "Models": 47.0B, 13.2B


@pytest.mark.parametrize("mode", ["topk_softmax", "softmax_topk_renorm"])
def test_mixtral_export_gives_our_logits(dense, tmp_path, mode):
    import transformers
    from export import save_hf
    moe = upcycle(dense, tmp_path / "moe", "--noise_ratio=0.05", "--router_init_std=0.5", f"--moe_router={mode}")
    _, enc, _ = load_checkpoint(tmp_path / "moe")
    save_hf(moe, enc, tmp_path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == 2
    idx = torch.randint(0, moe.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = moe(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_mixtral_export_refuses_what_it_cannot_express(dense, tmp_path):
    from export import save_hf
    moe = upcycle(dense, tmp_path / "moe", "--moe_router=softmax_topk")
    _, enc, _ = load_checkpoint(tmp_path / "moe")
    with pytest.raises(ValueError, match="Mixtral cannot express"):
        save_hf(moe, enc, tmp_path / "hf")
