"""Claims about sft.py and the model pieces it adds: the loss covers exactly the assistant's tokens; conversations
packed into one sequence compute exactly what they compute alone (and without the per-document positions and mask
they would not); LoRA starts from the base model, trains only its adapters, merges into the same function and can be
switched off (DPO's reference); a tiny SFT run lowers the held-out loss on synth.py's offline tasks, survives broken
lines, and writes a checkpoint that checkpoint.load_checkpoint loads and that chats."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model import LoRALinear, ModelConfig, Transformer, add_lora, lora_disabled, merge_lora  # noqa: E402
from synth import offline_tasks  # noqa: E402
from tokenizer import render_chat, special_id  # noqa: E402

SFT = os.path.join(ROOT, "sft.py")


def tiny_model(enc, seed=0, **overrides):
    # init_std 0.2: sharp attention, so a leak between documents or a wrong position moves the logits far past 1e-5
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=enc.n_vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                                ffn_hidden=160, max_seq_len=256, init_std=0.2), **overrides})
    return Transformer(cfg).eval()


def conversations(n, seed=0):
    """n conversations of synth.py's offline verifiable tasks, with the known answer as the assistant turn."""
    return [{"messages": [{"role": "user", "content": t["turns"][0]}, {"role": "assistant", "content": t["answer"]}]}
            for t in offline_tasks(n, seed)]


def test_loss_mask_covers_exactly_the_assistant_spans(enc):
    messages = [{"role": "system", "content": "簡潔に答えてください。"}, {"role": "user", "content": "2+3は?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4*4?"},
                {"role": "assistant", "content": "16, since 4 x 4 = 16."}]
    ids, mask = render_chat(enc, messages)
    assert len(ids) == len(mask)
    end = special_id(enc, "<|end|>")
    # the masked tokens, in order, are each assistant reply followed by its <|end|>: nothing else, nothing missing
    expected = [tok for m in messages if m["role"] == "assistant" for tok in enc.encode_ordinary(m["content"]) + [end]]
    assert [t for t, m in zip(ids, mask) if m] == expected
    # sft.py's targets: the next token where the mask of that target is 1, else -1 (ignored by the loss)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert [t for t in targets if t != -1] == expected
    assert mask[ids.index(special_id(enc, "<|assistant|>"))] == 0  # the role token is given, never predicted


def per_token_loss(logits, targets):
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                           reduction="none")


