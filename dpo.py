"""
Stage 6: DPO on the model's own answers, picked by a judge (docs/recipe.md "DPO": DPO instead of RL; the rejected
answers come from the model itself, and a stronger judge picks the best of several).

    python dpo.py configs/dpo_tiny.py                              # tiny: the offline verifier judges, ~1 minute
    python dpo.py configs/dpo_tiny.py --steps='["train"]'          # one step alone (each step is resumable)
    python serve.py --init_from=out/sft/model --port=8000 &        # sample through a server: serve.py or vLLM
    python dpo.py --init_from=out/sft/model --sample_base_url=http://127.0.0.1:8000/v1 \\
        --judge=llm --judge_base_url=http://127.0.0.1:8001/v1 --judge_model=Qwen/Qwen2.5-72B-Instruct
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out/sft/model --prompts=prompts.jsonl

A round is three steps, each writing into out_dir/round_<r>/, each continuing where its output stops (a killed run
resumes by running the same command again) and each runnable alone with --steps:
  sample  K answers per prompt from the policy at temperature 1 (Tanuki: 4 answers at 1.0), locally or through any
          OpenAI-compatible server -> samples_<rank>.jsonl
  judge   a score for every answer, then chosen = the best, rejected = the worst; ties are dropped, and an answer
          cut at max_new_tokens ranks below every finished one (never chosen) -> pairs.jsonl
          judge="verifier": textfilters.verifier_score against the prompt's known answer (synth.py's records carry
            it): 3 right in exactly the asked format, 2 right in another, 1 wrong in the answer's form, 0 neither;
          judge="llm": MT-Bench-style grading 1-10 by an OpenAI-compatible judge (llm_api.judge_ratings: cached, a
            reply without a rating retried, then counted and never given a score)
  train   DPO (Rafailov et al. 2023) on the pairs -> model/ (the final round's goes to out_dir/model)
rounds > 1 repeats the three with the trained model as the next policy (on-policy, as Tanuki's self-sampled loop:
sample, judge, DPO, merge, repeat). Every val_every-th prompt is held out: its pairs give the held-out reward
accuracy, and the first max_eval_prompts of them the judge's score and the verifier's pass rate of freshly sampled
answers before and after training (summary.json).
"""

import concurrent.futures
import functools
import glob
import json
import math
import os
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import textfilters as tf
from checkpoint import (latest_checkpoint, load_checkpoint, load_for_finetuning, load_train_checkpoint, save_finetuned,
                        save_train_checkpoint)
from common import adamw, cleanup_distributed, load_config, lr_at, print0, setup_distributed
from corpus import append_jsonl, bad, bad_lines, new_counts, read_jsonl
from llm_api import chat_completion, judge_key, judge_prompt, judge_ratings
from model import lora_disabled
from tokenizer import load_tokenizer, render_chat, special_id, tokenizer_hash

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/dpo"
init_from = "out/sft/model"   # the policy of round 0 (and the reference of its DPO)
prompts = "out/synth/chat.jsonl"  # chat JSONL; a trailing assistant turn is dropped; "answer" feeds the verifier
max_prompts = 0               # the first N prompts; 0 = all
val_every = 10                # every 10th prompt is held out
max_eval_prompts = 200        # held-out prompts whose answers are sampled again after training (pass rate, score)
steps = ["sample", "judge", "train"]
rounds = 1
seed = 1337
# sample (docs/recipe.md "DPO": their self-sampled loop drew 4 answers per prompt at temperature 1.0)
samples_per_prompt = 4
temperature = 1.0
top_p = 1.0
max_new_tokens = 512
sample_batch_size = 64        # rows per local generation batch
sample_base_url = ""          # "" = generate locally from the policy; else an OpenAI-compatible server of the policy
sample_model = ""
sample_api_key = ""
concurrency = 8               # requests in flight (sampling and judging)
# judge
judge = "verifier"            # "verifier" (the prompt's known answer) or "llm"
judge_base_url = ""           # judge base_url / model / api_key fall back to OPENAI_BASE_URL / _MODEL / _API_KEY
judge_model = ""
judge_api_key = ""
judge_retries = 2             # extra attempts when a judgment has no parsable rating
judge_max_tokens = 512
request_timeout = 120.0
http_retries = 4              # transport errors (5xx, 429, timeouts), with exponential backoff
backoff = 1.0
# DPO. The team's scripts (docs/recipe.md "DPO"): 8B beta 0.1, LR 5e-7; 8x8B beta 0.5, label smoothing 0.01, LR
# 1e-6, global batch 1024, max length 2048, one epoch, a DPO-Positive term; the self-sampled LoRA loop beta 0.2, LR 2e-7
beta = 0.1
label_smoothing = 0.0         # conservative DPO (Mitchell 2023): the labels are flipped with this probability
dpop_lambda = 0.0             # DPO-Positive (Pal et al. 2024): penalize the chosen answer's log-prob falling below
                              # the reference's; the team's scripts give no weight, the DPOP paper used 50
