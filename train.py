"""
Stage 2: pretraining (docs/recipe.md "Pretraining"), from a 2-layer model on a laptop CPU to Tanuki-8B on 16 nodes.

    python train.py configs/tiny.py --data_dir=out/data                     # CPU, a few minutes
    torchrun --standalone --nproc_per_node=8 train.py configs/8b.py         # one node of 8 GPUs
    torchrun --nnodes=16 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train.py configs/8b.py                                              # 16 nodes (README: SLURM)
    torchrun ... train.py configs/8b.py --resume=auto                       # continue from the newest checkpoint
    python train.py configs/tiny.py --lr_range_test --learning_rate=1.0     # raise the LR until the loss spikes
    python simulate.py configs/8b.py --gpus=128                     # its memory and traffic per GPU, first

Every rank holds a shard of the weights (FSDP2, common.shard_model); a plain `python train.py` is a world of one
that runs the same code. The data is a deterministic function of (seed, loader position), so a checkpoint of
the position resumes exactly, on any number of ranks. Tanuki's runs were hurt by NaN gradients, loss spikes,
checkpoint timeouts, a loader that ran out, broken shards and one slow node (docs/recipe.md "What failed"); each has
its answer below. Writes to out_dir: metrics.jsonl (one JSON object per logged step), checkpoints/step_*/ (sharded
training state) and model/ (config.json + model.safetensors + tokenizer: what upcycle.py, sft.py, eval.py load).
"""

import json
import math
import os
import shutil
import signal
import time
import zlib
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import (init_sharded, latest_checkpoint, load_train_checkpoint, read_model_config, save_checkpoint,
                        save_train_checkpoint)
from common import (
    adamw,
    cleanup_distributed,
    clip_grad_norm,
    device_mesh,
    load_config,
    lr_at,
    mfu,
    model_config_from,
    open_shards,
    print0,
    read_tokens,
    set_grad_sync,
    setup_distributed,
    shard_model,
)
from model import ModelConfig, Transformer
from moe import moe_stats, update_expert_bias
from tokenizer import load_tokenizer, special_id, tokenizer_hash

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/train"
data_dir = "out/data"     # prepare_data.py's output: tokenizer files + one folder of shards per source
init_from = ""            # a checkpoint directory (checkpoint.save_checkpoint) to start from instead of random weights;
                          # the model's shape then comes from it (e.g. an upcycled MoE, configs/8x8b.py)
resume = ""               # "auto": the newest checkpoint in out_dir/checkpoints, if any; or a checkpoint directory
trust_unverified_checkpoint = False  # resume from one without manifest.json (older versions): its .metadata is a
                                     # pickle, run as code on load (README "Checkpoints, serving, chat and export")
# data: a mixture of sources by weight; {} is every source in data_dir in proportion to its tokens. A curriculum
# is a list of (start token count, mixture) switched as the tokens go by: Tanuki fed English+code first, then
# Japanese, and only synthetic data at the very end (docs/recipe.md "Data").
mixture = {}
curriculum = []
seed = 1337
# model: every ModelConfig field is a setting, with its defaults (Tanuki-8B's shape)
globals().update(asdict(ModelConfig()))
# batch: the global batch is set in tokens; what one rank cannot hold comes from gradient accumulation
seq_len = 4096
tokens_per_step = 1024 * 4096
micro_batch_size = 1
max_iters = 300_000       # ~1.3T tokens at 4M per step: Tanuki-8B's total (docs/recipe.md "Models")
# optimizer: AdamW and the schedule of Tanuki's Megatron scripts (docs/recipe.md "Released training scripts")
learning_rate = 1.5e-4    # 3e-4 spiked in their LR stress test; 1.5e-4 was used ("Pretraining")
min_lr = 1.5e-6
warmup_iters = 1000
lr_schedule = "cosine"    # or "wsd" (warmup-stable-decay; common.lr_at)
wsd_decay_frac = 0.2
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.8
z_loss = 0.0              # coefficient of mean(logsumexp(logits)^2) (PaLM: 1e-4); optional in their scripts
document_mask = False     # attention only within a document (each <|bos|> starts one), positions from 0 in each, as
                          # packed SFT. Llama 3 masks documents (arXiv:2407.21783, section 3.2: little effect in
                          # pretraining, important for long sequences); off by default, as Tanuki's Megatron runs were
