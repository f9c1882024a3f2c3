"""Claims about eval.py: Bradley-Terry ratings recover simulated players' order and gaps, with intervals that cover the
truth; strict scoring accepts only the bare option label while lenient finds it in "2. マザーボード"
(docs/recipe.md "Evaluation": format compliance apart from knowledge); log-likelihood multiple choice is the summed
log-prob of each option computed directly; an MT-Bench judge that gives no rating is retried, then counted, and its cache makes a re-run
send nothing (against serve.py on 127.0.0.1); and the whole script fills every section of eval.json with numbers."""

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402  (its script flow runs only under __main__)
import api_server  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from llm_api import parse_rating  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import encode_batch, render_chat, save_tokenizer, tokenizer_hash  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
MT_BENCH = os.path.join(DATA, "mt_bench_sample.jsonl")


def tiny_model(enc, max_seq_len=256, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=enc.n_vocab, d_model=32, n_layer=2, n_head=2, n_kv_head=1, ffn_hidden=64,
                      max_seq_len=max_seq_len, init_std=0.2)
    return Transformer(cfg).eval()


# -----------------------------------------------------------------------------
# arena

def simulate(true_elo, n_battles, rng, tie_rate=0.0):
    """Battles between random pairs, the winner drawn from the Bradley-Terry probability of the true ratings. Ties
    (at a rate that ignores strength) are not in the model: counted as half wins, they pull ratings together."""
    names = list(true_elo)
    records = []
    for _ in range(n_battles):
        a, b = rng.choice(len(names), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((true_elo[names[b]] - true_elo[names[a]]) / 400))
        u = rng.random()
        winner = "tie" if u < tie_rate else "model_a" if rng.random() < p_a else "model_b"
        records.append({"model_a": names[a], "model_b": names[b], "winner": winner})
    return records


def test_bradley_terry_recovers_order_gaps_and_intervals():
    true_elo = {"calm3": 1250.0, "tanuki-8x8b": 1150.0, "tanuki-8b": 1000.0, "small": 850.0, "tiny": 700.0}
    covered, total = 0, 0
    for trial in range(8):
        rng = np.random.default_rng(trial)
        fit = ev.arena_ratings(simulate(true_elo, 3000, rng), anchor="tanuki-8b", anchor_rating=1000.0,
                               n_bootstrap=100, seed=trial)
        order = sorted(fit, key=lambda p: -fit[p]["rating"])
        assert order == sorted(true_elo, key=lambda p: -true_elo[p])
        assert fit["tanuki-8b"]["rating"] == pytest.approx(1000.0)  # the anchor sits where it was pinned
        for p, elo in true_elo.items():
            assert abs(fit[p]["rating"] - elo) < 60, (p, fit[p], elo)  # gaps of 100-150 points are recovered
            assert fit[p]["ci_low"] <= fit[p]["rating"] <= fit[p]["ci_high"]
            if p != "tanuki-8b":
                covered += fit[p]["ci_low"] <= elo <= fit[p]["ci_high"]
                total += 1
    assert covered / total >= 0.8, f"95% intervals covered the truth {covered}/{total} times"


def test_bradley_terry_keeps_an_unbeaten_player_finite():
    records = [{"model_a": "a", "model_b": "b", "winner": "model_a"}] * 20
    fit = ev.arena_ratings(records, n_bootstrap=10)
    assert all(math.isfinite(v) for p in fit.values() for v in (p["rating"], p["ci_low"], p["ci_high"]))
    assert fit["a"]["rating"] > fit["b"]["rating"]


# -----------------------------------------------------------------------------
# strict vs lenient

FIXTURE = [  # (reply, strict, lenient) for the answer "2"
    ("2", True, True),
    (" 2\n", True, True),               # surrounding whitespace is not a format error
    ("2.", False, True),
    ("2. マザーボード", False, True),   # docs/recipe.md "Evaluation": what most open models answered on Jaster
    ("答えは2です", False, True),
    ("２", False, True),                # full width: NFKC makes it the label
    ("12", False, False),               # another number, not the label
    ("2.5", False, False),
    ("3. CPU", False, False),
]


def test_strict_counts_only_the_bare_label_and_lenient_finds_it():
    answers, replies = ["2"] * len(FIXTURE), [r for r, _, _ in FIXTURE]
    strict, lenient = ev.pass_rates(answers, replies)
    assert strict == pytest.approx(sum(s for _, s, _ in FIXTURE) / len(FIXTURE))
    assert lenient == pytest.approx(sum(ln for _, _, ln in FIXTURE) / len(FIXTURE))
    for reply, s, ln in FIXTURE:
        assert ev.pass_rates(["2"], [reply]) == (float(s), float(ln)), reply


