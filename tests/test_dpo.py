"""Claims about dpo.py: its loss is the DPO formula (with label smoothing and the DPO-Positive term); the reference
log-probs computed once before training equal the policy's with its LoRA adapters switched off, during training;
sampling and judging run through serve.py's real HTTP server, and a judge reply without a rating is retried, then
counted, never given a score; the sample step resumes where it stopped; and end to end on a tiny model with the
offline verifier as the judge, DPO raises the held-out reward accuracy above 0.5 and reports the verifier's pass rate
of fresh answers before and after."""

import json
import math
import os
import random
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402  (its script flow runs only under __main__)
import api_server  # noqa: E402
import textfilters as tf  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer, add_lora, lora_disabled  # noqa: E402
from synth import offline_tasks  # noqa: E402
from tokenizer import render_chat, special_id  # noqa: E402

DPO = os.path.join(ROOT, "dpo.py")
SFT = os.path.join(ROOT, "sft.py")


def tiny_model(enc, seed=0, max_seq_len=128):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=enc.n_vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                                   ffn_hidden=160, max_seq_len=max_seq_len))


def run(script, *args, nproc=1, expect_fail=False):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + [script, *args, "--device=cpu", "--dtype=float32"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                         check=False)
    assert (out.returncode != 0) == expect_fail, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# -----------------------------------------------------------------------------
# the loss and the reference


def test_dpo_loss_equals_a_hand_computation():
    pi_c, pi_r = torch.tensor([-12.0, -3.5, -40.0]), torch.tensor([-15.0, -2.0, -41.0])
    ref_c, ref_r = torch.tensor([-13.0, -3.0, -38.0]), torch.tensor([-14.0, -2.5, -42.0])
    beta = 0.1
    for ls, lam in ((0.0, 0.0), (0.01, 0.0), (0.0, 50.0), (0.01, 50.0)):
        loss, reward_c, reward_r = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, ls, lam)
        for i in range(3):
            pc, pr, rc, rr = pi_c[i].item(), pi_r[i].item(), ref_c[i].item(), ref_r[i].item()
            h = (pc - rc) - (pr - rr) - lam * max(0.0, rc - pc)
            log_sigmoid = lambda z: -math.log(1 + math.exp(-z))
            expected = -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
            assert abs(loss[i].item() - expected) < 1e-6, (ls, lam, i)
            assert abs(reward_c[i].item() - beta * (pc - rc)) < 1e-6
            assert abs(reward_r[i].item() - beta * (pr - rr)) < 1e-6
    # the plain loss by the formula: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    assert abs(dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)[0][0].item() - math.log(1 + math.exp(-0.1 * 2.0))) < 1e-6
    # DPO-Positive only acts when the chosen answer fell below the reference: pair 2 (pi_c < ref_c), not pair 0
    plain, dpop = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)[0], dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, 0, 5)[0]
    assert plain[0] == dpop[0] and dpop[2] > plain[2]
    # accuracy: ties count half, so the untrained policy (every reward 0) is at chance
    assert dpo.reward_accuracy(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])).item() == 0.5
    assert dpo.reward_accuracy(torch.zeros(4), torch.zeros(4)).item() == 0.5


def test_response_logprobs_and_the_reference_with_adapters_off(enc):
    model = tiny_model(enc)
    tasks = offline_tasks(6, seed=3)
    rows = []
    for t in tasks:
        ids, mask = render_chat(enc, [{"role": "user", "content": t["turns"][0]},
                                      {"role": "assistant", "content": t["answer"]}])
        rows.append((ids[:-1], [x if m else -1 for x, m in zip(ids[1:], mask[1:])]))
    with torch.no_grad():
        batched = dpo.response_logprobs(model, rows, pad_id=0)
        # one by one, by hand: the log-softmax of each answer token (and its <|end|>) summed
        for (inputs, targets), got in zip(rows, batched):
            logp = F.log_softmax(model(torch.tensor([inputs]))[0][0].float(), dim=-1)
            want = sum(logp[t, y].item() for t, y in enumerate(targets) if y != -1)
            assert abs(got.item() - want) < 1e-4
        precomputed = dpo.response_logprobs(model, rows, pad_id=0)  # "precomputed": the policy before training
    add_lora(model, rank=4, alpha=8.0)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.1)  # as after some training: the adapters change the function
    with torch.no_grad():
        adapted = dpo.response_logprobs(model, rows, pad_id=0)
        with lora_disabled(model):
            on_the_fly = dpo.response_logprobs(model, rows, pad_id=0)
    assert torch.allclose(precomputed, on_the_fly, atol=1e-5)
    assert (adapted - precomputed).abs().max() > 1e-2