# stability (docs/recipe.md "What failed"): a NaN/Inf loss or grad norm is never applied; a spike against the recent
# window is skipped; repeated spikes roll back to the last checkpoint before them, past the offending data
spike_window = 100        # steps of accepted losses / grad norms a new one is compared with
spike_zscore = 6.0        # loss > mean + 6 std of the window: a spike
spike_grad_factor = 10.0  # grad norm > 10 x the window's median: a spike
rollback_after = 3        # that many spikes within spike_window steps: roll back
rollback_lr_factor = 1.0  # multiply the LR at each rollback (lowering it did not save the 38B run, so 1 by default)
skip_steps = []           # [(first, last), ...]: steps whose batches are drawn and never trained on (Megatron's
                          # --skip-train-iteration-range, inclusive), to step over a known-bad data window
lr_range_test = False     # raise the LR geometrically from min_lr to learning_rate over max_iters, stop at a spike
# checkpoints and logs
checkpoint_interval = 1000
keep_checkpoints = 3
async_checkpoint = False  # write the shards in the background while training goes on
log_interval = 10
eval_interval = 1000
eval_iters = 10           # micro-batches of validation windows per source, spread over the ranks
wandb_project = ""        # log to Weights & Biases too when set
wandb_run_name = ""
# system
device = "auto"
dtype = "bfloat16"        # bf16 compute, float32 master weights and gradient reduction; no FP8 (the failed 38B
                          # run used it)
compile = False           # torch.compile each block
activation_checkpoint = "full"  # "none", "selective" (keep the products, recompute the rest) or "full" (keep
                                # each block's input only): common.shard_model
reshard_after_forward = True    # False: keep each block gathered from its forward to its backward (one all-gather
                                # per block per micro-batch instead of two, for the memory of the gathered weights)
grad_sync = "every"             # gradient communication under accumulation (common.set_grad_sync): "every"
                                # micro-batch, "last_all_reduce" (HSDP: cross-node all-reduce on the last only) or
                                # "last" (unsharded gradients kept until the last micro-batch)
hsdp_replicas = 0         # >1: hybrid sharding, replicate over this many groups (nodes), shard within each;
                          # -1: one replica per node (world size / torchrun's LOCAL_WORLD_SIZE)
expert_parallel = 1       # >1 (an MoE): split the experts over groups of this many consecutive ranks (a node), tokens
                          # sent to their experts' ranks and back (moe.expert_parallel_ffn); capacity and balance
                          # statistics then count the group's tokens as one batch (common.device_mesh, shard_model)
pg_timeout_minutes = 30   # Tanuki's slow checkpoint saves needed 30 instead of 10 ("What failed")
# -----------------------------------------------------------------------------
config = load_config(globals())

rank, local_rank, world_size, device = setup_distributed(device, pg_timeout_minutes, world_of_one=True)
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
torch.manual_seed(seed)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 matmuls left (optimizer-side) may use TF32
    torch.backends.cudnn.allow_tf32 = True

# the global batch: whole sequences, split evenly over ranks, then into micro-batches
global_seqs = tokens_per_step // seq_len
per_rank = global_seqs // world_size
grad_accum = per_rank // micro_batch_size
if global_seqs * seq_len != tokens_per_step or per_rank * world_size != global_seqs \
        or grad_accum * micro_batch_size != per_rank or grad_accum == 0:
    raise SystemExit(f"tokens_per_step={tokens_per_step} must be a whole number of sequences of seq_len={seq_len}, "
                     f"split evenly over {world_size} ranks into micro-batches of {micro_batch_size}")

# -----------------------------------------------------------------------------
# data: validated before anything else is built, since Tanuki's runs died on missing or tiny shards

