"""
Stage 5: supervised fine-tuning on chat conversations (docs/recipe.md "SFT"), full or LoRA.

    python sft.py configs/sft_tiny.py                                           # CPU, about a minute
    python sft.py configs/sft_tiny.py --lora_rank=0                             # full fine-tuning instead of LoRA
    torchrun --standalone --nproc_per_node=8 sft.py --init_from=out/train/model --data=out/synth/chat.jsonl
    python sft.py configs/sft_tiny.py --resume=auto                             # continue from the newest checkpoint

Tanuki fine-tuned on only tens of thousands of conversations written by the same teachers as the pretraining
synthetic data (stay in-domain), with LoRA to iterate faster. The data is chat JSONL, one conversation per line
({"messages": [...]}, synth.py's chat.jsonl); tokenizer.render_chat gives the ids and a mask that is 1 on the
assistant's tokens, and only those are trained on. Conversations are packed several to a sequence, each with its
own positions and attention only within itself (model.py `doc_ids`), so packing changes nothing a conversation
computes; or padded, one per row. Every rank holds a shard of the weights (FSDP2, common.shard_model); a plain
`python sft.py` is a world of one running the same code. Writes to out_dir: metrics.jsonl, checkpoints/step_*/
(resumable training state) and model/ (adapters merged: the checkpoint dpo.py, eval.py and serve.py load).
"""

import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import corpus
from checkpoint import (
    latest_checkpoint,
    load_for_finetuning,
    load_train_checkpoint,
    save_finetuned,
    save_train_checkpoint,
)
from common import adamw, cleanup_distributed, load_config, lr_at, print0, setup_distributed
from model import ModelConfig
from tokenizer import load_tokenizer, render_chat, special_id, tokenizer_hash

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/sft"
init_from = "out/train/model"  # the pretrained (or upcycled and trained) model, checkpoint.save_checkpoint's layout
data = "out/synth/chat.jsonl"  # chat JSONL: one {"messages": [...]} per line
val_data = ""             # a held-out chat JSONL; empty: every val_every-th conversation of `data` is held out
val_every = 20            # 5% held out
resume = ""               # "auto": the newest checkpoint in out_dir/checkpoints, if any; or a checkpoint directory
trust_unverified_checkpoint = False  # resume from one without manifest.json (older versions): its .metadata is a
                                     # pickle, run as code on load (README "Checkpoints, serving, chat and export")
seed = 1337
# sequences
seq_len = 2048            # Tanuki's post-training max length (docs/recipe.md "DPO": max length 2048)
packing = True            # several conversations per sequence (no attention between them), or one per row, padded
too_long = "truncate"     # a conversation longer than seq_len: "truncate" (keep the first seq_len tokens) or "drop"
# batch: rows (sequences) per optimizer step over all ranks; what one rank cannot hold comes from accumulation.
# the team's final SFT ran one epoch (docs/recipe.md "SFT"); for the write-ups' "tens of thousands of examples" (a
# few hundred tokens each, several per 2048-token row) 64 rows make a few hundred steps per epoch
batch_size = 64
micro_batch_size = 4
epochs = 2                # passes over the data; max_iters > 0 sets the number of steps instead
max_iters = 0
# LoRA (model.add_lora; Hu et al. 2021): docs/recipe.md "SFT", LoRA instead of full fine-tuning to iterate faster.
# Rank 0: full fine-tuning. The team's LoRA templates use rank 128, alpha 256 for an 8B; 16 and 2 x rank are common
# choices
lora_rank = 16
lora_alpha = 32.0         # the update is scaled by alpha / rank
lora_dropout = 0.05       # QLoRA's value for models of this size (Dettmers et al. 2023)
lora_targets = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]  # every projection: QLoRA found adapters on all
                                                                     # layers, not only q and v, match full tuning
