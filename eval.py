"""
Evaluation (docs/recipe.md "Evaluation": post-train and evaluate often, and measure format compliance apart from
knowledge).

    python eval.py --init_from=out/sft --data_dir=out/data --tasks_file=out/synth_eval/chat.jsonl   # tiny default
    python eval.py --init_from=out/sft --mt_bench_file=mt_bench_ja.jsonl \\
        --judge_base_url=http://127.0.0.1:8001/v1 --judge_model=Qwen/Qwen2.5-72B-Instruct        # LLM judge
    python eval.py --init_from="" --answer_base_url=http://127.0.0.1:8000/v1 --tasks_file=...    # a served model
    python eval.py --init_from="" --tasks_file="" --data_dir="" --arena_file=battles.jsonl       # arena only

Sections (each skipped when its input is ""), written to out_dir/eval.json and printed as a table:
  val       loss and perplexity per source on the val split of data_dir (prepare_data.py's shards)
  mc        multiple choice: strict (the reply is exactly the option label, llm-jp-eval's exact match) beside lenient
            (the label appears in the reply), and log-likelihood scoring (lm-evaluation-harness: the summed log-prob
            of each option's text after the prompt, argmax; acc_norm divides by the option's length in characters)
  tasks     verifiable generation tasks: strict and lenient pass rates, overall and per kind
  mt_bench  single-answer grading 1-10 by an OpenAI-compatible judge, per category; unparsable judgments counted
  arena     Bradley-Terry ratings (Elo scale) with bootstrap 95% intervals from a file of pairwise judgments
Answers come from our checkpoint (batched, greedy) or, with answer_base_url, from any OpenAI-compatible endpoint.

Input formats (JSONL, one object per line):
  tasks_file     synth.py's chat.jsonl: {"messages": [{"role": "user", ...}, ...], "answer": "13", "task": "arithmetic",
                 "lang": "ja"}; records without "answer" are skipped. Its "choice" tasks are also the default mc
                 questions, their options parsed from the numbered lines "1. ..." of the prompt. For held-out
                 tasks write a second set with another seed:
                     python synth.py --seed=1 --num_samples=300 --out_dir=out/synth_eval
  mc_file        {"question": "...", "choices": ["...", ...], "answer": 0-based index (int) or label (str),
                 "labels": ["1", "2", ...] (optional; default "1".."n"), "lang": "ja"|"en",
                 "prompt": "..." (optional: the whole prompt as is, e.g. llm-jp-eval's layout; default: the question,
                 the numbered options and an answer-with-the-number-only line)}
  mt_bench_file  {"id": ..., "category": one of CATEGORIES, "turns": ["...", "..."], "lang": "ja"|"en",
                 "reference": ["...", ...] (optional, for math/reasoning/coding)}
  arena_file     {"model_a": "...", "model_b": "...", "winner": "model_a"|"model_b"|"tie"} (Chatbot Arena's battles)
"""

import concurrent.futures
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import corpus
import textfilters as tf
from checkpoint import load_checkpoint
from common import load_config, open_shards, read_tokens, set_cpu_threads
from llm_api import chat_completion, judge_key, judge_prompt, judge_ratings
from tokenizer import render_chat, special_id, tokenizer_hash