reference = "precomputed"     # "precomputed": the policy's log-probs before training, computed once (no second
                              # model in memory); "adapters_off": with LoRA, the policy with its adapters disabled
seq_len = 2048
batch_size = 1024             # pairs per optimizer step over all ranks
micro_batch_size = 2          # pairs per forward (each is two sequences)
epochs = 1
max_iters = 0                 # > 0: this many steps instead of epochs
learning_rate = 5e-7
min_lr = 0.0
warmup_iters = 10
lr_schedule = "cosine"
weight_decay = 0.0            # stay near the reference model, not near 0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# LoRA (model.add_lora); 0 = full fine-tuning. Dropout 0: with dropout the policy at step 0 would not be the
# reference, and the implicit rewards beta * (log pi - log ref) would be noise around 0 instead of 0
lora_rank = 0
lora_alpha = 32.0
lora_dropout = 0.0
lora_targets = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
# checkpoints and logs
checkpoint_interval = 100
keep_checkpoints = 2
trust_unverified_checkpoint = False  # resume from one without manifest.json (older versions): its .metadata is a
                                     # pickle, run as code on load (README "Checkpoints, serving, chat and export")
log_interval = 10
eval_interval = 50
# system
device = "auto"
dtype = "bfloat16"
activation_checkpoint = "none"  # or "selective" / "full" (common.shard_model)
pg_timeout_minutes = 30
# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = load_config(globals())  # only as a script: the tests import the functions


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0, dpop_lambda=0.0):
    """Per-pair DPO loss from summed response log-probs (policy and reference), with the implicit rewards
    beta * (log pi - log ref) of both answers. The sigmoid loss -log sigmoid(beta * h), h the difference of the two
    log-ratios; label smoothing mixes in the loss of the flipped label; DPO-Positive subtracts
    lambda * max(0, log ref(chosen) - log pi(chosen)) from h, so the chosen answer's likelihood cannot fall while
    the margin grows (plain DPO can lower both)."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    h = h - dpop_lambda * (ref_chosen - pi_chosen).clamp(min=0)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


def reward_accuracy(reward_chosen, reward_rejected):
    """The fraction of pairs whose chosen answer has the higher implicit reward; a tie counts half, so the untrained
    policy (the reference itself, every reward 0) scores chance, 0.5. (TRL's rewards/accuracies counts a tie as a
    loss: 0 before training; the two agree once no reward ties.)"""
    return ((reward_chosen > reward_rejected).float() + 0.5 * (reward_chosen == reward_rejected).float()).mean()


def response_logprobs(model, rows, pad_id):
    """Summed log-prob of each row's response tokens. rows: [(input ids, targets)] with target -1 off the response.
    One right-padded forward; the sums come from the model's per-row loss, chunk by chunk, never the float32
    (rows, T, vocab) logits (2.1 GB at the 8B shape for 2 pairs of 2048 tokens; kernels/cross_entropy.py)."""
    T = max(len(x) for x, _ in rows)
    device = model.embed.weight.device
    x = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)
    y = torch.full((len(rows), T), -1, dtype=torch.long, device=device)
    for r, (inputs, targets) in enumerate(rows):
        x[r, : len(inputs)] = torch.tensor(inputs, device=device)
        y[r, : len(targets)] = torch.tensor(targets, device=device)
    return -model(x, y, per_row=True)[1]


def answer_rows(enc, prompt, answer):
    """(inputs, targets) of a prompt and its answer: targets only on the answer and its <|end|>. Not render_chat's
    mask, which marks every assistant turn: a multi-turn prompt's earlier assistant turns are prompt, not response."""
    ids = render_chat(enc, prompt + [{"role": "assistant", "content": answer}])[0]
    start = len(render_chat(enc, prompt, add_generation_prompt=True)[0])  # where the answer's tokens begin
    return ids[:-1], [t if i >= start else -1 for i, t in enumerate(ids[1:], 1)]