enc = load_tokenizer(data_dir)
enc_hash = tokenizer_hash(enc)
bos_id = special_id(enc, "<|bos|>")
if mixture and curriculum:
    raise SystemExit("set either mixture or curriculum, not both (a mixture is a curriculum of one stage)")
stages = [(int(start), dict(weights)) for start, weights in curriculum] or [(0, mixture)]
if stages[0][0] != 0 or [s for s, _ in stages] != sorted(s for s, _ in stages):
    raise SystemExit(f"curriculum stages must start at token 0 and be in order: {[s for s, _ in stages]}")
sources = sorted({name for _, weights in stages for name in weights})
if not sources:
    sources = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "meta.json")))
train_shards, val_shards = {}, {}
for name in sources:
    train_shards[name], _ = open_shards(data_dir, name, "train", enc_hash, min_tokens=seq_len + 1)
    val_shards[name], _ = open_shards(data_dir, name, "val", enc_hash, min_tokens=seq_len + 1)
if not sources:
    raise SystemExit(f"no sources in {data_dir}: expected <source>/meta.json folders written by prepare_data.py")
if not stages[0][1]:  # the natural mixture: each source as often as it has tokens
    stages = [(0, {name: sum(len(s) for s in train_shards[name]) for name in sources})]
for _, weights in stages:
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise SystemExit(f"mixture weights must be >= 0 with a positive sum: {weights}")
# a sample is a window of seq_len + 1 tokens (inputs and targets shifted by one) starting at a multiple of
# seq_len; windows cross document boundaries, which <|bos|>/<|eos|> mark (Tanuki's 8x8B used best-fit packing)
n_windows = {name: (sum(len(s) for s in train_shards[name]) - 1) // seq_len for name in sources}

# The loader's whole state: how many global batches were drawn, and per source (epoch, cursor) into that epoch's
# permutation of its windows. Every rank draws the same global batch and reads only its own slice of it, so the
# state is the same on all ranks and resumes exactly on any number of ranks. It never runs out: a source at the
# end of its windows starts a new epoch in a new order (Tanuki's loader raised StopIteration; "What failed").
loader = {"batches": 0, "sources": {name: [0, 0] for name in sources}}
_orders = {}


def window_order(name, epoch):
    if _orders.get(name, (None,))[0] != epoch:  # one permutation per source in memory (24M windows at 100B tokens)
        # keyed by the name, not its position in a list, so adding a source to a curriculum changes no other order
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), epoch])
        _orders[name] = (epoch, rng.permutation(n_windows[name]))
    return _orders[name][1]