def test_only_the_sampled_answer_counts_in_a_multi_turn_prompt(enc):
    """A prompt with a system turn and an earlier assistant turn: the response is the sampled answer and its <|end|>
    alone (render_chat's mask marks every assistant turn: it would count the teacher's earlier answer too, moving the
    DPO-Positive term and the logged rewards, and pushing that turn up)."""
    prompt = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
              {"role": "assistant", "content": "4, since two and two make four."},
              {"role": "user", "content": "And 3 + 3?"}]
    answer = "6."
    inputs, targets = dpo.answer_rows(enc, prompt, answer)
    ids = render_chat(enc, prompt + [{"role": "assistant", "content": answer}])[0]
    assert inputs == ids[:-1] and len(targets) == len(inputs)
    response = enc.encode_ordinary(answer) + [special_id(enc, "<|end|>")]
    counted = [i for i, t in enumerate(targets) if t != -1]
    assert [targets[i] for i in counted] == response and counted == list(range(len(ids) - 1 - len(response),
                                                                                len(ids) - 1))


def test_sequence_logprobs_never_hold_the_whole_logits():
    """DPO's per-sequence log-probs of a (4, 512) batch at Tanuki's vocab of 65,536: no tensor of the forward or the
    backward is as large as the (4, 512, 65,536) logits (the per-row sums go chunk by chunk), and the sums equal
    those from full logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):  # the largest tensor any op makes, by number of elements
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    B, T, V = 4, 512, 65536
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, n_kv_head=1, ffn_hidden=32,
                                    max_seq_len=T))
    ids = torch.randint(0, V, (B, T + 1))
    rows = [(ids[r, :T].tolist(), [-1] * 100 + ids[r, 101:].tolist()) for r in range(B)]  # the last 412 count
    with Largest():
        logps = dpo.response_logprobs(model, rows, pad_id=0)
        logps.sum().backward()
    assert 0 < Largest.largest < B * T * V
    with torch.no_grad():
        logits = model(ids[:, :T])[0].double()
        want = torch.stack([logits[r].log_softmax(-1)[torch.arange(100, T), ids[r, 101:]].sum() for r in range(B)])
    assert torch.allclose(logps.detach().double(), want, rtol=1e-5)


def test_a_cut_answer_is_never_chosen(tmp_path):
    """An answer cut at max_new_tokens ranks below every finished one: training appends <|end|> to a chosen answer,
    and a cut one would teach stopping mid-answer. It may be rejected; a prompt with no finished answer is dropped;
    both are counted."""
    user = [{"role": "user", "content": "6 + 7 = ? 数字のみで答えてください。"}]
    base = {"messages": user, "answer": "13", "lang": "ja", "held_out": False, "eval": False, "greedy": None}
    records = [{**base, "id": 0, "samples": ["13", "答えは13です。", "7", "13"], "finished": [False, True, True, False]},
               {**base, "id": 1, "samples": ["13", "7"], "finished": [False, False]},
               {**base, "id": 2, "samples": ["13", "7"], "finished": [True, True]}]
    (tmp_path / "samples_0.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    dpo.judge_step(str(tmp_path))
    pairs = {p["id"]: p for p in read_jsonl(tmp_path / "pairs.jsonl")}
    assert sorted(pairs) == [0, 2]
    assert (pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["rejected_finished"]) == ("答えは13です。", "13", False)
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == ("13", "7")
    stats = json.load(open(tmp_path / "judge.json"))
    assert (stats["cut_answers"], stats["none_finished_dropped"], stats["cut_rejected"]) == (4, 1, 1)


def test_local_sampling_flags_answers_cut_at_max_new_tokens(monkeypatch, enc):
    """generate leaves the stop token out: an answer of max_new_tokens tokens never stopped."""
    class Model:
        def generate(self, ids, max_new, **_):
            return [[5, 6, 7], [5, 6], []][: len(ids)]
    monkeypatch.setattr(dpo, "max_new_tokens", 3, raising=False)
    monkeypatch.setattr(dpo, "top_p", 1.0, raising=False)
    conversations = [[{"role": "user", "content": "hi"}]] * 3
    assert dpo.local_generate(Model(), enc, conversations, 1.0, 0)[1] == [False, True, True]


# -----------------------------------------------------------------------------
# sampling and judging through a real server


class Served:
    """serve.py's server on 127.0.0.1 in a thread, counting the requests it is sent."""

    def __init__(self, model, enc, name):
        count = self.count = [0]

        class Counting(api_server.Server):
            def submit(self, job):
                count[0] += 1
                super().submit(job)

        self.server = Counting(model, enc, port=0, model_name=name)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def write_prompts(path, n, seed=0, broken=False):
    lines = []
    for i, t in enumerate(offline_tasks(n, seed)):
        lines.append(json.dumps({"id": i, "task": t["kind"], "lang": t["lang"], "answer": t["answer"],
                                 "messages": [{"role": "user", "content": t["turns"][0]},
                                              {"role": "assistant", "content": t["answer"]}]}, ensure_ascii=False))
    raw = [line.encode() for line in lines]
    if broken:  # lines 4, 6, 8 and 10
        raw.insert(3, raw[3][:25])  # cut mid-record
        raw.insert(5, json.dumps({"messages": [{"role": "assistant", "content": "no question"}]}).encode())
        raw.insert(7, b'{"messages": "not utf-8 \xff"}')
        raw.insert(9, b"[" * 100_000)  # valid JSON too deep for the parser
    path.write_bytes(b"\n".join(raw) + b"\n")