# -----------------------------------------------------------------------------
init_from = "out/sft/model"  # our checkpoint; "" = none (answers from answer_base_url; val and log-likelihood mc skipped)
out_dir = "out/eval"
device = "auto"
dtype = "auto"            # bfloat16 on CUDA, float32 on CPU
seed = 1337
batch_size = 16           # sequences per forward / generation batch
# val loss
data_dir = "out/data"     # "" skips; every <source>/meta.json folder is evaluated
val_windows = 32          # windows per source, spread evenly over its val split: the same ones every run
val_seq_len = 0           # 0 = the model's max_seq_len
# multiple choice and verifiable tasks
tasks_file = "out/synth_eval/chat.jsonl"
mc_file = ""              # "" = the "choice" tasks of tasks_file
max_tasks = 500           # the first N records of each file
max_new_tokens = 32       # the answers are a number, a label or a day name
# the model under test through an OpenAI-compatible endpoint (instead of init_from, for the generated answers)
answer_base_url = ""
answer_model = ""
answer_api_key = ""
concurrency = 8           # requests in flight
# MT-Bench-style judge; base_url / model / api_key fall back to OPENAI_BASE_URL / OPENAI_MODEL / OPENAI_API_KEY
mt_bench_file = ""
judge_base_url = ""
judge_model = ""
judge_api_key = ""
judge_retries = 2         # extra attempts when a judgment has no parsable rating; after them it is counted unparsable
mt_bench_max_tokens = 512
# arena
arena_file = ""
arena_anchor = ""         # the player pinned at arena_anchor_rating; "" = the mean rating is pinned there
arena_anchor_rating = 1000.0
bootstrap = 200           # resamples of the battles for the intervals (Chatbot Arena's method)
# HTTP
timeout = 120.0
max_retries = 4           # transport errors (5xx, 429, timeouts), with exponential backoff
backoff = 1.0
if __name__ == "__main__":
    config = load_config(globals())  # only as a script: the tests import the functions
# -----------------------------------------------------------------------------

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
OPTION_ONLY = {"ja": "番号のみで答えてください。", "en": "Answer with the option number only."}


def kind_of(task):
    """A task's kind: synth.py writes it as "task"; "kind" is accepted too (offline_task's own name)."""
    return task.get("task", task.get("kind", ""))


def read_jsonl(path, limit=None):
    """The records of an evaluation set; a bad line is skipped and reported with its file:line (corpus.read_jsonl)."""
    if not os.path.isfile(path):
        raise SystemExit(f"evaluation set not found: {path}")
    return corpus.read_jsonl(path)[:limit]


# -----------------------------------------------------------------------------
# multiple choice: one record shape for both sources of questions


def mc_from_task(task):
    """A synth.py "choice" task as an mc record: the options are the numbered lines of its prompt ("2. 37"), the
    question the lines before them; the prompt is kept as written, so the model sees what SFT showed it."""
    prompt = task["messages"][0]["content"]
    question, labels, choices = [], [], []
    for line in prompt.splitlines():
        m = re.match(r"\s*(\d+)[.．]\s*(.+?)\s*$", line)
        if m and len(labels) == int(m.group(1)) - 1:  # 1, 2, 3...: a numbered line inside the question is not one
            labels.append(m.group(1))
            choices.append(m.group(2))
        elif not labels:
            question.append(line)
    if task["answer"] not in labels:
        raise ValueError(f"choice task {task.get('id')}: answer {task['answer']!r} is not an option label {labels}")
    return {"question": "\n".join(question), "choices": choices, "labels": labels, "answer": task["answer"],
            "lang": task.get("lang", "ja"), "prompt": prompt}


def mc_normalized(record):
    """An mc_file record with its defaults filled in: labels, the answer as a label, the prompt."""
    labels = [str(x) for x in record.get("labels") or range(1, len(record["choices"]) + 1)]
    answer = record["answer"]
    answer = labels[answer] if isinstance(answer, int) else str(answer)
    lang = record.get("lang", "ja")
    options = "\n".join(f"{label}. {choice}" for label, choice in zip(labels, record["choices"]))
    prompt = record.get("prompt") or f"{record['question']}\n{options}\n{OPTION_ONLY[lang]}"
    return {**record, "labels": labels, "answer": answer, "lang": lang, "prompt": prompt}