def test_packed_sequences_give_the_losses_of_one_by_one(enc):
    model = tiny_model(enc)
    docs = []
    for c in conversations(3, seed=1):
        ids, mask = render_chat(enc, c["messages"])
        docs.append((torch.tensor(ids[:-1]), torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])))
    x, y = torch.cat([d[0] for d in docs])[None], torch.cat([d[1] for d in docs])[None]
    doc_ids = torch.cat([torch.full_like(d[0], i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = per_token_loss(model(x, doc_ids=doc_ids)[0], y)
        leaky = per_token_loss(model(x)[0], y)  # the same row as one document: later ones see earlier ones
        alone = torch.cat([per_token_loss(model(d[0][None])[0], d[1][None]) for d in docs])
        # the batch loss sft.py trains on is the mean over the trained tokens of all the packed conversations
        assert abs(model(x, y, doc_ids=doc_ids)[1] - alone[y.view(-1) != -1].mean()) < 1e-5
    first = len(docs[0][0])
    assert (packed - alone).abs().max() < 1e-5
    assert (leaky[:first] - alone[:first]).abs().max() < 1e-5  # the first document is unaffected either way ...
    assert (leaky[first:] - alone[first:]).abs().max() > 1e-2  # ... the others differ: the test can fail


def with_random_adapters(model, **kwargs):
    """add_lora, then B drawn at random (it starts at zero) so that the adapters change the function."""
    return randomize_b(add_lora(model, rank=4, alpha=8.0, **kwargs))


def randomize_b(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)
    return model


def test_lora_starts_at_the_base_model_and_switches_off(enc):
    model = tiny_model(enc)
    idx = torch.randint(0, enc.n_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(idx)[0]
        add_lora(model, rank=4, alpha=8.0)
        assert torch.equal(model(idx)[0], base)  # B = 0: the first step starts from exactly the base model
        randomize_b(model)
        adapted = model(idx)[0]
        with lora_disabled(model):
            disabled = model(idx)[0]
        assert torch.equal(model(idx)[0], adapted)  # switched back on after the block
    assert (adapted - base).abs().max() > 1e-2
    assert torch.equal(disabled, base)


def test_lora_merged_weights_give_the_adapted_logits(enc):
    model = with_random_adapters(tiny_model(enc))
    plain_names = set(tiny_model(enc).state_dict())
    idx = torch.randint(0, enc.n_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(idx)[0]
        merged = merge_lora(copy.deepcopy(model))
        assert (merged(idx)[0] - adapted).abs().max() < 1e-4
    assert set(merged.state_dict()) == plain_names  # a plain checkpoint: every loader reads it
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())


def test_lora_trains_only_the_adapters(enc):
    model = with_random_adapters(tiny_model(enc).train(), dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    # every attention and dense FFN projection carries one A and one B
    assert len(trainable) == 2 * 7 * model.cfg.n_layer
    idx = torch.randint(0, enc.n_vocab, (2, 41), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name


def sft(*args, expect_fail=False, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + [SFT, *args, "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)
    assert (out.returncode != 0) == expect_fail, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, enc):
    """A tiny LoRA SFT run on 400 offline tasks, from a random checkpoint, with four broken lines in the data."""
    tmp = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    save_checkpoint(tmp / "base", Transformer(ModelConfig(vocab_size=enc.n_vocab, d_model=64, n_layer=2, n_head=4,
                                                          n_kv_head=2, ffn_hidden=160, max_seq_len=128)),
                    enc, stage="test")
    lines = [json.dumps(c, ensure_ascii=False) for c in conversations(400)]
    lines[7] = lines[7][:30]  # cut mid-record, as a killed writer leaves it
    lines[50] = json.dumps({"messages": [{"role": "robot", "content": "?"}]})  # valid JSON, not a conversation
    raw = [line.encode() for line in lines]
    raw.insert(100, b'{"messages": "not utf-8 \xff\xfe"}')  # becomes line 101
    raw.insert(200, b"[" * 100_000)  # valid JSON too deep for the parser: line 201
    (tmp / "chat.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    args = [f"--init_from={tmp / 'base'}", f"--data={tmp / 'chat.jsonl'}", f"--out_dir={tmp / 'out'}",
            "--dtype=float32", "--seq_len=128", "--batch_size=8", "--micro_batch_size=4", "--max_iters=30",
            "--lora_rank=8", "--lora_alpha=16.0", "--learning_rate=1e-2", "--warmup_iters=3", "--log_interval=5",
            "--eval_interval=30", "--checkpoint_interval=15", "--val_every=10"]
    out = sft(*args)
    return tmp, out, [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


def test_tiny_sft_lowers_held_out_loss_and_writes_a_loadable_checkpoint(run, enc):
    tmp, _, records = run
    val = [r["val_loss"] for r in records if "val_loss" in r]
    # from a random base with the embeddings and lm_head frozen, 30 LoRA steps: 6.21 -> 5.84 (uniform is 6.24)
    assert len(val) == 2 and val[1] < val[0] - 0.25, val
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
    # the keys every training stage logs (docs/design.md "Command line")
    assert all(k in steps[-1] for k in ("step", "loss", "lr", "grad_norm", "tokens", "skipped"))
    model, loaded_enc, meta = load_checkpoint(tmp / "out" / "model")
    assert meta["stage"] == "sft" and meta["step"] == 30 and loaded_enc.n_vocab == enc.n_vocab
    # the merged model is a plain Transformer: what serve.py's chat runs
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    prompt, _ = render_chat(enc, conversations(1, seed=5)[0]["messages"][:1], add_generation_prompt=True)
    reply = model.eval().generate([prompt], max_new_tokens=8, stop_tokens=[special_id(enc, "<|end|>")],
                                  temperature=0)[0]
    assert len(reply) > 0
    # only the adapters moved: the norms, which LoRA never wraps, are still the base model's
    base, _, _ = load_checkpoint(tmp / "base")
    assert torch.equal(model.norm.weight, base.norm.weight)
    assert not torch.equal(model.blocks[0].attn.wq.weight, base.blocks[0].attn.wq.weight)


def test_broken_lines_are_counted_and_skipped(run):
    _, out, records = run
    assert records[0]["broken"] == 4 and records[0]["conversations"] == 398
    assert "broken_json x1 (first at " in out.stdout and "chat.jsonl:8)" in out.stdout  # cut mid-record
    assert "chat.jsonl:51: skipped, not a conversation" in out.stdout
    assert "invalid_utf8 x1" in out.stdout and "chat.jsonl:101)" in out.stdout
    assert "nested_too_deep x1" in out.stdout and "chat.jsonl:201)" in out.stdout


def test_full_fine_tuning_padded_two_ranks_and_resume(run):
    tmp, _, _ = run
    common = [f"--init_from={tmp / 'base'}", f"--data={tmp / 'chat.jsonl'}", "--dtype=float32", "--seq_len=128",
              "--batch_size=4", "--micro_batch_size=2", "--lora_rank=0", "--packing=False", "--learning_rate=1e-3",
              "--log_interval=1", "--eval_interval=100", "--checkpoint_interval=2"]
    sft(*common, f"--out_dir={tmp / 'full'}", "--max_iters=4")
    # 2 ranks x 1 micro-batch of 2 rows: the same global batch, the same mean over its tokens
    sft(*common, f"--out_dir={tmp / 'two'}", "--max_iters=4", nproc=2)
    sft(*common, f"--out_dir={tmp / 'half'}", "--max_iters=2")
    # a checkpoint without its manifest (as older versions wrote them) is refused unless the user trusts it
    for manifest in (tmp / "half" / "checkpoints").glob("step_*/manifest.json"):
        manifest.unlink()
    refused = sft(*common, f"--out_dir={tmp / 'half'}", "--max_iters=4", "--resume=auto", expect_fail=True)
    assert "trust_unverified_checkpoint" in refused.stdout + refused.stderr
    # resume from step 2 to 4: the same batches and the same losses as the uninterrupted run
    out = sft(*common, f"--out_dir={tmp / 'half'}", "--max_iters=4", "--resume=auto",
              "--trust_unverified_checkpoint=True")
    assert "resumed from" in out.stdout
    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (tmp / d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    full, half, two = losses("full"), losses("half"), losses("two")
    assert all(abs(full[s] - half[s]) < 1e-6 for s in (1, 2, 3, 4)), (full, half)
    assert all(abs(full[s] - two[s]) < 1e-5 for s in (1, 2, 3, 4)), (full, two)
    assert full[4] < full[1]
    model, _, _ = load_checkpoint(tmp / "full" / "model")
    base, _, _ = load_checkpoint(tmp / "base")
    assert not torch.equal(model.norm.weight, base.norm.weight)  # full fine-tuning moves every weight


def test_unknown_config_key_fails(tmp_path):
    out = sft("--lora_rnak=4", f"--out_dir={tmp_path}", expect_fail=True)
    assert "unknown config key 'lora_rnak'" in out.stderr and "lora_rank" in out.stderr