# optimizer: AdamW. LoRA takes a far larger LR than full fine-tuning, whose updates touch every weight
learning_rate = 2e-4      # LoRA (QLoRA's 2e-4 for 7B-13B); set ~1e-5 for full fine-tuning of the 8B
min_lr = 0.0
warmup_iters = 10
lr_schedule = "cosine"
weight_decay = 0.0        # full fine-tuning: decay would pull the pretrained weights toward 0, not toward the base
                          # model they should stay near (with LoRA it shrinks B A toward the base model: harmless)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# checkpoints and logs
checkpoint_interval = 500
keep_checkpoints = 2
log_interval = 10
eval_interval = 100
# system
device = "auto"
dtype = "bfloat16"
activation_checkpoint = "none"  # or "selective" / "full" (common.shard_model)
pg_timeout_minutes = 30
# -----------------------------------------------------------------------------
config = load_config(globals())

rank, local_rank, world_size, device = setup_distributed(device, pg_timeout_minutes, world_of_one=True)
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
torch.manual_seed(seed)
if too_long not in ("truncate", "drop"):
    raise SystemExit(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
rows_per_rank = batch_size // world_size
grad_accum = rows_per_rank // micro_batch_size
if rows_per_rank * world_size != batch_size or grad_accum * micro_batch_size != rows_per_rank or grad_accum == 0:
    raise SystemExit(f"batch_size={batch_size} must split evenly over {world_size} ranks into micro-batches of "
                     f"{micro_batch_size}")

# -----------------------------------------------------------------------------
# data: every conversation rendered once, up front (tens of thousands fit in memory as token lists)

if not init_from:
    raise SystemExit("sft.py fine-tunes a checkpoint: set --init_from=DIR (e.g. out/train/model)")
enc = load_tokenizer(init_from)
with open(os.path.join(init_from, "config.json"), encoding="utf-8") as f:
    model_cfg = ModelConfig(**json.load(f)["model"])
if seq_len > model_cfg.max_seq_len:
    raise SystemExit(f"seq_len={seq_len} is longer than the model's max_seq_len={model_cfg.max_seq_len}")
pad_id = special_id(enc, "<|pad|>")
counts = {"conversations": 0, "broken": 0, "no_assistant": 0, "truncated": 0, "dropped": 0}


def read_conversations(path):
    """[(inputs, targets)] of every usable conversation in a chat JSONL: inputs are ids[:-1] and targets ids[1:],
    with -1 where the target is not the assistant's (the loss ignores those). A broken line is counted and skipped,
    never fatal: one bad record in 50,000 should not cost a run."""
    if not os.path.isfile(path):
        raise SystemExit(f"chat data not found: {path} (synth.py writes out/synth/chat.jsonl)")
    out, bad = [], corpus.new_counts()
    for line_no, record in corpus.read_jsonl(path, bad, numbered=True):  # invalid UTF-8, broken JSON: skipped
        try:
            ids, mask = render_chat(enc, record["messages"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            counts["broken"] += 1
            print0(f"{path}:{line_no}: skipped, not a conversation ({type(e).__name__}: {str(e)[:100]})")
            continue
        if len(ids) > seq_len + 1:
            if too_long == "drop":
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        if all(t == -1 for t in targets):  # nothing to learn (no assistant turn, or truncated before it)
            counts["no_assistant"] += 1
            continue
        counts["conversations"] += 1
        out.append((ids[:-1], targets))
    counts["broken"] += sum(bad["bad_records"].values())
    if bad["bad_records"]:
        print0(f"{path}: {corpus.bad_lines(bad)}")
    return out


conversations = read_conversations(data)
if val_data:
    train_convs, val_convs = conversations, read_conversations(val_data)
else:
    train_convs = [c for i, c in enumerate(conversations) if i % val_every]
    val_convs = conversations[::val_every]
print0(f"data: {len(train_convs):,} train and {len(val_convs):,} held-out conversations; {counts}")
if not train_convs or not val_convs:
    raise SystemExit(f"need train and held-out conversations, got {len(train_convs)} and {len(val_convs)}")


def make_rows(convs):
    """Rows of at most seq_len tokens, each a list of conversations. Packing fills a row in order until the next
    conversation does not fit (next-fit: simple, and the short synthetic dialogues leave little room unused)."""
    if not packing:
        return [[c] for c in convs]
    rows, row, used = [], [], 0
    for c in convs:
        if used + len(c[0]) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(c)
        used += len(c[0])
    return rows + [row] if row else rows


def collate(rows):
    """(inputs, targets, doc_ids), each (len(rows), longest row): padding takes <|pad|>, target -1 and doc id -1,
    so it is never trained on and, packed, forms a document of its own that no conversation attends to."""
    T = max(sum(len(c[0]) for c in row) for row in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, (inputs, targets) in enumerate(row):
            x[r, t : t + len(inputs)] = torch.tensor(inputs)
            y[r, t : t + len(inputs)] = torch.tensor(targets)
            doc[r, t : t + len(inputs)] = d
            t += len(inputs)
    return x.to(device), y.to(device), doc.to(device) if packing else None


def epoch_rows(epoch):
    # a new order every epoch, a function of (seed, epoch) alone: the loader's state is just (epoch, cursor)
    order = np.random.default_rng([seed, epoch]).permutation(len(train_convs))
    return make_rows([train_convs[i] for i in order])


val_rows = make_rows(val_convs)
_rows = {}  # the current epoch's rows, built once


def next_batch():
    """The global batch's rows (the same on every rank); each rank then trains on its own slice of them."""
    batch = []
    while len(batch) < batch_size:
        epoch, cursor = loader
        if _rows.get("epoch") != epoch:
            _rows.update(epoch=epoch, rows=epoch_rows(epoch))
        batch.append(_rows["rows"][cursor])
        loader[:] = [epoch + 1, 0] if cursor + 1 == len(_rows["rows"]) else [epoch, cursor + 1]
    return batch


loader = [0, 0]  # (epoch, row cursor)
rows_per_epoch = len(epoch_rows(0))  # packing differs a little between orders; epoch 0 sets the step count
if max_iters <= 0:
    max_iters = max(1, math.ceil(epochs * rows_per_epoch / batch_size))
print0(f"{rows_per_epoch:,} rows of <= {seq_len} tokens per epoch ({'packed' if packing else 'padded'}), "
       f"{batch_size} rows per step: {max_iters} steps")

# -----------------------------------------------------------------------------
# model: as train.py, built on the meta device, sharded, then filled from rank 0's full weights (with LoRA, the
# adapters are added first, so FSDP shards them with their block)

lora = (lora_rank, lora_alpha, lora_dropout, tuple(lora_targets)) if lora_rank else None
mesh = init_device_mesh(device_type, (world_size,))
model = load_for_finetuning(init_from, mesh, device, ptdtype, lora, activation_checkpoint, seed)
params = [p for p in model.parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in params)
print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trained "
       f"({'LoRA rank ' + str(lora_rank) if lora_rank else 'full fine-tuning'}), {world_size} ranks")
optimizer = adamw(params, learning_rate, weight_decay, (beta1, beta2), device_type)  # as train.py

step, tokens, skipped = 0, 0, 0
ckpt_root = os.path.join(out_dir, "checkpoints")
resume_dir = latest_checkpoint(ckpt_root, None, trust_unverified_checkpoint) if resume == "auto" else resume
if resume_dir:
    # cheap with LoRA's few trained weights, and with DCP any size: the base weights are saved too, so a resume
    # needs nothing but the checkpoint
    state = load_train_checkpoint(resume_dir, model, optimizer,
                                  expect={"tokenizer_hash": tokenizer_hash(enc), "train_conversations": len(train_convs)},
                                  trust_unverified=trust_unverified_checkpoint)
    step, tokens, skipped, loader = state["step"], state["tokens"], state["skipped"], state["loader"]
    print0(f"resumed from {resume_dir} at step {step}")


def loss_sums(rows):
    """(sum of token losses, number of trained tokens) of this rank's micro-batch: sums, so that micro-batches and
    ranks of different token counts average to the exact mean over tokens."""
    x, y, doc = collate(rows)
    loss = model(x, y, doc_ids=doc)[1]
    n = (y != -1).sum()
    return loss * n, n


@torch.no_grad()
def evaluate():
    """Mean loss per trained token over every held-out conversation. Each rank takes every world_size-th row; all
    ranks run the same number of forwards (each is a collective under FSDP); a rank short of rows runs the first
    row again and leaves its loss out."""
    model.eval()
    mine = val_rows[rank::world_size]
    n_micro = math.ceil(math.ceil(len(val_rows) / world_size) / micro_batch_size)
    total = torch.zeros(2, device=device)
    for i in range(n_micro):
        rows = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
        s, n = loss_sums(rows or val_rows[:1])
        if rows:
            total += torch.stack([s, n.float()])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def log_metrics(record):
    if master:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if master:
    os.makedirs(out_dir, exist_ok=True)
if step == 0:
    val_loss = evaluate()
    print0(f"held-out loss before fine-tuning: {val_loss:.4f}")
    log_metrics({"step": 0, "val_loss": val_loss, **counts})

# -----------------------------------------------------------------------------
# the training loop: one optimizer step per iteration

model.train()
t_log = time.perf_counter()
while step < max_iters:
    lr = lr_at(step, learning_rate, min_lr, warmup_iters, max_iters, lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = next_batch()
    # the loss is a mean over the trained tokens of the whole global batch, not over rows: a long answer weighs
    # more than a short one, as when the conversations are run one by one
    step_tokens = sum(t != -1 for row in batch for _, targets in row for t in targets)
    mine = batch[rank * rows_per_rank : (rank + 1) * rows_per_rank]
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        s, _ = loss_sums(mine[micro * micro_batch_size : (micro + 1) * micro_batch_size])
        # FSDP averages gradients over ranks; times world_size, the sum of every rank's sums over all tokens
        (s * world_size / step_tokens).backward()
        loss_sum += s.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(loss_sum)
    loss_value, norm_value = loss_sum.item() / step_tokens, grad_norm.item()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    else:  # never apply a NaN/Inf update (docs/recipe.md "What failed"); count it
        skipped += 1
        print0(f"step {step}: skipped (loss {loss_value}, grad norm {norm_value})")
    optimizer.zero_grad(set_to_none=True)
    step += 1
    tokens += sum(len(inputs) for row in batch for inputs, _ in row)

    if step % log_interval == 0 or step == max_iters:
        dt = (time.perf_counter() - t_log) / log_interval
        print0(f"step {step}/{max_iters} | loss {loss_value:.4f} | lr {lr:.3e} | grad norm {norm_value:.3f} | "
               f"tokens {tokens:,} | {1000 * dt:.0f} ms/step | skipped {skipped}")
        log_metrics({"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "tokens": tokens,
                     "skipped": skipped, "epoch": loader[0]})
        t_log = time.perf_counter()
    if step % eval_interval == 0 or step == max_iters:
        val_loss = evaluate()
        print0(f"held-out loss {val_loss:.4f}")
        log_metrics({"step": step, "val_loss": val_loss})
    if step % checkpoint_interval == 0 or step == max_iters:
        save_train_checkpoint(ckpt_root, step, model, optimizer,
                              {"tokens": tokens, "skipped": skipped, "loader": loader, "config": config,
                               "tokenizer_hash": tokenizer_hash(enc), "train_conversations": len(train_convs)},
                              keep_checkpoints)

# -----------------------------------------------------------------------------
# the fine-tuned model, adapters merged into the weights: a plain checkpoint every later stage loads

save_finetuned(model, os.path.join(out_dir, "model"), enc, "sft", ptdtype, lora,
               extra={"init_from": os.path.abspath(init_from), "step": step, "tokens": tokens, "data": counts,
                      "config": config})
print0(f"saved the model to {os.path.join(out_dir, 'model')}")
cleanup_distributed()