@torch.no_grad()
def continuation_logprobs(model, enc, prompts, continuations, batch_size=16):
    """Sum of log p(continuation tokens | chat prompt) for each (prompt, continuation) pair: the prompt rendered
    with the chat template up to <|assistant|>, the continuation encoded as plain text (lm-evaluation-harness's
    loglikelihood request). Rows are right-padded; only each row's continuation positions are summed."""
    pad, limit, out = special_id(enc, "<|pad|>"), model.cfg.max_seq_len, []
    rows = []
    for prompt, cont in zip(prompts, continuations):
        ctx = render_chat(enc, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
        cont_ids = enc.encode_ordinary(cont)
        ids = (ctx + cont_ids)[-limit:]  # a too-long prompt loses its start, never the continuation
        rows.append((ids, len(cont_ids)))
    device = model.embed.weight.device
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        idx = torch.full((len(chunk), T), pad, dtype=torch.long, device=device)
        for r, (ids, _) in enumerate(chunk):
            idx[r, : len(ids)] = torch.tensor(ids, device=device)
        logp = F.log_softmax(model(idx)[0].float(), dim=-1)  # (B, T, vocab)
        for r, (ids, k) in enumerate(chunk):
            n = len(ids)
            # position t predicts token t+1: the continuation's tokens n-k..n-1 are predicted at n-k-1..n-2
            targets = idx[r, n - k : n]
            out.append(logp[r, n - k - 1 : n - 1].gather(-1, targets[:, None]).sum().item())
    return out


def ll_choice(model, enc, questions, batch_size=16):
    """(acc, acc_norm, predictions) of log-likelihood multiple choice; acc_norm divides each option's summed
    log-prob by its length in characters, as lm-evaluation-harness does, so long options are not punished."""
    prompts = [q["prompt"] for q in questions for _ in q["choices"]]
    options = [c for q in questions for c in q["choices"]]
    scores = continuation_logprobs(model, enc, prompts, options, batch_size)
    hits, hits_norm, preds, k = 0, 0, [], 0
    for q in questions:
        s = np.array(scores[k : k + len(q["choices"])])
        lengths = np.array([max(1, len(c)) for c in q["choices"]])
        k += len(q["choices"])
        right = q["labels"].index(q["answer"])
        preds.append(q["labels"][int(s.argmax())])
        hits += int(s.argmax() == right)
        hits_norm += int((s / lengths).argmax() == right)
    return hits / len(questions), hits_norm / len(questions), preds


def pass_rates(answers, replies):
    """(strict, lenient) pass rates with textfilters.verify_answer, synth.py's own checker: strict is llm-jp-eval's
    exact match ("2", not "2." nor "2. マザーボード"), lenient finds the answer as a token of the reply."""
    strict = sum(tf.verify_answer(a, r, strict=True) for a, r in zip(answers, replies))
    lenient = sum(tf.verify_answer(a, r, strict=False) for a, r in zip(answers, replies))
    return strict / max(1, len(answers)), lenient / max(1, len(answers))


# -----------------------------------------------------------------------------
# MT-Bench-style single-answer grading: llm_api.judge_prompt / judge_ratings (dpo.py's LLM judge is the same one)


def judge_mt_bench(questions, conversations, judge, cache_path, retries=2, max_tokens=512):
    """Rate every assistant turn of `conversations` (one list of answers per question) with the judge
    {"url", "key", "model"}. Returns (scores, requests sent): scores[question][turn] is the rating, None when the
    judge gave none after its retries (counted by mt_bench_summary, never turned into a score). Cached in cache_path
    under a hash of (judge model, messages), which hold the question and the answer: a re-run sends only what is new."""
    prompts = [[judge_prompt(q.get("lang", "ja"), q["turns"][: t + 1], answers[: t + 1], q.get("reference") or [])
                for t in range(len(answers))] for q, answers in zip(questions, conversations)]
    cache, sent = judge_ratings([m for turns in prompts for m in turns], judge, cache_path, retries, max_tokens,
                                concurrency, timeout, max_retries, backoff)
    return [[cache[judge_key(judge["model"], m)]["rating"] for m in turns] for turns in prompts], sent


def mt_bench_summary(questions, scores):
    """Mean rating per category and overall (over the rated turns), with the unparsable count beside them."""
    by_cat, rated, unparsable = {}, [], 0
    for q, turn_scores in zip(questions, scores):
        for s in turn_scores:
            if s is None:
                unparsable += 1
            else:
                by_cat.setdefault(q["category"], []).append(s)
                rated.append(s)
    return {"score": float(np.mean(rated)) if rated else None, "rated_turns": len(rated), "unparsable": unparsable,
            "categories": {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}}


# -----------------------------------------------------------------------------
# arena: Bradley-Terry (docs/recipe.md "Reference thresholds": Chatbot Arena fits it as a logistic regression without
# intercept and bootstraps the battles for intervals)


def bradley_terry(players, battles, iters=50):
    """Strengths beta (natural-log odds units) with P(a beats b) = sigmoid(beta_a - beta_b), by Newton's method on the
    logistic regression without intercept: one row per battle, +1 in a's column, -1 in b's; a tie is half a win for
    each side (Chatbot Arena counts it as one win each way). Only differences are identifiable, so player 0 is held
    at 0; a tiny ridge keeps an unbeaten player finite. battles: (a index, b index, score of a in {0, 0.5, 1})."""
    n = len(players)
    a = np.array([x[0] for x in battles])
    b = np.array([x[1] for x in battles])
    y = np.array([x[2] for x in battles], dtype=np.float64)
    X = np.zeros((len(battles), n))
    X[np.arange(len(battles)), a] += 1
    X[np.arange(len(battles)), b] -= 1
    X = X[:, 1:]  # player 0 is the reference
    w = np.zeros(n - 1)
    ridge = 1e-6 * len(battles)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge * w
        hess = (X.T * (p * (1 - p))) @ X + ridge * np.eye(n - 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return np.concatenate([[0.0], w])


def arena_ratings(records, anchor="", anchor_rating=1000.0, n_bootstrap=200, seed=0):
    """{player: {"rating", "ci_low", "ci_high", "battles"}} on the Elo scale, 400 * log10 of the odds (so a 400-point
    gap is 10:1), shifted so that `anchor` (or the mean) sits at anchor_rating; 95% intervals from refits on battles
    resampled with replacement."""
    players = sorted({r["model_a"] for r in records} | {r["model_b"] for r in records})
    index = {p: i for i, p in enumerate(players)}
    outcome = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
    battles = [(index[r["model_a"]], index[r["model_b"]], outcome[r["winner"]]) for r in records]

    def elo(beta):
        r = 400 / math.log(10) * beta
        return r - (r[index[anchor]] if anchor else r.mean()) + anchor_rating

    ratings = elo(bradley_terry(players, battles))
    rng = np.random.default_rng(seed)
    samples = np.array([elo(bradley_terry(players, [battles[i] for i in rng.integers(0, len(battles), len(battles))]))
                        for _ in range(n_bootstrap)])
    counts = {p: sum(index[p] in (x[0], x[1]) for x in battles) for p in players}
    return {p: {"rating": float(ratings[i]), "ci_low": float(np.percentile(samples[:, i], 2.5)),
                "ci_high": float(np.percentile(samples[:, i], 97.5)), "battles": counts[p]}
            for i, p in enumerate(players)}


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    set_cpu_threads()  # as every torch stage: one thread per core this process may use (common.py)
    torch.manual_seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = enc = None
    if init_from:
        model, enc, meta = load_checkpoint(init_from, device=device, dtype=torch_dtype)
        model.eval()
        print(f"eval: {init_from} ({meta.get('stage')}, {model.num_params() / 1e6:.1f}M parameters) on {device}")
    elif not answer_base_url and (tasks_file or mc_file or mt_bench_file):
        raise SystemExit("answers need a model: set --init_from=CHECKPOINT or --answer_base_url=URL")
    os.makedirs(out_dir, exist_ok=True)
    results, t_start = {"config": config}, time.time()
    replies_cache = {}  # the same prompt is answered once (choice tasks are both mc and tasks questions)

    def generate(conversations):
        """Greedy replies to conversations (message lists ending with the user's turn), from our checkpoint in
        left-padded batches (model.generate), or from answer_base_url with `concurrency` requests in flight."""
        todo = [c for c in {json.dumps(c, ensure_ascii=False): c for c in conversations}.values()
                if json.dumps(c, ensure_ascii=False) not in replies_cache]
        if answer_base_url:
            ask = lambda c: chat_completion(c, {"max_tokens": max_new, "temperature": 0.0}, answer_base_url,
                                            answer_api_key or os.environ.get("OPENAI_API_KEY", ""), answer_model,
                                            timeout, max_retries, backoff)[0]
            with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
                replies = list(pool.map(ask, todo))
        else:
            stop, pad = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>")), special_id(enc, "<|pad|>")
            prompts = [render_chat(enc, c, add_generation_prompt=True)[0] for c in todo]
            replies = [None] * len(todo)
            order = sorted(range(len(todo)), key=lambda i: len(prompts[i]))  # like lengths together: less padding
            for i in range(0, len(order), batch_size):
                rows = order[i : i + batch_size]
                # a prompt longer than the context leaves room for max_new tokens by losing its start
                batch = [prompts[r][-max(1, model.cfg.max_seq_len - max_new):] for r in rows]
                room = model.cfg.max_seq_len - max(len(p) for p in batch)
                out = model.generate(batch, min(max_new, room), stop_tokens=stop, temperature=0, pad_id=pad)
                for r, ids in zip(rows, out):
                    replies[r] = enc.decode(ids)
        replies_cache.update({json.dumps(c, ensure_ascii=False): r for c, r in zip(todo, replies)})
        return [replies_cache[json.dumps(c, ensure_ascii=False)] for c in conversations]

    # ---- validation loss per source: fixed windows spread over the val split, so runs compare
    if data_dir and model is not None:
        seq_len = val_seq_len or model.cfg.max_seq_len
        sources = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "meta.json")))
        results["val"] = {}
        for name in sources:
            shards, _ = open_shards(data_dir, name, "val", tokenizer_hash(enc), min_tokens=seq_len + 1)
            total = sum(len(s) for s in shards)
            n = min(val_windows, (total - 1) // seq_len)
            starts = np.linspace(0, total - seq_len - 1, n).astype(np.int64)
            losses = []
            with torch.no_grad():
                for i in range(0, n, batch_size):
                    batch = np.stack([read_tokens(shards, int(s), seq_len + 1) for s in starts[i : i + batch_size]])
                    x = torch.from_numpy(batch).to(device)
                    _, loss = model(x[:, :-1], targets=x[:, 1:])  # eval mode: cross-entropy alone, MoE losses off
                    losses.append(loss.item() * len(batch))
            loss = sum(losses) / n
            results["val"][name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(n * seq_len)}

    # ---- multiple choice: strict vs lenient generation, and log-likelihood on the same questions
    max_new = max_new_tokens
    tasks = [t for t in read_jsonl(tasks_file) if "answer" in t][:max_tasks] if tasks_file else []
    if mc_file:
        questions = [mc_normalized(r) for r in read_jsonl(mc_file, max_tasks)]
    else:
        questions = [mc_from_task(t) for t in tasks if kind_of(t) == "choice"]
    if questions:
        replies = generate([[{"role": "user", "content": q["prompt"]}] for q in questions])
        strict, lenient = pass_rates([q["answer"] for q in questions], replies)
        mc = {"questions": len(questions), "strict": strict, "lenient": lenient,
              "chance": float(np.mean([1 / len(q["choices"]) for q in questions]))}
        if model is not None:
            mc["ll_acc"], mc["ll_acc_norm"], _ = ll_choice(model, enc, questions, batch_size)
        results["mc"] = mc

    # ---- verifiable generation tasks: every kind, exact-answer checking
    if tasks:
        # the conversation up to the reply under test (synth.py stores it with the teacher's answer last)
        conversations = [t["messages"][:-1] if t["messages"][-1]["role"] == "assistant" else t["messages"]
                         for t in tasks]
        replies = generate(conversations)
        kinds = sorted({kind_of(t) for t in tasks})
        section = {"tasks": len(tasks), "kinds": {}}
        section["strict"], section["lenient"] = pass_rates([t["answer"] for t in tasks], replies)
        for kind in kinds:
            pairs = [(t["answer"], r) for t, r in zip(tasks, replies) if kind_of(t) == kind]
            s, l = pass_rates(*zip(*pairs))
            section["kinds"][kind] = {"tasks": len(pairs), "strict": s, "lenient": l}
        results["tasks"] = section
        with open(os.path.join(out_dir, "answers.jsonl"), "w", encoding="utf-8") as f:
            for t, c, r in zip(tasks, conversations, replies):
                f.write(json.dumps({"id": t.get("id"), "kind": kind_of(t), "prompt": c[-1]["content"],
                                    "answer": t["answer"], "reply": r, "strict": tf.verify_answer(t["answer"], r),
                                    "lenient": tf.verify_answer(t["answer"], r, strict=False)},
                                   ensure_ascii=False) + "\n")

    # ---- MT-Bench: answer both turns (the second with the first in context), then the judge rates each turn
    if mt_bench_file:
        judge = {"url": judge_base_url or os.environ.get("OPENAI_BASE_URL", ""),
                 "key": judge_api_key or os.environ.get("OPENAI_API_KEY", ""),
                 "model": judge_model or os.environ.get("OPENAI_MODEL", "")}
        if not judge["url"]:
            raise SystemExit("mt_bench_file needs a judge: --judge_base_url=URL (or OPENAI_BASE_URL)")
        questions = read_jsonl(mt_bench_file)
        bad = [q.get("category") for q in questions if q.get("category") not in CATEGORIES]
        if bad:
            raise SystemExit(f"{mt_bench_file}: unknown categories {bad}; use {CATEGORIES}")
        max_new = mt_bench_max_tokens
        answers = [[] for _ in questions]
        for turn in range(max(len(q["turns"]) for q in questions)):
            live = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
            conversations = []
            for i in live:
                history = []
                for q_text, a_text in zip(questions[i]["turns"], answers[i]):
                    history += [{"role": "user", "content": q_text}, {"role": "assistant", "content": a_text}]
                conversations.append(history + [{"role": "user", "content": questions[i]["turns"][turn]}])
            for i, reply in zip(live, generate(conversations)):
                answers[i].append(reply)
        scores, sent = judge_mt_bench(questions, answers, judge, os.path.join(out_dir, "judge_cache.jsonl"),
                                      judge_retries, mt_bench_max_tokens)
        results["mt_bench"] = {**mt_bench_summary(questions, scores), "questions": len(questions),
                               "judge": judge["model"], "judge_requests": sent}

    # ---- arena
    if arena_file:
        results["arena"] = arena_ratings(read_jsonl(arena_file), arena_anchor, arena_anchor_rating, bootstrap, seed)

    results["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(out_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)

    # ---- the summary table
    rows = []
    for name, v in results.get("val", {}).items():
        rows.append((f"val loss ({name})", f"{v['loss']:.4f}  ppl {v['perplexity']:.1f}"))
    if "mc" in results:
        mc = results["mc"]
        rows.append((f"mc strict / lenient ({mc['questions']})",
                     f"{mc['strict']:.3f} / {mc['lenient']:.3f}  (chance {mc['chance']:.3f})"))
        if "ll_acc" in mc:
            rows.append(("mc log-likelihood acc / acc_norm", f"{mc['ll_acc']:.3f} / {mc['ll_acc_norm']:.3f}"))
    if "tasks" in results:
        section = results["tasks"]
        rows.append((f"tasks strict / lenient ({section['tasks']})",
                     f"{section['strict']:.3f} / {section['lenient']:.3f}"))
        for kind, v in section["kinds"].items():
            rows.append((f"  {kind} ({v['tasks']})", f"{v['strict']:.3f} / {v['lenient']:.3f}"))
    if "mt_bench" in results:
        mt = results["mt_bench"]
        score = "n/a" if mt["score"] is None else f"{mt['score']:.2f}"
        rows.append(("mt_bench score (1-10)", f"{score}  ({mt['rated_turns']} rated, {mt['unparsable']} unparsable)"))
        rows += [(f"  {c}", f"{s:.2f}") for c, s in mt["categories"].items()]
    for player, v in sorted(results.get("arena", {}).items(), key=lambda kv: -kv[1]["rating"]):
        rows.append((f"arena {player}", f"{v['rating']:.0f}  [{v['ci_low']:.0f}, {v['ci_high']:.0f}]"))
    width = max((len(r[0]) for r in rows), default=10)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"eval: wrote {os.path.join(out_dir, 'eval.json')} in {results['seconds']}s")