def read_prompts(path, limit):
    """[{"id", "messages" (ending with the user's turn), "answer" (or None), "lang"}] from a chat JSONL; a line that
    is not a conversation ending with a user turn is counted and skipped."""
    if not os.path.isfile(path):
        raise SystemExit(f"prompts not found: {path} (synth.py writes out/synth/chat.jsonl)")
    out, skipped = [], new_counts()
    for line_no, record in read_jsonl(path, skipped, numbered=True):  # invalid UTF-8, broken JSON: skipped
        try:
            messages = record["messages"]
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # synth.py stores the teacher's answer last: the policy answers instead
            if not messages or messages[-1]["role"] != "user" or not all(isinstance(m["content"], str)
                                                                         for m in messages):
                raise ValueError("does not end with a user turn")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            bad(skipped, "not_a_prompt", f"{path}:{line_no} ({type(e).__name__}: {str(e)[:100]})")
            continue
        out.append({"id": record.get("id", line_no), "messages": messages, "answer": record.get("answer"),
                    "lang": record.get("lang", "ja")})
        if len(out) == limit:
            break
    broken = sum(skipped["bad_records"].values())
    if broken:
        print0(f"{path}: {bad_lines(skipped)}")
    return out, broken


# -----------------------------------------------------------------------------
# step a: sample