def test_choice_task_options_are_parsed_from_the_prompt():
    prompt = "次のうち、12×3と等しいものはどれですか。\n1. 36\n2. 39\n3. 33\n4. 48\n番号のみで答えてください。"
    q = ev.mc_from_task({"messages": [{"role": "user", "content": prompt}], "answer": "1", "lang": "ja"})
    assert q["question"] == "次のうち、12×3と等しいものはどれですか。"
    assert q["choices"] == ["36", "39", "33", "48"] and q["labels"] == ["1", "2", "3", "4"]
    assert q["prompt"] == prompt and q["answer"] == "1"
    # the mc_file format: a 0-based index or a label, the prompt built from question + numbered options
    r = ev.mc_normalized({"question": "Which is a fruit?", "choices": ["stone", "apple"], "answer": 1, "lang": "en"})
    assert r["answer"] == "2"
    assert r["prompt"] == "Which is a fruit?\n1. stone\n2. apple\nAnswer with the option number only."
    r = ev.mc_normalized({"question": "q", "choices": ["x", "y", "z"], "labels": ["0", "1", "2"], "answer": "2"})
    assert r["answer"] == "2" and r["labels"].index(r["answer"]) == 2


# -----------------------------------------------------------------------------
# log-likelihood multiple choice

def test_loglikelihood_choice_equals_a_direct_computation(enc):
    model = tiny_model(enc)
    questions = [ev.mc_normalized({"question": "タヌキの好物はどれですか。", "choices": ["木の実", "石", "とても長い鉄の棒"],
                                   "answer": 0, "lang": "ja"}),
                 ev.mc_normalized({"question": "Which day follows Monday?", "choices": ["Tuesday", "Sunday"],
                                   "answer": "1", "lang": "en"})]
    direct = []
    for q in questions:
        ctx = render_chat(enc, [{"role": "user", "content": q["prompt"]}], add_generation_prompt=True)[0]
        for choice in q["choices"]:
            cont = enc.encode_ordinary(choice)
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0][0].float(), dim=-1)
            direct.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    prompts = [q["prompt"] for q in questions for _ in q["choices"]]
    options = [c for q in questions for c in q["choices"]]
    for bs in (1, 16):  # padded batches give the unpadded numbers
        assert ev.continuation_logprobs(model, enc, prompts, options, bs) == pytest.approx(direct, abs=1e-4)
    acc, acc_norm, preds = ev.ll_choice(model, enc, questions)
    want = [q["labels"][int(np.argmax(direct[k : k + len(q["choices"])]))]
            for q, k in zip(questions, (0, len(questions[0]["choices"])))]
    assert preds == want
    assert acc == np.mean([p == q["answer"] for p, q in zip(preds, questions)])
    assert 0 <= acc_norm <= 1


# -----------------------------------------------------------------------------
# MT-Bench judge


def test_parse_rating():
    assert parse_rating("丁寧で正確です。評価：[[8]]") == 8
    assert parse_rating("Good answer.\nRating: [[7]]") == 7
    assert parse_rating("全角でも 評価：［［９］］") == 9
    assert parse_rating("format is [[N]] ... Rating: [[6.5]]") == 6.5
    for text in ("評価：8", "Rating: 8/10", "[[11]]", "[[0]]", ""):
        assert parse_rating(text) is None, text


class CountingServer(api_server.Server):
    """serve.py's server, counting the generation requests it is sent."""
    requests = 0

    def submit(self, job):
        self.requests += 1
        super().submit(job)


def test_unparsable_judge_is_retried_counted_and_cached(tmp_path, enc):
    # a random tiny model never writes "[[N]]": every judgment is unparsable. Its context holds the judge prompt.
    server = CountingServer(tiny_model(enc, max_seq_len=2048), enc, port=0, model_name="judge")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        questions = ev.read_jsonl(MT_BENCH)[:2]
        answers = [["回答その一", "回答その二"], ["答え", "二つ目の答え"]]
        judge = {"url": f"http://127.0.0.1:{server.server_address[1]}/v1", "key": "", "model": "judge"}
        cache = str(tmp_path / "judge_cache.jsonl")
        scores, sent = ev.judge_mt_bench(questions, answers, judge, cache, retries=2, max_tokens=8)
        assert sent == 4 and server.requests == 4 * 3  # 4 turns, each asked 1 + 2 times
        assert scores == [[None, None], [None, None]]  # never a made-up score
        summary = ev.mt_bench_summary(questions, scores)
        assert summary["unparsable"] == 4 and summary["rated_turns"] == 0 and summary["score"] is None
        again, sent = ev.judge_mt_bench(questions, answers, judge, cache, retries=2, max_tokens=8)
        assert again == scores and sent == 0 and server.requests == 12  # the re-run costs nothing
        # a changed answer is a new judgment: only that one is sent
        answers[1][1] = "別の答え"
        _, sent = ev.judge_mt_bench(questions, answers, judge, cache, retries=0, max_tokens=8)
        assert sent == 1 and server.requests == 13
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# end to end: eval.py on a tiny checkpoint, data dir, offline tasks, MT-Bench sample and arena file