def next_batch():
    """This rank's part of the next global batch: (grad_accum, micro_batch_size, seq_len + 1) token ids."""
    tokens_so_far = loader["batches"] * tokens_per_step
    weights = [w for start, w in stages if start <= tokens_so_far][-1]
    names = sorted(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    # which source each of the global batch's sequences comes from: fixed by (seed, batch number)
    choice = np.random.default_rng([seed, loader["batches"]]).choice(len(names), size=global_seqs, p=p / p.sum())
    picks = []
    for i in choice:
        name = names[i]
        epoch, cursor = loader["sources"].setdefault(name, [0, 0])
        picks.append((name, int(window_order(name, epoch)[cursor])))
        cursor += 1
        if cursor == n_windows[name]:
            epoch, cursor = epoch + 1, 0
            print0(f"data: source '{name}' starts epoch {epoch} ({n_windows[name]:,} windows per epoch)")
        loader["sources"][name] = [epoch, cursor]
    loader["batches"] += 1
    mine = picks[rank * per_rank : (rank + 1) * per_rank]
    batch = np.stack([read_tokens(train_shards[name], w * seq_len, seq_len + 1) for name, w in mine])
    return torch.from_numpy(batch).view(grad_accum, micro_batch_size, seq_len + 1)


# -----------------------------------------------------------------------------
# model: built on the meta device (no memory), sharded, then each rank fills only its own shards
# (checkpoint.init_sharded): from scratch by drawing each tensor from a generator seeded by its name, or from init_from
# by reading its slices of the file. No host ever holds the whole model (the 8x8B is 188 GB in float32), and the
# weights do not depend on the number of ranks.

if init_from:
    init_meta, model_cfg = read_model_config(init_from)  # checked against the weights' shapes first
    if init_meta.get("tokenizer_hash") != enc_hash:
        raise SystemExit(f"{init_from} was trained with a different tokenizer than {data_dir}'s")
else:
    model_cfg = model_config_from(globals())
if enc.n_vocab > model_cfg.vocab_size:  # the shards hold ids of this tokenizer (open_shards checked the hash)
    raise SystemExit(f"the tokenizer has {enc.n_vocab} ids but the model's vocab_size is {model_cfg.vocab_size}")
if seq_len > model_cfg.max_seq_len:
    raise SystemExit(f"seq_len={seq_len} is longer than the model's max_seq_len={model_cfg.max_seq_len}")
with torch.device("meta"):
    model = Transformer(model_cfg)
if hsdp_replicas == -1:  # shard over a node's GPUs (NVLink), replicate across nodes (InfiniBand)
    hsdp_replicas = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
if expert_parallel > 1 and not model_cfg.n_experts:
    raise SystemExit(f"expert_parallel={expert_parallel} needs an MoE model (n_experts > 0)")
mesh = device_mesh(device_type, world_size, hsdp_replicas, expert_parallel)
shard_model(model, mesh, ptdtype, activation_checkpoint, compile, reshard_after_forward, expert_parallel)
model.to_empty(device=device)
init_sharded(model, seed, init_from)
flops_per_token = model.flops_per_token(seq_len)
print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {world_size} ranks, {grad_accum} micro-batches of "
       f"{micro_batch_size} x {seq_len} per rank per step, {tokens_per_step:,} tokens per step")

# AdamW, weight decay on matrices only (common.adamw)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = adamw(params, learning_rate, weight_decay, (beta1, beta2), device_type)

# -----------------------------------------------------------------------------
# state that a checkpoint carries besides weights and optimizer, and resuming it

counters = {"skipped": 0, "nan": 0, "spikes": 0, "rollbacks": 0}
history = {"loss": [], "grad_norm": [], "spike_steps": []}  # the spike test's running window
lr_scale = 1.0  # lowered by rollback_lr_factor at each rollback
step = 0
ckpt_root = os.path.join(out_dir, "checkpoints")
# a checkpoint whose files do not match its manifest is refused by name; "auto" then takes the one before it
resume_dir = latest_checkpoint(ckpt_root, None, trust_unverified_checkpoint) if resume == "auto" else resume
if resume_dir and lr_range_test:
    raise SystemExit("an LR range test starts from fresh weights: drop --resume")
if resume_dir:
    state = load_train_checkpoint(resume_dir, model, optimizer, {"tokenizer_hash": enc_hash},
                                  trust_unverified_checkpoint)
    changed = [name for name in sources if state["windows"].get(name, n_windows[name]) != n_windows[name]]
    if changed:  # the saved positions index permutations of the old windows: they would mean other samples now
        raise SystemExit(f"the data of {changed} changed since {resume_dir} was written: resume would not be exact")
    step, lr_scale = state["step"], state["lr_scale"]
    loader, counters, history = state["loader"], state["counters"], state["history"]
    print0(f"resumed from {resume_dir} at step {step}")


def train_state():
    return {"loader": loader, "windows": n_windows, "counters": counters, "history": history, "lr_scale": lr_scale,
            "tokenizer_hash": enc_hash, "model": asdict(model_cfg), "config": config}


@torch.no_grad()
def documents(x):
    """The document id of every token of the windows x (micro_batch_size, seq_len) when document_mask is on: a new
    document at each <|bos|>; what precedes the first one in a window is the end of a document begun before it."""
    return (x == bos_id).cumsum(dim=1) if document_mask else None