class RatingJudge(BaseHTTPRequestHandler):
    """A judge whose greedy first reply has no rating and whose retry (temperature > 0) rates the answer by its
    length: a retried judgment must be parsed, not skipped."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802  (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        answer = re.search(r"\[(?:アシスタントの回答|Assistant's answer) 1\]\n(.*)\n\n[^\n]*$", prompt, re.S).group(1)
        text = "よく書けています。" if body["temperature"] == 0 else f"講評。評価：[[{1 + len(answer) % 10}]]"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out.encode())))
        self.end_headers()
        self.wfile.write(out.encode())


def test_sampling_and_judging_through_serve(tmp_path, enc):
    ckpt = tmp_path / "policy"
    save_checkpoint(ckpt, tiny_model(enc, max_seq_len=2048), enc, stage="test")
    write_prompts(tmp_path / "prompts.jsonl", 8, broken=True)
    policy = Served(load_checkpoint(ckpt)[0].eval(), enc, "policy")
    judge = ThreadingHTTPServer(("127.0.0.1", 0), RatingJudge)
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    try:
        common = [f"--init_from={ckpt}", f"--prompts={tmp_path / 'prompts.jsonl'}", f"--sample_base_url={policy.url}",
                  "--samples_per_prompt=2", "--max_new_tokens=6", "--judge=llm", "--judge_max_tokens=8",
                  "--max_eval_prompts=2", "--steps=['sample', 'judge']"]
        # the tiny random model as the judge never writes "[[N]]": each judgment is asked 1 + 1 times, then counted
        out = run(DPO, *common, f"--out_dir={tmp_path / 'a'}", f"--judge_base_url={policy.url}",
                  "--judge_model=policy", "--judge_retries=1")
        assert "4 broken lines skipped" in out.stdout
        assert all(f"prompts.jsonl:{n}" in out.stdout for n in (4, 6, 8, 10)), out.stdout
        samples = dpo.read_answers(tmp_path / "a" / "round_0", "samples")
        assert sorted(r["id"] for r in samples) == list(range(8))
        # 8 prompts x 2 samples, plus one greedy answer for each of the 2 evaluated (held-out) prompts
        assert all(len(r["samples"]) == 2 for r in samples) and sum(r["greedy"] is not None for r in samples) == 1
        # finish_reason "length" from the server: a random model's 6-token answers are cut (never chosen)
        assert all(len(r["finished"]) == 2 for r in samples) and not all(f for r in samples for f in r["finished"])
        n_sampled = 8 * 2 + 1
        judged = json.load(open(tmp_path / "a" / "round_0" / "judge.json"))
        assert judged["unparsable"] == 8 * 2 and judged["pairs"] == 0 and judged["held_out_pairs"] == 0
        assert policy.count[0] == n_sampled + 8 * 2 * 2
        cache = read_jsonl(tmp_path / "a" / "round_0" / "judge_cache.jsonl")
        assert all(r["rating"] is None and r["attempts"] == 2 for r in cache)  # never a made-up score
        # the judge step again: every judgment is cached, nothing is sent
        run(DPO, *common[:-1], "--steps=['judge']", f"--out_dir={tmp_path / 'a'}", f"--judge_base_url={policy.url}",
            "--judge_model=policy", "--judge_retries=1")
        assert policy.count[0] == n_sampled + 8 * 2 * 2

        # a judge that answers on its retry: the ratings are parsed, and chosen is the better-rated answer (the
        # samples of run a, as if every answer had finished: a random model's are cut, and a cut one is never chosen)
        judge_url = f"http://127.0.0.1:{judge.server_address[1]}/v1"
        (tmp_path / "b" / "round_0").mkdir(parents=True)
        with open(tmp_path / "b" / "round_0" / "samples_0.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({**r, "finished": [True, True]}, ensure_ascii=False) + "\n" for r in samples)
        run(DPO, *common[:-1], "--steps=['judge']", f"--out_dir={tmp_path / 'b'}", f"--judge_base_url={judge_url}",
            "--judge_model=fixed")
        judged = json.load(open(tmp_path / "b" / "round_0" / "judge.json"))
        pairs = read_jsonl(tmp_path / "b" / "round_0" / "pairs.jsonl")
        assert judged["unparsable"] == 0 and len(pairs) == judged["pairs"] + judged["held_out_pairs"] > 0
        for p in pairs:
            assert p["chosen_score"] == 1 + len(p["chosen"]) % 10 > p["rejected_score"] == 1 + len(p["rejected"]) % 10
            assert p["prompt"][-1]["role"] == "user" and set(p) >= {"prompt", "chosen", "rejected"}
    finally:
        policy.close()
        judge.shutdown()
        judge.server_close()


def test_sample_step_resumes_after_a_cut_line(tmp_path, enc):
    ckpt = tmp_path / "policy"
    save_checkpoint(ckpt, tiny_model(enc), enc, stage="test")
    write_prompts(tmp_path / "prompts.jsonl", 12)
    common = [f"--init_from={ckpt}", f"--prompts={tmp_path / 'prompts.jsonl'}", f"--out_dir={tmp_path / 'out'}",
              "--samples_per_prompt=2", "--max_new_tokens=4", "--sample_batch_size=6", "--steps=['sample']"]
    run(DPO, *common, "--max_prompts=6")
    path = tmp_path / "out" / "round_0" / "samples_0.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # the last record cut mid-write, as a kill leaves it
    run(DPO, *common)
    ids = [r["id"] for r in read_jsonl(path)]
    assert sorted(ids) == list(range(12))  # every prompt once: the cut one again, the first five not again


# -----------------------------------------------------------------------------
# end to end with the offline verifier


def format_mixed_conversations(n, seed):
    """Offline tasks answered right, half of them bare ("13") and half in a sentence ("答えは13です。"): a model
    fine-tuned on them answers in either form, and the verifier prefers the bare one, the asked format."""
    rng = random.Random(seed)
    out = []
    for t in offline_tasks(n, seed):
        wordy = {"ja": f"答えは{t['answer']}です。", "en": f"The answer is {t['answer']}."}[t["lang"]]
        out.append({"messages": [{"role": "user", "content": t["turns"][0]},
                                 {"role": "assistant", "content": t["answer"] if rng.random() < 0.5 else wordy}]})
    return out


@pytest.fixture(scope="module")
def tiny_dpo(tmp_path_factory, enc):
    tmp = tmp_path_factory.mktemp("dpo")
    save_checkpoint(tmp / "base", tiny_model(enc), enc, stage="test")
    (tmp / "sft.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False)
                                             for c in format_mixed_conversations(800, seed=0)) + "\n", encoding="utf-8")
    run(SFT, f"--init_from={tmp / 'base'}", f"--data={tmp / 'sft.jsonl'}", f"--out_dir={tmp / 'sft'}",
        "--seq_len=128", "--batch_size=16", "--micro_batch_size=8", "--max_iters=60", "--lora_rank=0",
        "--learning_rate=3e-3", "--warmup_iters=5", "--eval_interval=60", "--checkpoint_interval=60")
    write_prompts(tmp / "prompts.jsonl", 400, seed=1)
    with open(tmp / "prompts.jsonl", "a", encoding="utf-8") as f:  # no room for a 12-token answer in 128
        f.write(json.dumps({"id": 9999, "answer": "13", "messages": [{"role": "user", "content": "7 + 6 = ? " * 40}]})
                + "\n")
    args = [f"--init_from={tmp / 'sft' / 'model'}", f"--prompts={tmp / 'prompts.jsonl'}", f"--out_dir={tmp / 'dpo'}",
            "--samples_per_prompt=4", "--max_new_tokens=12", "--sample_batch_size=100", "--seq_len=128",
            "--batch_size=16", "--micro_batch_size=8", "--epochs=4", "--lora_rank=8", "--lora_alpha=16.0",
            "--reference=adapters_off", "--learning_rate=3e-3", "--warmup_iters=3", "--beta=0.1", "--dpop_lambda=50",
            "--val_every=5",
            "--max_eval_prompts=80", "--log_interval=5", "--eval_interval=1000", "--checkpoint_interval=1000"]
    out = run(DPO, *args)
    return tmp, args, out


def test_tiny_dpo_raises_held_out_reward_accuracy_and_reports_pass_rates(tiny_dpo):
    tmp, _, out = tiny_dpo
    # one length rule for sampling and training: a prompt without room for a whole answer is skipped, not cut
    assert "1 without room for a 12-token answer in 128 skipped" in out.stdout
    assert 9999 not in [r["id"] for r in dpo.read_answers(tmp / "dpo" / "round_0", "samples")]
    summary = json.load(open(tmp / "dpo" / "summary.json"))
    r = summary["rounds"][0]
    print(json.dumps(r, indent=1))
    assert r["held_out_pairs"] >= 10 and r["pairs"] >= 50
    assert r["val_reward_accuracy_before"] == 0.5 and r["val_reward_accuracy_after"] > 0.5
    for key in ("pass_rate_before", "pass_rate_after", "greedy_pass_rate_before", "greedy_pass_rate_after",
                "score_before", "score_after"):
        assert isinstance(r[key], float) and 0 <= r[key] <= 3, key
    # the verifier grades a bare value above a sentence or noise, and DPO moves the model there: the greedy answers
    # go from noise (measured 0.025 of 3) to bare values (0.9). Plain DPO here lowers the chosen answers' likelihood
    # too (chosen reward < 0) and the greedy grade falls to 0: the DPO-Positive term is what keeps it up
    assert r["greedy_score_after"] > r["greedy_score_before"] + 0.3
    records = [json.loads(line) for line in open(tmp / "dpo" / "metrics.jsonl")]
    trained = [x for x in records if "loss" in x]
    assert all(k in trained[-1] for k in ("step", "loss", "lr", "grad_norm", "tokens", "skipped", "reward_chosen",
                                          "reward_rejected", "reward_accuracy", "reward_margin"))
    model, _, meta = load_checkpoint(tmp / "dpo" / "model")
    assert meta["stage"] == "dpo" and not any("lora" in n for n, _ in model.named_parameters())
    for p in read_jsonl(tmp / "dpo" / "round_0" / "pairs.jsonl"):  # a cut answer ranks below every finished one
        assert (True, p["chosen_score"]) > (p["rejected_finished"], p["rejected_score"])


def test_precomputed_reference_trains_as_adapters_off(tiny_dpo):
    """With LoRA, the reference computed once before training and the policy with its adapters off are the same
    model: the same pairs give the same losses step by step, to the bit in the first epoch. Each pair's reference is
    computed in the micro-batch it trains in: from other batches it differed by rounding, and at step 0, where the
    policy is the reference, the DPO-Positive term's max(0, ref - policy) switched its gradient on or off with the
    sign of that rounding (losses 4e-3 apart from step 2, on some CPUs)."""
    tmp, args, _ = tiny_dpo
    losses = {}
    for ref in ("precomputed", "adapters_off"):
        out_dir = tmp / f"ref_{ref}"
        (out_dir / "round_0").mkdir(parents=True)
        for name in ("pairs.jsonl", "judge.json"):
            (out_dir / "round_0" / name).write_bytes((tmp / "dpo" / "round_0" / name).read_bytes())
        run(DPO, *args, f"--out_dir={out_dir}", f"--reference={ref}", "--steps=['train']", "--max_iters=4",
            "--log_interval=1", "--max_eval_prompts=4")
        losses[ref] = [x["loss"] for x in read_jsonl(out_dir / "metrics.jsonl") if "loss" in x]
    assert len(losses["precomputed"]) == 4 and "--dpop_lambda=50" in args
    assert json.load(open(tmp / "dpo" / "round_0" / "judge.json"))["pairs"] >= 4 * 16
    assert losses["precomputed"] == losses["adapters_off"]  # 4 steps of 16 pairs: within the first epoch
    assert os.path.exists(tmp / "ref_precomputed" / "round_0" / "reference_logprobs.json")


def test_verifier_score_orders_right_format_wrong():
    assert tf.verifier_score("13", "13") == 3
    assert tf.verifier_score("13", "答えは13です。") == 2
    assert tf.verifier_score("13", "12") == 1 and tf.verifier_score("水曜日", "月曜日") == 1
    assert tf.verifier_score("13", "答えは12です。") == 0 and tf.verifier_score("水曜日", "月曜日です") == 0
    assert tf.verifier_score("2", "2. マザーボード") == 2
    assert re.fullmatch(r"kh0h", tf.answer_shape("答えは13です"))


def test_unknown_config_key_fails(tmp_path):
    out = run(DPO, "--betta=0.2", f"--out_dir={tmp_path}", expect_fail=True)
    assert "unknown config key 'betta'" in out.stderr and "beta" in out.stderr


def test_two_ranks_sample_judge_and_train_as_one(tiny_dpo):
    """torchrun with 2 ranks: each samples half the prompts into its own file, rank 0 judges them all, and FSDP
    training (the reference table gathered from both ranks) gives the losses of one rank on the same pairs."""
    tmp, args, _ = tiny_dpo
    common = [*args, "--max_prompts=80", "--max_iters=3", "--log_interval=1", "--reference=precomputed",
              "--max_eval_prompts=4"]
    run(DPO, *common, f"--out_dir={tmp / 'two'}", nproc=2)
    halves = [read_jsonl(tmp / "two" / "round_0" / f"samples_{r}.jsonl") for r in (0, 1)]
    assert all(halves) and sorted(x["id"] for h in halves for x in h) == list(range(80))
    (tmp / "one" / "round_0").mkdir(parents=True)
    for name in ("pairs.jsonl", "judge.json"):
        (tmp / "one" / "round_0" / name).write_bytes((tmp / "two" / "round_0" / name).read_bytes())
    run(DPO, *common, f"--out_dir={tmp / 'one'}", "--steps=['train']")
    losses = [[x["loss"] for x in read_jsonl(tmp / d / "metrics.jsonl") if "loss" in x] for d in ("one", "two")]
    assert len(losses[0]) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(*losses)), losses


def test_two_rounds_sample_from_the_first_rounds_model(tiny_dpo):
    tmp, args, _ = tiny_dpo
    run(DPO, *args, f"--out_dir={tmp / 'rounds'}", "--rounds=2", "--max_prompts=60", "--max_iters=2",
        "--max_eval_prompts=4")
    summary = json.load(open(tmp / "rounds" / "summary.json"))
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    first = load_checkpoint(tmp / "rounds" / "round_0" / "model")[2]
    final = load_checkpoint(tmp / "rounds" / "model")[2]
    assert first["round"] == 0 and final["round"] == 1
    assert final["init_from"] == str(tmp / "rounds" / "round_0" / "model")  # on-policy: round 1 starts from round 0
    assert (tmp / "rounds" / "round_1" / "samples_0.jsonl").exists()


def test_training_resumes_from_its_checkpoint_exactly(tiny_dpo):
    """A run killed after its step-2 checkpoint (simulated: the later checkpoint and the model removed) continues
    from step 2 with the reference read back from its file, and logs the losses of the uninterrupted run."""
    tmp, args, _ = tiny_dpo
    common = [*args, "--max_iters=4", "--checkpoint_interval=2", "--log_interval=1", "--reference=precomputed",
              "--keep_checkpoints=3", "--steps=['train']", "--max_eval_prompts=4"]
    for name in ("full", "killed"):
        (tmp / name / "round_0").mkdir(parents=True)
        for f in ("pairs.jsonl", "judge.json", "samples_0.jsonl"):
            (tmp / name / "round_0" / f).write_bytes((tmp / "dpo" / "round_0" / f).read_bytes())
        run(DPO, *common, f"--out_dir={tmp / name}")
    killed = tmp / "killed" / "round_0"
    for path in (tmp / "killed" / "model", killed / "checkpoints" / "step_00000004", killed / "train.json"):
        assert path.exists(), path
        subprocess.run(["rm", "-r", str(path)], check=True)
    out = run(DPO, *common, f"--out_dir={tmp / 'killed'}")
    assert "resumed from" in out.stdout and "computed once" not in out.stdout
    losses = [{x["step"]: x["loss"] for x in read_jsonl(tmp / d / "metrics.jsonl") if "loss" in x}
              for d in ("full", "killed")]
    assert all(abs(losses[0][s] - losses[1][s]) < 1e-6 for s in (1, 2, 3, 4)), losses
    assert (tmp / "killed" / "model" / "config.json").exists()