class FixedJudge(BaseHTTPRequestHandler):
    """A judge that always answers in the Japanese MT-Bench format with 7."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "簡潔です。評価：[[7]]"},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def write_source(data_dir, name, enc, texts):
    """One source in prepare_data.py's layout, the same texts in train and val (eval.py reads val only)."""
    where = os.path.join(data_dir, name)
    os.makedirs(where)
    ids = np.concatenate([np.array(d, dtype=np.uint16) for d in encode_batch(enc, texts)])
    meta = {"source": name, "dtype": "uint16", "vocab_size": enc.n_vocab, "tokenizer_hash": tokenizer_hash(enc)}
    for split in ("train", "val"):
        ids.tofile(os.path.join(where, f"{split}_000000.bin"))
        meta[split] = {"files": [f"{split}_000000.bin"], "tokens": len(ids), "documents": len(texts)}
    with open(os.path.join(where, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_eval_end_to_end_fills_every_section(tmp_path, enc):
    checkpoint, data_dir, synth_dir = tmp_path / "ckpt", str(tmp_path / "data"), tmp_path / "synth"
    save_checkpoint(checkpoint, tiny_model(enc, max_seq_len=512), enc, stage="test")
    os.makedirs(data_dir)
    save_tokenizer(enc, data_dir)
    for name in ("ja", "en"):
        text = open(os.path.join(DATA, f"{name}_sample.txt"), encoding="utf-8").read()
        write_source(data_dir, name, enc, [p for p in text.split("\n") if p.strip()])
    with open(os.path.join(data_dir, "stats.json"), "w") as f:  # prepare_data.py's last file: the dir is complete
        f.write("{}")
    subprocess.run([sys.executable, "synth.py", f"--out_dir={synth_dir}", "--num_samples=25"], cwd=ROOT, check=True,
                   capture_output=True)
    arena = tmp_path / "arena.jsonl"
    rng = np.random.default_rng(0)
    battles = simulate({"a": 1100.0, "b": 1000.0, "c": 900.0}, 300, rng, tie_rate=0.1)
    arena.write_bytes("\n".join(json.dumps(r) for r in battles).encode() + b"\n\xff\n" + b"[" * 100_000 + b"\n")
    judge = ThreadingHTTPServer(("127.0.0.1", 0), FixedJudge)
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    out = tmp_path / "eval"
    try:
        run = subprocess.run([sys.executable, "eval.py", f"--init_from={checkpoint}", f"--out_dir={out}",
                              f"--data_dir={data_dir}", "--val_windows=4", "--val_seq_len=64",
                              f"--tasks_file={synth_dir / 'chat.jsonl'}", "--max_new_tokens=8",
                              f"--mt_bench_file={MT_BENCH}", "--mt_bench_max_tokens=8",
                              f"--judge_base_url=http://127.0.0.1:{judge.server_address[1]}/v1", "--judge_model=fixed",
                              f"--arena_file={arena}", "--bootstrap=20", "--device=cpu"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    finally:
        judge.shutdown()
        judge.server_close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "arena.jsonl:301" in run.stderr and "arena.jsonl:302" in run.stderr  # bad lines named and skipped
    result = json.loads((out / "eval.json").read_text())
    numbers = lambda *xs: all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)
    assert set(result["val"]) == {"ja", "en"}
    assert all(numbers(v["loss"], v["perplexity"]) and v["tokens"] == 4 * 64 for v in result["val"].values())
    mc = result["mc"]
    assert mc["questions"] == 5 and numbers(mc["strict"], mc["lenient"], mc["ll_acc"], mc["ll_acc_norm"], mc["chance"])
    tasks = result["tasks"]
    assert tasks["tasks"] == 25 and numbers(tasks["strict"], tasks["lenient"])
    assert set(tasks["kinds"]) == {"arithmetic", "comparison", "date", "unit", "choice"}
    mt = result["mt_bench"]
    assert mt["score"] == 7 and mt["rated_turns"] == 16 and mt["unparsable"] == 0 and len(mt["categories"]) == 8
    assert result["arena"]["a"]["rating"] > result["arena"]["c"]["rating"]
    assert all(numbers(v["rating"], v["ci_low"], v["ci_high"]) for v in result["arena"].values())
    assert "mt_bench score" in run.stdout and "arena a" in run.stdout
    assert len((out / "answers.jsonl").read_text().splitlines()) == 25