def evaluate():
    """Mean validation loss per source over the same windows at every evaluation and on any number of ranks: the
    first eval_iters x micro_batch_size windows of each source's val split (all of them if it has fewer), dealt
    round-robin to the ranks. Every rank runs the same number of forwards, since under FSDP each one is a collective:
    when the windows do not divide evenly (8 windows over 128 ranks), a rank with none left runs window 0 with every
    target ignored, which adds nothing to the sum."""
    model.eval()
    out = {}
    for name in sources:
        n = min((sum(len(s) for s in val_shards[name]) - 1) // seq_len, eval_iters * micro_batch_size)
        per = -(-n // world_size)  # windows per rank, rounded up
        total = torch.zeros((), device=device)
        for first in range(0, per, micro_batch_size):
            windows = [rank + world_size * i for i in range(first, min(first + micro_batch_size, per))]
            batch = torch.from_numpy(np.stack([read_tokens(val_shards[name], (w if w < n else 0) * seq_len,
                                                           seq_len + 1) for w in windows])).to(device)
            targets = batch[:, 1:].clone()
            targets[torch.tensor([w >= n for w in windows], device=device)] = -1  # padding: ignored by the loss
            real = sum(w < n for w in windows)
            # the mean over real rows' tokens, times their count
            total += model(batch[:, :-1], targets, doc_ids=documents(batch[:, :-1]))[1] * real
        dist.all_reduce(total)
        out[name] = total.item() / n
    model.train()
    return out


def log_metrics(record):
    if master:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_project:
            wandb.log(record, step=record["step"])


stop_requested = False


def on_sigterm(signum, frame):
    # SLURM and torchrun send SIGTERM before killing: finish this step, save, exit (the flag is all-reduced with
    # the loss, so all ranks stop at the same step even if the signal reaches them at different times)
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, on_sigterm)
if master:
    os.makedirs(out_dir, exist_ok=True)
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config, resume="allow")
finish_save = None  # an async checkpoint still being written
# time per rank on work that waits for no other rank (reading data, the optimizer's update of its shard): under
# FSDP every collective makes the fast ranks wait for the slow one, so only this shows which rank is slow
t_log, local_work, steps_since_log = time.perf_counter(), 0.0, 0
stop = False

# -----------------------------------------------------------------------------
# the training loop: one optimizer step per iteration

