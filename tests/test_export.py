"""Claims about export.py and serve.py: the Hugging Face export is the same model (transformers' Llama gives our logits and our
greedy tokens, GQA, tied embeddings and any RoPE theta included), the exported tokenizer gives our ids, and the
terminal chat streams whole characters, forgets the oldest turns when the context is full, and runs end to end."""

import io
import os
import subprocess
import sys

import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import serve  # noqa: E402  (its script flow runs only under __main__)
from export import save_hf  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import render_chat, special_id  # noqa: E402

MIXED = ("タヌキは日本の里山に暮らす。The tanuki is a canid 🦝🍵! "
         "価格は1,280円、GPT-4oと比べて3.5倍速い。\n  改行 と  空白")


def checkpoint(directory, enc, **overrides):
    """A tiny random model saved as a checkpoint; returns the directory. n_kv_head < n_head exercises GQA, and
    init_std 0.2 makes attention sharp enough that a wrong RoPE or head layout moves the logits far past 1e-4."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=enc.n_vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=160,
                                max_seq_len=128, init_std=0.2), **overrides})
    save_checkpoint(directory, Transformer(cfg), enc, stage="test")
    return directory


def export(ckpt, out):
    model, enc, _ = load_checkpoint(ckpt)
    save_hf(model, enc, out)
    return model, transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie,theta", [(False, 10000.0), (True, 500000.0)])
def test_transformers_llama_gives_our_logits(tmp_path, enc, tie, theta):
    model, hf = export(checkpoint(tmp_path / "ckpt", enc, tie_embeddings=tie, rope_theta=theta), tmp_path / "hf")
    assert hf.config.num_key_value_heads == 2 and hf.config.rope_parameters["rope_theta"] == theta
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, enc.n_vocab, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.std() > 1  # the logits are far from uniform, so 1e-4 is a real bound
    assert (ours - theirs).abs().max() < 1e-4


def test_bfloat16_export_halves_the_file_and_keeps_the_weights(tmp_path, enc):
    model, _, _ = load_checkpoint(checkpoint(tmp_path / "ckpt", enc))
    save_hf(model, enc, tmp_path / "f32")
    save_hf(model, enc, tmp_path / "bf16", dtype=torch.bfloat16)
    sizes = [os.path.getsize(tmp_path / d / "model.safetensors") for d in ("f32", "bf16")]
    assert abs(sizes[0] / sizes[1] - 2) < 0.01
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.layers[1].self_attn.k_proj.weight, model.blocks[1].attn.wk.weight.bfloat16())


def test_greedy_generation_matches_transformers(tmp_path, enc):
    model, hf = export(checkpoint(tmp_path / "ckpt", enc), tmp_path / "hf")
    prompt, _ = render_chat(enc, [{"role": "user", "content": "タヌキについて教えて"}], add_generation_prompt=True)
    stops = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
    ours = model.generate([prompt], 10, stop_tokens=stops, temperature=0)[0]
    # generate() reads its stop tokens from the exported generation_config.json
    assert set(hf.generation_config.eos_token_id) == set(stops)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=10)
    theirs = [t for t in out[0, len(prompt):].tolist() if t not in stops]
    assert len(ours) > 0 and ours == theirs


def test_exported_tokenizer_gives_our_ids(tmp_path, enc):
    export(checkpoint(tmp_path / "ckpt", enc), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode(MIXED, add_special_tokens=False) == enc.encode_ordinary(MIXED)
    assert hf_tok.decode(enc.encode_ordinary(MIXED)) == MIXED
    # vLLM renders chats with the exported template: it must match the one SFT trained on
    messages = [{"role": "system", "content": "丁寧に答えて"}, {"role": "user", "content": MIXED}]
    ids, _ = render_chat(enc, messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids


def test_stream_reply_prints_only_whole_characters(enc):
    # "狸" is 3 bytes of UTF-8: fed one byte token at a time, nothing may print until the character is whole
    byte_ids = [enc.encode_single_token(bytes([b])) for b in "狸🦝".encode()]
    end = special_id(enc, "<|end|>")

    class FakeModel:
        def stream(self, prompts, max_new_tokens, stop_tokens=(), **sampling):
            assert end in stop_tokens
            yield from ([t] for t in byte_ids + [end])

    writes = []
    out = io.StringIO()
    out.write = writes.append
    assert serve.stream_reply(FakeModel(), enc, [0], 20, out=out) == "狸🦝"
    assert [w for w in writes if w] == ["狸", "🦝", "\n"]


def test_ctrl_c_ends_the_reply_and_keeps_what_was_said(enc):
    class FakeModel:
        def stream(self, prompts, max_new_tokens, **sampling):
            yield from ([t] for t in enc.encode_ordinary("タヌキは"))
            raise KeyboardInterrupt

    out = io.StringIO()
    assert serve.stream_reply(FakeModel(), enc, [0], 20, out=out) == "タヌキは"
    assert out.getvalue() == "タヌキは\n"


def test_fit_context_forgets_the_oldest_exchanges_but_keeps_the_system_prompt(enc):
    system = {"role": "system", "content": "簡潔に"}
    turns = [{"role": r, "content": f"{r} turn {i} " * 5} for i in range(4) for r in ("user", "assistant")]
    messages = [system] + turns + [{"role": "user", "content": "last question"}]
    full, _ = render_chat(enc, messages, add_generation_prompt=True)
    ids, kept = serve.fit_context(enc, messages, len(full) - 1)
    assert kept == [system] + turns[2:] + messages[-1:] and len(ids) < len(full)
    assert serve.fit_context(enc, messages, len(full)) == (full, messages)
    assert serve.fit_context(enc, messages, 5)[0] is None  # not even the last message fits


def run_serve(*args, stdin=""):
    return subprocess.run([sys.executable, "serve.py", *map(str, args)], cwd=ROOT, input=stdin.encode(),
                          capture_output=True, timeout=120)


def test_chat_runs_in_a_terminal_session(tmp_path, enc):
    ckpt = checkpoint(tmp_path / "ckpt", enc)
    result = run_serve(f"--init_from={ckpt}", "--chat", "--max_new_tokens=5", "--system_prompt=丁寧に答えて",
                       stdin="こんにちは\n\n/reset\nhello\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr.decode()
    replies = result.stdout.decode("utf-8").split("\n")
    assert len(replies) == 3 and replies[-1] == ""  # one line per question; /quit stops before "never read"
    assert "conversation cleared" in result.stderr.decode()


def test_export_from_the_command_line(tmp_path, enc):
    result = run_serve(f"--init_from={checkpoint(tmp_path / 'ckpt', enc)}", f"--export_hf={tmp_path / 'hf'}",
                       "--dtype=bfloat16")
    assert result.returncode == 0, result.stderr.decode()
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def test_config_typo_is_an_error_that_names_the_key(tmp_path):
    result = run_serve(f"--init_from={tmp_path}", "--max_new_tokns=5")
    assert result.returncode != 0
    assert "max_new_tokns" in result.stderr.decode() and "max_new_tokens" in result.stderr.decode()