def generate_answers(policy_dir, records, round_dir, name, url):
    """Append {"id", "messages", "answer", "lang", "held_out", "eval", "samples": [K answers], "finished": [K bools],
    "greedy": answer or None} to round_dir/<name>_<rank>.jsonl for every record not in any rank's file yet: K =
    samples_per_prompt answers at `temperature`, finished False where an answer was cut at max_new_tokens, and a
    greedy one for the evaluated prompts (the pass rate without sampling noise).
    Locally in batches of about sample_batch_size rows; a server (url) gets one request per answer, `concurrency`
    in flight. One line per prompt as it is done, so a kill loses at most the batch in flight."""
    done = {r["id"] for r in read_answers(round_dir, name)}
    todo = [r for r in records if r["id"] not in done][rank::world_size]
    n, per_batch = samples_per_prompt, max(1, sample_batch_size // (samples_per_prompt + 1))
    model, enc, _ = load_checkpoint(policy_dir, device=device, dtype=torch_dtype) if todo and not url else (None,) * 3
    model = model.eval() if model else None
    with append_jsonl(os.path.join(round_dir, f"{name}_{rank}.jsonl")) as f:
        for i in range(0, len(todo), per_batch):
            chunk = todo[i : i + per_batch]
            greedy = [r for r in chunk if r["eval"]]
            if url:
                jobs = [(r["messages"], temperature) for r in chunk for _ in range(n)]
                jobs += [(r["messages"], 0.0) for r in greedy]
                ask = lambda job: chat_completion(job[0], {"max_tokens": max_new_tokens, "temperature": job[1],
                                                           "top_p": top_p if job[1] else 1.0}, url, sample_api_key,
                                                  sample_model, request_timeout, http_retries, backoff)[:2]
                with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
                    replies = list(pool.map(ask, jobs))
                # finish_reason "length": cut at max_tokens (OpenAI's and vLLM's protocol, serve.py's too)
                answers, finished = [a for a, _ in replies], [why != "length" for _, why in replies]
            else:
                # the same answers when the same batch is generated again (crc32: Python's str hash is salted)
                batch_seed = zlib.crc32(f"{seed}/{name}/{chunk[0]['id']}".encode())
                answers, finished = local_generate(model, enc, [r["messages"] for r in chunk for _ in range(n)],
                                                   temperature, batch_seed)
                if greedy:
                    answers += local_generate(model, enc, [r["messages"] for r in greedy], 0.0, batch_seed)[0]
            greedy_of = dict(zip([r["id"] for r in greedy], answers[len(chunk) * n :]))
            for j, r in enumerate(chunk):
                f.write(json.dumps({**r, "samples": answers[j * n : (j + 1) * n],
                                    "finished": finished[j * n : (j + 1) * n], "greedy": greedy_of.get(r["id"])},
                                   ensure_ascii=False) + "\n")
            f.flush()
            print(f"[rank {rank}] {name}: {min(i + per_batch, len(todo))}/{len(todo)} prompts", flush=True)


def read_answers(round_dir, name):
    """Every rank's records of round_dir/<name>_<rank>.jsonl (the world size may have changed since they were
    written)."""
    return [r for p in sorted(glob.glob(os.path.join(round_dir, f"{name}_*.jsonl"))) for r in read_jsonl(p, complete_only=True)]


def prompt_fits(enc, messages):
    """One length rule for sampling and training: a prompt is used when it leaves room for a whole answer of
    max_new_tokens in the context that training uses (context_len). A longer one is skipped and counted, never cut
    (cutting its start would lose <|bos|> and the system turn, and training would drop the pair anyway)."""
    return len(render_chat(enc, messages, add_generation_prompt=True)[0]) + max_new_tokens <= context_len


def local_generate(model, enc, conversations, temp, batch_seed):
    """(answers, finished): finished is False for an answer cut at max_new_tokens."""
    stop, pad = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>")), special_id(enc, "<|pad|>")
    ids = [render_chat(enc, c, add_generation_prompt=True)[0] for c in conversations]  # each fits: prompt_fits
    out = model.generate(ids, max_new_tokens, stop_tokens=stop, temperature=temp, top_p=top_p if temp else None,
                         seed=batch_seed, pad_id=pad)
    # generate leaves the stop token out: an answer that stopped has fewer than max_new_tokens tokens
    return [enc.decode(x) for x in out], [len(x) < max_new_tokens for x in out]


# -----------------------------------------------------------------------------
# step b: judge


def score_answers(records, cache_path):
    """(scores, unparsable): scores[i][j] is the judge's score of records[i]'s answer j (the samples, then the
    greedy answer when there is one), None where the judge gave no rating."""
    answers = [r["samples"] + ([r["greedy"]] if r.get("greedy") is not None else []) for r in records]
    if judge == "verifier":
        return [[tf.verifier_score(r["answer"], a) for a in answers_i] for r, answers_i in zip(records, answers)], 0
    judge_cfg = {"url": judge_base_url or os.environ.get("OPENAI_BASE_URL", ""),
                 "key": judge_api_key or os.environ.get("OPENAI_API_KEY", ""),
                 "model": judge_model or os.environ.get("OPENAI_MODEL", "")}
    prompts_of = []
    for r, answers_i in zip(records, answers):
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        earlier = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        references = [None] * (len(users) - 1) + [r.get("answer")]  # a known answer guides the judge
        prompts_of.append([judge_prompt(r["lang"] if r["lang"] in ("ja", "en") else "en", users, earlier + [a],
                                        references) for a in answers_i])
    cache, sent = judge_ratings([m for ps in prompts_of for m in ps], judge_cfg, cache_path, judge_retries,
                                judge_max_tokens, concurrency, request_timeout, http_retries, backoff)
    print0(f"judge: {sent} new judgments ({judge_cfg['model']})")
    scores = [[cache[judge_key(judge_cfg["model"], m)]["rating"] for m in ps] for ps in prompts_of]
    return scores, sum(s is None for row in scores for s in row)


def answer_stats(records, scores):
    """Mean judge score and verifier pass rate (strict) of the sampled and of the greedy answers."""
    stats = {}
    for name, pick in (("", lambda r, s: zip(r["samples"], s[: len(r["samples"])])),
                       ("greedy_", lambda r, s: [(r["greedy"], s[-1])] if r.get("greedy") is not None else [])):
        pairs = [(r, a, s) for r, row in zip(records, scores) for a, s in pick(r, row)]
        rated = [s for _, _, s in pairs if s is not None]
        checked = [tf.verify_answer(r["answer"], a) for r, a, _ in pairs if r.get("answer") is not None]
        stats[f"{name}score"] = float(np.mean(rated)) if rated else None
        stats[f"{name}pass_rate"] = float(np.mean(checked)) if checked else None
    return stats


def judge_step(round_dir):
    records = read_answers(round_dir, "samples")
    if not records:
        raise SystemExit(f"{round_dir}: no samples to judge (run the sample step first)")
    if judge == "verifier":
        missing = sum(r.get("answer") is None for r in records)
        if missing:
            print0(f"judge: {missing} prompts have no known answer for the verifier: skipped")
        records = [r for r in records if r.get("answer") is not None]
    records = [{**r, "greedy": None} for r in records]  # the greedy answers are for the pass rate, not candidates
    scores, unparsable = score_answers(records, os.path.join(round_dir, "judge_cache.jsonl"))
    pairs, ties, none_finished = [], 0, 0
    for r, row in zip(records, scores):
        # an answer cut at max_new_tokens ranks below every finished one (TRL's missing_eos_penalty, made absolute):
        # never chosen, since training appends <|end|> and would teach stopping mid-answer; it may be rejected, which
        # pushes that <|end|> down. Records from before the flag count as finished
        finished = r.get("finished") or [True] * len(r["samples"])
        rated = [((f, s), a) for s, a, f in zip(row, r["samples"], finished) if s is not None]  # unparsable: never
        best, worst = max(rated, key=lambda ka: ka[0], default=None), min(rated, key=lambda ka: ka[0], default=None)
        if rated and not best[0][0]:
            none_finished += 1
            continue
        if not rated or best[0] == worst[0]:  # all tied (or unrated): no preference to learn
            ties += 1
            continue
        pairs.append({"id": r["id"], "prompt": r["messages"], "chosen": best[1], "rejected": worst[1],
                      "chosen_score": best[0][1], "rejected_score": worst[0][1], "rejected_finished": worst[0][0],
                      "held_out": r["held_out"]})
    with open(os.path.join(round_dir, "pairs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    stats = {"prompts": len(records), "samples": sum(len(r["samples"]) for r in records), "unparsable": unparsable,
             "cut_answers": sum(r.get("finished", []).count(False) for r in records),
             "none_finished_dropped": none_finished, "cut_rejected": sum(not p["rejected_finished"] for p in pairs),
             "ties_dropped": ties, "pairs": sum(not p["held_out"] for p in pairs),
             "held_out_pairs": sum(p["held_out"] for p in pairs)}
    with open(os.path.join(round_dir, "judge.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    print0(f"judge: {stats['pairs']} training pairs, {stats['held_out_pairs']} held out; {ties} prompts all tied; "
           f"{unparsable} unparsable judgments; {stats['cut_answers']} answers cut at max_new_tokens (never chosen: "
           f"{none_finished} prompts without a finished answer dropped, {stats['cut_rejected']} pairs reject one)")


# -----------------------------------------------------------------------------
# step c: train


def train_step(policy_dir, round_dir, model_dir, round_index):
    """DPO of the policy in policy_dir on round_dir/pairs.jsonl; writes model_dir and round_dir/train.json."""
    enc = load_tokenizer(policy_dir)
    pad_id = special_id(enc, "<|pad|>")
    pairs = read_jsonl(os.path.join(round_dir, "pairs.jsonl"), complete_only=True)

    data, too_long = [], 0
    for i, p in enumerate(pairs):
        chosen, rejected = answer_rows(enc, p["prompt"], p["chosen"]), answer_rows(enc, p["prompt"], p["rejected"])
        # prompt_fits left room for max_new_tokens; an answer whose text encodes to more tokens than were sampled
        # (decode, then encode again) can still pass the context: dropped and counted
        if max(len(chosen[0]), len(rejected[0])) > context_len:
            too_long += 1
            continue
        data.append({"index": i, "chosen": chosen, "rejected": rejected, "held_out": p["held_out"]})
    train_data = [d for d in data if not d["held_out"]]
    val_data = [d for d in data if d["held_out"]]
    if not train_data:
        raise SystemExit(f"{round_dir}: no training pairs (every prompt tied, or the judge step has not run)")
    n_steps = max_iters if max_iters > 0 else max(1, math.ceil(epochs * len(train_data) / batch_size))
    print0(f"train: {len(train_data)} pairs, {len(val_data)} held out, {too_long} longer than {context_len} dropped; "
           f"{n_steps} steps of {batch_size} pairs")

    lora = (lora_rank, lora_alpha, lora_dropout, tuple(lora_targets)) if lora_rank else None
    if reference == "adapters_off" and not lora:
        raise SystemExit("reference='adapters_off' needs LoRA (lora_rank > 0); full fine-tuning uses 'precomputed'")
    if reference not in ("precomputed", "adapters_off"):
        raise SystemExit(f"reference must be 'precomputed' or 'adapters_off', got {reference!r}")
    model = load_for_finetuning(policy_dir, init_device_mesh(device_type, (world_size,)), device, torch_dtype, lora,
                                activation_checkpoint, seed + round_index)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, learning_rate, weight_decay, (beta1, beta2), device_type)

    def logprobs(batch):
        """(policy chosen, policy rejected) summed log-probs of a micro-batch: one forward of both answers."""
        out = response_logprobs(model, [d["chosen"] for d in batch] + [d["rejected"] for d in batch], pad_id)
        return out[: len(batch)], out[len(batch) :]

    def rank_batches(items):
        """This rank's micro-batches of `items`, every world_size-th, flagged as its own. Every rank runs the same
        number of forwards (each is a collective under FSDP): one short of work runs the first again, not its own."""
        micro = [items[i : i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
        for k in range(rank, math.ceil(len(micro) / world_size) * world_size, world_size):
            yield (micro[k], True) if k < len(micro) else (micro[0], False)

    rows_per_rank = batch_size // world_size

    @functools.lru_cache(maxsize=2)  # the epoch being read and the next: a batch may run on into it
    def epoch_order(epoch):
        return np.random.default_rng([seed, round_index, epoch]).permutation(len(train_data))

    def next_batch(loader):
        """The next global batch of train_data, the same on every rank, from loader = [epoch, cursor] (advanced):
        each epoch a fresh permutation, and a batch runs on into the next epoch where one ends."""
        batch = []
        while len(batch) < batch_size:
            epoch, cursor = loader
            batch.append(train_data[epoch_order(epoch)[cursor]])
            loader[:] = [epoch + 1, 0] if cursor + 1 == len(train_data) else [epoch, cursor + 1]
        return batch

    def my_micro_batches(batch):  # this rank's slice of a global batch, micro-batch by micro-batch
        mine = batch[rank * rows_per_rank : (rank + 1) * rows_per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, rows_per_rank, micro_batch_size)]

    @torch.no_grad()
    def compute_reference():
        """The policy's log-probs before training, for every pair, gathered into one table. Each training pair is
        computed in the very micro-batch it first trains in (the first epoch's batches), each held-out pair as
        evaluate() groups it: same rows, same padding, same rounding, so at step 0 the policy equals its reference
        to the last bit, as with the adapters off. That matters: there the DPO-Positive term max(0, ref - policy)
        sits on its kink, and a reference from other batches would switch its gradient on or off by rounding."""
        table, first, loader = torch.zeros(len(pairs), 2, device=device), set(), [0, 0]
        while len(first) < len(train_data):  # the first epoch, and the rest of the batch that ends it
            batch = next_batch(loader)
            new = [d["index"] not in first for d in batch]  # the same on every rank: the batch is global
            first.update(d["index"] for d in batch)
            new = new[rank * rows_per_rank : (rank + 1) * rows_per_rank]
            for k, micro in enumerate(my_micro_batches(batch)):
                c, r = logprobs(micro)
                for j, d in enumerate(micro):
                    if new[k * micro_batch_size + j]:
                        table[d["index"]] = torch.stack([c[j], r[j]])
        for batch, mine in rank_batches(val_data):
            c, r = logprobs(batch)
            if mine:
                table[[d["index"] for d in batch]] = torch.stack([c, r], dim=1)
        dist.all_reduce(table)
        return table

    def reference_of(batch):
        if reference == "adapters_off":
            with lora_disabled(model), torch.no_grad():
                return logprobs(batch)
        idx = [d["index"] for d in batch]
        return ref_table[idx, 0], ref_table[idx, 1]

    step, tokens, skipped, loader = 0, 0, 0, [0, 0]
    ckpt_root = os.path.join(round_dir, "checkpoints")
    ref_path = os.path.join(round_dir, "reference_logprobs.json")
    resume_dir = latest_checkpoint(ckpt_root, None, trust_unverified_checkpoint)
    if resume_dir:
        state = load_train_checkpoint(resume_dir, model, optimizer,
                                      expect={"tokenizer_hash": tokenizer_hash(enc), "pairs": len(pairs)},
                                      trust_unverified=trust_unverified_checkpoint)
        step, tokens, skipped, loader = state["step"], state["tokens"], state["skipped"], state["loader"]
        print0(f"train: resumed from {resume_dir} at step {step}")
    ref_table = None
    if reference == "precomputed":
        if os.path.exists(ref_path):  # after a resume the policy has moved: the reference must come from the file
            with open(ref_path, encoding="utf-8") as f:
                ref_table = torch.tensor(json.load(f)["logprobs"], device=device)
        elif resume_dir:
            raise SystemExit(f"{ref_path} is missing but training has started: the reference is lost; "
                             f"remove {ckpt_root} to train this round again")
        else:
            model.eval()
            ref_table = compute_reference()
            model.train()
            if master:
                with open(ref_path + ".tmp", "w", encoding="utf-8") as f:
                    json.dump({"logprobs": ref_table.tolist()}, f)
                os.replace(ref_path + ".tmp", ref_path)
            print0(f"train: reference log-probs of {len(data)} pairs computed once, saved to {ref_path}")

    def sums(batch):
        """Sums over the micro-batch of (loss, reward chosen, reward rejected, accuracy, margin)."""
        pc, pr = logprobs(batch)
        rc, rr = reference_of(batch)
        loss, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta, label_smoothing, dpop_lambda)
        return loss.sum(), torch.stack([reward_c.sum(), reward_r.sum(), reward_accuracy(reward_c, reward_r) *
                                        len(batch), (reward_c - reward_r).sum()])

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros(6, device=device)  # loss, 4 reward sums, pairs
        for batch, mine in rank_batches(val_data):
            loss, stats = sums(batch)
            if mine:
                total += torch.cat([loss[None], stats, torch.tensor([len(batch)], device=device)])
        dist.all_reduce(total)
        model.train()
        n = total[5].clamp(min=1)
        return {"val_loss": (total[0] / n).item(), "val_reward_accuracy": (total[3] / n).item(),
                "val_reward_margin": (total[4] / n).item()}

    def log_metrics(record):
        if master:
            with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"round": round_index, **record}) + "\n")

    # the held-out metrics of the policy before training: measured now, or kept in the checkpoint being resumed
    before = state["val_before"] if resume_dir else evaluate() if val_data else {}
    if not resume_dir and val_data:
        log_metrics({"step": 0, **before})
        print0(f"train: held-out before DPO: {before}")
    model.train()
    t_start, t_log = time.perf_counter(), time.perf_counter()
    while step < n_steps:
        lr = lr_at(step, learning_rate, min_lr, warmup_iters, n_steps, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next_batch(loader)  # the global batch; each rank trains on its own slice
        total = torch.zeros(5, device=device)
        for micro in my_micro_batches(batch):
            loss, stats = sums(micro)
            (loss * world_size / batch_size).backward()  # FSDP averages over ranks: the mean over the global batch
            total += torch.cat([loss.detach()[None], stats])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        dist.all_reduce(total)
        total = (total / batch_size).tolist()
        if math.isfinite(total[0]) and math.isfinite(grad_norm.item()):
            optimizer.step()
        else:  # never apply a NaN/Inf update; count it
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sum(len(d["chosen"][0]) + len(d["rejected"][0]) for d in batch)
        if step % log_interval == 0 or step == n_steps:
            dt = (time.perf_counter() - t_log) / log_interval
            print0(f"step {step}/{n_steps} | loss {total[0]:.4f} | reward acc {total[3]:.3f} (a tie: 1/2) "
                   f"| margin {total[4]:.4f} "
                   f"| lr {lr:.2e} | grad norm {grad_norm.item():.3f} | {1000 * dt:.0f} ms/step | skipped {skipped}")
            log_metrics({"step": step, "loss": total[0], "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens,
                         "skipped": skipped, "reward_chosen": total[1], "reward_rejected": total[2],
                         "reward_accuracy": total[3], "reward_margin": total[4]})
            t_log = time.perf_counter()
        if val_data and step % eval_interval == 0 and step < n_steps:
            log_metrics({"step": step, **evaluate()})
        if step % checkpoint_interval == 0 or step == n_steps:
            save_train_checkpoint(ckpt_root, step, model, optimizer,
                                  {"tokens": tokens, "skipped": skipped, "loader": loader, "config": config,
                                   "tokenizer_hash": tokenizer_hash(enc), "pairs": len(pairs), "val_before": before},
                                  keep_checkpoints)
    seconds = time.perf_counter() - t_start
    after = evaluate() if val_data else {}
    log_metrics({"step": step, **after})
    print0(f"train: held-out after DPO: {after}")
    if master:
        with open(os.path.join(round_dir, "train.json"), "w", encoding="utf-8") as f:
            json.dump({"steps": step, "tokens_per_second": tokens / max(seconds, 1e-9),
                       "val_reward_accuracy_before": before.get("val_reward_accuracy"),
                       "val_reward_accuracy_after": after.get("val_reward_accuracy"),
                       "val_reward_margin_after": after.get("val_reward_margin")}, f, indent=1)
    save_finetuned(model, model_dir, enc, "dpo", torch_dtype, lora,
                   extra={"init_from": os.path.abspath(policy_dir), "round": round_index, "step": step,
                          "pairs": len(train_data), "config": config})
    print0(f"train: saved {model_dir}")


def round_summary(round_dir):
    """A round's numbers: the judge step's counts, the training's held-out rewards, and the evaluated prompts'
    answers before (from the sample step) and after training, each scored by the judge and the verifier."""
    with open(os.path.join(round_dir, "judge.json"), encoding="utf-8") as f:
        entry = json.load(f)
    with open(os.path.join(round_dir, "train.json"), encoding="utf-8") as f:
        entry.update(json.load(f))
    for name, found in (("before", [x for x in read_answers(round_dir, "samples") if x["eval"]]),
                        ("after", read_answers(round_dir, "eval_after"))):
        if judge == "verifier":
            found = [x for x in found if x.get("answer") is not None]
        if found:
            scores = score_answers(found, os.path.join(round_dir, "judge_cache.jsonl"))[0]
            entry.update({f"{k}_{name}": v for k, v in answer_stats(found, scores).items()})
    return entry


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    rank, local_rank, world_size, device = setup_distributed(device, pg_timeout_minutes, world_of_one=True)
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(seed)
    unknown = set(steps) - {"sample", "judge", "train"}
    if unknown or judge not in ("verifier", "llm"):
        raise SystemExit(f"steps must come from sample, judge, train (got {steps}); judge is 'verifier' or 'llm' "
                         f"(got {judge!r})")
    if sample_base_url and rounds > 1:
        raise SystemExit("a server serves one policy: with sample_base_url run one round at a time, restarting the "
                         "server on the round's model and passing it as --init_from for the next")
    if batch_size % world_size or (batch_size // world_size) % micro_batch_size:
        raise SystemExit(f"batch_size={batch_size} must split evenly over {world_size} ranks into micro-batches of "
                         f"{micro_batch_size} pairs")
    records, broken = read_prompts(prompts, max_prompts)
    with open(os.path.join(init_from, "config.json"), encoding="utf-8") as f:  # every round's policy has this shape
        context_len = min(seq_len, json.load(f)["model"]["max_seq_len"])
    enc = load_tokenizer(init_from)
    fitting = [r for r in records if prompt_fits(enc, r["messages"])]
    too_long, records = len(records) - len(fitting), fitting
    held_out = [r for i, r in enumerate(records) if i % val_every == 0]
    eval_ids = {r["id"] for r in held_out[:max_eval_prompts]}
    for i, r in enumerate(records):
        r["held_out"], r["eval"] = i % val_every == 0, r["id"] in eval_ids
    print0(f"dpo: {len(records)} prompts ({len(held_out)} held out, {len(eval_ids)} evaluated before and after), "
           f"{broken} broken lines skipped, {too_long} without room for a {max_new_tokens}-token answer in "
           f"{context_len} skipped; {rounds} round(s) of {steps}")
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "summary.json")
    summary = {"rounds": []}
    if os.path.exists(summary_path):  # earlier rounds of this out_dir, when a round runs alone
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    policy = init_from
    for r in range(rounds):
        round_dir = os.path.join(out_dir, f"round_{r}")
        model_dir = os.path.join(out_dir, "model") if r == rounds - 1 else os.path.join(round_dir, "model")
        os.makedirs(round_dir, exist_ok=True)
        t0 = time.time()
        if "sample" in steps:
            generate_answers(policy, records, round_dir, "samples", sample_base_url)
            dist.barrier()
        if "judge" in steps and master:
            judge_step(round_dir)
        dist.barrier()
        if "train" in steps:
            if os.path.isfile(os.path.join(model_dir, "config.json")):
                print0(f"round {r}: {model_dir} exists, training skipped")
            else:
                train_step(policy, round_dir, model_dir, r)
            # the evaluated prompts answered again by the trained policy, locally (a server serves the old one)
            generate_answers(model_dir, [x for x in records if x["eval"]], round_dir, "eval_after", "")
            dist.barrier()
            if master:
                entry = {"round": r, **round_summary(round_dir), "eval_prompts": len(eval_ids),
                         "seconds": round(time.time() - t0, 1)}
                summary["rounds"] = [x for x in summary["rounds"] if x["round"] != r] + [entry]
                summary["model"] = os.path.join(out_dir, "model")
                with open(summary_path, "w", encoding="utf-8") as f:
                    json.dump(summary, f, indent=1)
                print0(f"round {r}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in entry.items()))
        policy = model_dir
    dist.barrier()
    cleanup_distributed()