model.train()
while step < max_iters:
    if lr_range_test:
        lr = min_lr * (learning_rate / min_lr) ** (step / max(1, max_iters - 1))
    else:
        lr = lr_scale * lr_at(step, learning_rate, min_lr, warmup_iters, max_iters, lr_schedule, wsd_decay_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t_local = time.perf_counter()
    batch = next_batch()
    local_work += time.perf_counter() - t_local
    if any(first <= step <= last for first, last in skip_steps):
        # the data is consumed, nothing is trained, the schedule moves on: as Megatron does. No forward means
        # nothing to log or save: a SIGTERM or a checkpoint interval inside the range waits for its end (seconds)
        counters["skipped"] += 1
        step += 1
        continue

    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        set_grad_sync(model, micro == grad_accum - 1, grad_sync)
        x, y = batch[micro, :, :-1].to(device), batch[micro, :, 1:].to(device)  # (micro_batch_size, seq_len)
        if z_loss:
            # pulls log Z of the softmax toward 0 so the logits cannot drift large (PaLM's auxiliary loss). It
            # needs the logits, which the fused loss kernel on CUDA never materializes: computed here instead
            logits = model(x, doc_ids=documents(x))[0].float()  # (micro_batch_size, seq_len, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            objective = loss + z_loss * logits.logsumexp(dim=-1).pow(2).mean()
        else:
            objective = loss = model(x, y, doc_ids=documents(x))[1]  # an MoE's: plus the routers' losses
        (objective / grad_accum).backward()  # FSDP averages over ranks; we average over micro-batches
        loss_sum += loss.detach()
    # the global grad norm over every shard of every mesh; an infinite max_norm only measures it
    grad_norm = clip_grad_norm(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # one small all-reduce per step: the mean loss over ranks and whether any rank got SIGTERM. Every rank then
    # takes the same skip / spike / stop decisions from the same numbers.
    sync = torch.stack([loss_sum / grad_accum, torch.tensor(float(stop_requested), device=device)])
    dist.all_reduce(sync)
    loss_value, stop = sync[0].item() / world_size, sync[1].item() > 0
    norm_value = grad_norm.item()

    # stability: NaN/Inf first (Tanuki: NaN in a local grad norm; skipped those iterations), then spikes
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    spike = False
    if finite and len(history["loss"]) >= 10:
        recent_loss = np.array(history["loss"])
        spike = bool(loss_value > recent_loss.mean() + spike_zscore * recent_loss.std()
                     or norm_value > spike_grad_factor * np.median(history["grad_norm"]))
    if lr_range_test and (spike or not finite):
        last_stable = min_lr * (learning_rate / min_lr) ** ((step - 1) / max(1, max_iters - 1))
        print0(f"LR range test: the loss spiked at lr {lr:.3e} (step {step}); the last stable LR was "
               f"{last_stable:.3e}")
        log_metrics({"step": step, "lr_range_test": {"spike_lr": lr, "last_stable_lr": last_stable}})
        break
    if finite and not spike:
        t_local = time.perf_counter()
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()  # the update runs asynchronously: wait for it to time it
        local_work += time.perf_counter() - t_local
        if model_cfg.moe_bias_update_rate > 0:  # DeepSeek-V3's balancing, after each update (moe.py)
            update_expert_bias(model, model_cfg.moe_bias_update_rate)
        history["loss"] = (history["loss"] + [loss_value])[-spike_window:]
        history["grad_norm"] = (history["grad_norm"] + [norm_value])[-spike_window:]
    else:
        counters["skipped"] += 1
        counters["nan"] += not finite
        counters["spikes"] += spike
        print0(f"step {step}: skipped ({'NaN/Inf' if not finite else 'spike'}: loss {loss_value:.4f}, "
               f"grad norm {norm_value:.3f})")
    optimizer.zero_grad(set_to_none=True)
    step += 1

    if spike or not finite:  # NaN steps too: once the weights hold NaN, every step after is NaN
        history["spike_steps"] = [s for s in history["spike_steps"] if s > step - spike_window] + [step - 1]
    if len(history["spike_steps"]) >= rollback_after:
        # repeated spikes or NaN/Inf: the weights themselves are going bad. Go back to the newest checkpoint written
        # before the first of them (none holds NaN: save_train_checkpoint refuses those); the loader keeps its
        # position, so the data that came with them is not seen again. Later checkpoints are deleted.
        first_spike = history["spike_steps"][0]
        if finish_save is not None:  # first: its commit may prune the checkpoint picked next
            finish_save()
            finish_save = None
        target = latest_checkpoint(ckpt_root, first_spike, trust_unverified_checkpoint)
        if target is None:
            print0(f"step {step}: {rollback_after} spikes or NaN steps since step {first_spike} but no checkpoint "
                   "before them to roll back to; going on")
            history["spike_steps"] = []
        else:
            if master:
                for d in os.listdir(ckpt_root):
                    if d.startswith("step_") and int(d[5:].split(".")[0]) > first_spike:
                        shutil.rmtree(os.path.join(ckpt_root, d))
            dist.barrier()
            state = load_train_checkpoint(target, model, optimizer, trust_unverified=trust_unverified_checkpoint)
            step, history = state["step"], state["history"]
            lr_scale = state["lr_scale"] * rollback_lr_factor
            counters["rollbacks"] += 1
            print0(f"rolled back to {target} (spikes or NaN from step {first_spike} on); LR scale {lr_scale}")
            log_metrics({"step": step, "event": "rollback", "to": os.path.basename(target), "lr_scale": lr_scale,
                         **counters})
            continue

    steps_since_log += 1
    if step % log_interval == 0 or step == max_iters:
        # Megatron-style line, plus the slowest rank: a leftover process on some of Tanuki's nodes cost 2/3 of the
        # speed unnoticed. A rank whose local work takes far longer than the median is the one to look at.
        elapsed = time.perf_counter() - t_log
        local_all = torch.zeros(world_size, device=device)
        local_all[rank] = local_work / steps_since_log
        dist.all_reduce(local_all)
        slowest = int(local_all.argmax())
        dt = elapsed / steps_since_log
        tok_s = tokens_per_step / world_size / dt
        device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu"
        utilization = mfu(flops_per_token, tok_s, device_name)
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                  "tokens": loader["batches"] * tokens_per_step, **counters, "ms_per_step": 1000 * dt,
                  "tok_per_s_per_gpu": tok_s, "tflops_per_gpu": flops_per_token * tok_s / 1e12, "mfu": utilization,
                  "epochs": {name: e for name, (e, _) in loader["sources"].items()},
                  "samples": {name: e * n_windows[name] + c for name, (e, c) in loader["sources"].items()},
                  "slowest_rank": slowest, "slowest_local_ms": 1000 * local_all[slowest].item(),
                  "median_local_ms": 1000 * local_all.median().item()}
        moe_line = ""
        if model_cfg.n_experts:  # balance loss, z-loss and expert load per MoE layer, of this step's last forward
            record["moe"] = moe_stats(model)  # {layer: stats}
            layers = list(record["moe"].values())
            # balance 1.0 is perfectly even (Tanuki's stayed ~1.0); max load: the busiest expert's share of tokens
            moe_line = (f" | MoE balance {np.mean([m['aux_loss'] for m in layers]):.3f} z "
                        f"{np.mean([m['z_loss'] for m in layers]):.2f} max load {max(m['load_max'] for m in layers):.3f}")
        print0(f"step {step}/{max_iters} | tokens {record['tokens'] / 1e6:.2f}M | {1000 * dt:.1f} ms/step | "
               f"{tok_s:,.0f} tok/s/GPU | {record['tflops_per_gpu']:.2f} TFLOP/s/GPU | "
               f"MFU {'-' if utilization is None else f'{100 * utilization:.1f}%'} | lr {lr:.3e} | "
               f"loss {loss_value:.4f} | grad norm {norm_value:.3f} | skipped {counters['skipped']} "
               f"(NaN {counters['nan']}, spikes {counters['spikes']}, rollbacks {counters['rollbacks']}) | "
               f"slowest rank {slowest}: {record['slowest_local_ms']:.1f} ms local work (median "
               f"{record['median_local_ms']:.1f}){moe_line}")
        log_metrics(record)
        t_log, local_work, steps_since_log = time.perf_counter(), 0.0, 0

    t_side = time.perf_counter()  # evaluation and checkpoints are left out of the ms/step of the log line
    if step % eval_interval == 0 or step == max_iters:
        val = evaluate()
        print0("val loss " + " | ".join(f"{name} {v:.4f}" for name, v in val.items()))
        log_metrics({"step": step, "val_loss": val})

    last = step == max_iters or stop
    if not lr_range_test and (step % checkpoint_interval == 0 or last):
        if finish_save is not None:
            finish_save()
        finish_save = save_train_checkpoint(ckpt_root, step, model, optimizer, train_state(), keep_checkpoints,
                                            async_save=async_checkpoint and not last)
    t_log += time.perf_counter() - t_side
    if stop:
        print0(f"SIGTERM: saved step {step}, exiting")
        break

if finish_save is not None:
    finish_save()

# -----------------------------------------------------------------------------
# the model alone, consolidated, in `dtype`: the input of upcycle.py, sft.py, eval.py and serve.py

if not lr_range_test and not stop:  # after SIGTERM the grace period is for the checkpoint
    # collective: the tensors are gathered one at a time and rank 0 writes each as it arrives, so no rank ever holds
    # more than one whole tensor of the model (checkpoint.save_checkpoint)
    save_checkpoint(os.path.join(out_dir, "model"), model, enc, stage="pretrain", dtype=ptdtype,
                    extra={"step": step, "tokens": loader["batches"] * tokens_per_step, "config": config})
    print0(f"saved the model to {os.path.join(out_dir, 'model')}")
if wandb_project and master:
    wandb.finish()  # now: cleanup_distributed leaves without the interpreter's exit handlers
dist.barrier()  # every rank leaves together, after rank 0's export: torchrun then sees one clean exit
cleanup_distributed()
