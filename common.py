"""
What several stages share, and nothing else (docs/design.md "Layout"): configuration, distributed set-up, FSDP2
sharding, learning-rate schedules, the MFU helper and the token shards. Checkpoints are in checkpoint.py, the
OpenAI-compatible client and the LLM judge in llm_api.py.
"""

import ast
import datetime
import difflib
import json
import math
import os
import sys
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model import ModelConfig
from moe import MoE

# -----------------------------------------------------------------------------
# configuration: defaults are plain names at the top of each stage, then configs/x.py, then --key=value
# (nanoGPT's configurator, made strict: an unknown key or a value of the wrong type is an error)

CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


def load_config(scope, argv=None):
    """Override the stage's defaults in `scope` (its globals()) from config files and --key=value arguments,
    in the order given. The defaults are the names defined so far whose values are plain data and that do not
    start with an underscore, so call it right after the block of defaults, before any constant tables.
    Returns the final configuration as a dict (for logs and checkpoints)."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)}
    for arg in argv:
        if not arg.startswith("--"):
            folder, name = os.path.split(arg)
            if not os.path.isfile(arg) and os.path.basename(folder) == "config":
                # the model card's commands spell the folder config/ (torchrun train.py config/8b.py): the same file
                arg = os.path.join(os.path.dirname(folder), "configs", name)
            if not os.path.isfile(arg):
                raise SystemExit(f"config file not found: {arg}")
            file_scope = {}
            exec(open(arg, encoding="utf-8").read(), file_scope)
            for key, value in file_scope.items():
                # a config file may compute with helpers of its own (_name, imports); those are not settings
                if not key.startswith("_") and isinstance(value, CONFIG_TYPES):
                    scope[key] = _checked(key, value, defaults, source=arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep and isinstance(defaults.get(key), bool):
                text = "True"  # a bare --flag switches a boolean on
            elif not sep:
                raise SystemExit(f"expected --key=value, got {arg}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string: --out_dir=out/tiny
            scope[key] = _checked(key, value, defaults, source=arg)
    return {k: scope[k] for k in defaults}


def _checked(key, value, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise SystemExit(f"unknown config key '{key}' (from {source}).{hint}\nValid keys: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and type(value) is float and value.is_integer():
        return int(value)  # max_iters=1e6 means an integer
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, str) and isinstance(value, (int, float)):
        return str(value)  # --out_dir=2024 is a path, not a number
    raise SystemExit(f"config key '{key}' (from {source}) expects {type(default).__name__}, "
                     f"got {type(value).__name__}: {value!r}")


def model_config_from(scope):
    """The ModelConfig named by a stage's settings (d_model, n_layer, ...; any field not set keeps its default)."""
    return ModelConfig(**{f.name: scope[f.name] for f in fields(ModelConfig) if f.name in scope})


# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python stage.py` is a world of one

def set_cpu_threads():
    """Give torch one intra-op thread per CPU core this process may run on (os.sched_getaffinity: taskset, a
    cpuset or a container limit it to fewer than the machine has), shared among the ranks of this node under
    torchrun (LOCAL_WORLD_SIZE). An explicit OMP_NUM_THREADS wins (torchrun sets 1 when it starts several processes,
    unless set). Returns the count. Every torch stage calls it (setup_distributed; eval.py, upcycle.py, synth.py).
    The count alone does not stop the slowdown beside a busy neighbour: GNU libgomp's threads spin at every barrier.
    On 2 cores beside a loop of another job's tests, the tiny pretraining ran at 1.4-2.2k tok/s (14k idle); with
    OMP_WAIT_POLICY=PASSIVE at 7.3-8.0k (12-13k idle), as fast as 1 thread (7.5-7.9k, 8k idle). libgomp reads the
    policy when it loads, at `import torch`, too early for this function: speedrun.sh exports it."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS
    threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    torch.set_num_threads(threads)
    return threads


def setup_distributed(device="auto", timeout_minutes=30, world_of_one=False):
    """Returns (rank, local_rank, world_size, device). NCCL on CUDA, gloo on CPU. The process-group timeout is a
    setting because collectives wait on the slowest rank: Tanuki's 8x8B checkpoint saves to slow storage hit the
    default 10 minutes and needed 30 (docs/recipe.md "What failed"). With world_of_one, a plain `python stage.py` gets a
    process group of one, so an FSDP stage has a single code path to read and test."""
    set_cpu_threads()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # on CUDA, gloo beside NCCL for CPU tensors: DCP's async save runs its collectives on the CPU
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    elif world_of_one and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return rank, local_rank, world_size, device


def cleanup_distributed():
    """The last line of a stage: every rank is done (the caller's barrier) and its output is on disk. The process
    group is destroyed and the process leaves at once, without the interpreter's teardown: about one 2-rank gloo run
    in 30 here aborted in that teardown ("terminate called without an active exception", SIGABRT, no Python frame)
    after all its work was written, and torchrun then reports a finished run as failed. Gloo's threads outlive a
    process group that Python objects (the model's device mesh) still hold until finalization, which is when the
    crash comes (pytorch/pytorch PR 179291 describes it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print0(*args, **kwargs):
    """print on rank 0 only: 128 ranks printing the same line help nobody"""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# the optimizer and learning-rate schedules

def adamw(params, learning_rate, weight_decay, betas, device_type):
    """AdamW over the trained `params` (train.py, sft.py, dpo.py, simulate.py), weight decay on matrices only:
    decaying norm gains toward 0 only fights the normalization (nanoGPT). The fused kernel on CUDA."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=learning_rate, betas=betas, eps=1e-8, fused=device_type == "cuda")


def lr_at(step, max_lr, min_lr, warmup_steps, total_steps, schedule="cosine", decay_frac=0.2):
    """Learning rate at `step` (0-based).
    cosine: linear warmup, then cosine from max_lr to min_lr at total_steps (Tanuki's Megatron runs:
            1000 warmup steps, 1e-4 -> 1e-6; docs/recipe.md "Released training scripts").
    wsd:    warmup-stable-decay: linear warmup, max_lr held, then the last `decay_frac` of the steps cooled to
            min_lr along 1 - sqrt (MiniCPM; Hagele et al. 2024). A run can be extended from any stable-phase
            checkpoint, since nothing before the cooldown depends on total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = total_steps - int(decay_frac * total_steps)
        if step < decay_start:
            return max_lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return min_lr + (max_lr - min_lr) * (1 - math.sqrt(progress))
    raise ValueError(f"unknown lr schedule '{schedule}': use 'cosine' or 'wsd'")


# -----------------------------------------------------------------------------
# model FLOPs utilization: achieved FLOP/s over the device's dense bf16 peak

PEAK_BF16_FLOPS = {  # dense (no 2:4 sparsity), from the vendors' data sheets
    "H200": 989e12,
    "H100 SXM": 989e12,   # the 989 TFLOP/s that Tanuki's ~25% MFU is measured against (docs/recipe.md "Pretraining")
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,       # names without the form factor: assume SXM, the cluster part
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def peak_flops(device_name):
    """Peak dense bf16 FLOP/s of a device name as torch.cuda.get_device_name() reports it, or None when unknown
    (a CPU has no meaningful entry; MFU is then not reported rather than made up)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # the most specific name first
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token, tokens_per_second_per_device, device_name):
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_token * tokens_per_second_per_device / peak


# -----------------------------------------------------------------------------
# token shards written by prepare_data.py: DATA_DIR/<source>/{meta.json, train_000000.bin ..., val_000000.bin}
# raw little-endian token arrays with no header, documents framed <|bos|> ... <|eos|> and concatenated

def open_shards(data_dir, source, split, tokenizer_hash, min_tokens=1):
    """Memory-map the `split` ("train" or "val") shards of one source, after checking everything that can be
    checked without reading them: Tanuki's runs died on missing or tiny shards at start-up
    (docs/recipe.md "What failed"), so every mismatch is an error naming the file, raised before a single step is
    trained.
    Returns (list of 1-D numpy memmaps, meta dict)."""
    where = os.path.join(data_dir, source)
    meta_path = os.path.join(where, "meta.json")
    if not os.path.isdir(where):
        found = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "meta.json"))) \
            if os.path.isdir(data_dir) else []
        raise SystemExit(f"data source '{source}' not found: no directory {where} (sources in {data_dir}: {found})")
    if not os.path.isfile(os.path.join(data_dir, "stats.json")):  # prepare_data.py writes it last
        raise SystemExit(f"{data_dir} is incomplete: no stats.json, which prepare_data.py writes when it has finished "
                         f"(was it interrupted? run it again)")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{meta_path} is missing: was prepare_data.py interrupted?")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("tokenizer_hash") != tokenizer_hash:
        raise SystemExit(f"{meta_path}: tokenized with a different tokenizer (hash {str(meta.get('tokenizer_hash'))[:12]}"
                         f" != {tokenizer_hash[:12]}); re-run prepare_data.py with this tokenizer")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    files = meta[split]["files"]
    if not files:
        raise SystemExit(f"{meta_path}: no {split} shards listed")
    shards = []
    for name in files:
        path = os.path.join(where, name)
        if not os.path.isfile(path):
            raise SystemExit(f"shard {path} listed in {meta_path} is missing")
        size = os.path.getsize(path)
        if size == 0 or size % dtype.itemsize:
            raise SystemExit(f"shard {path} is empty or truncated ({size} bytes, {dtype.itemsize}-byte tokens)")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    total = sum(len(s) for s in shards)
    if total != meta[split]["tokens"]:
        raise SystemExit(f"{where}: the {split} shards hold {total:,} tokens but {meta_path} says "
                         f"{meta[split]['tokens']:,}: a shard is truncated or from another run")
    if total < min_tokens:
        raise SystemExit(f"{where}: the {split} split has {total:,} tokens, fewer than one sample ({min_tokens:,})")
    return shards, meta


def read_tokens(shards, start, length):
    """`length` tokens from position `start` of the concatenation of `shards` (a span may cross a shard end),
    as an int64 numpy array."""
    out = []
    for shard in shards:
        if start >= len(shard):
            start -= len(shard)
            continue
        out.append(np.asarray(shard[start : start + length], dtype=np.int64))
        length -= len(out[-1])
        start = 0
        if length == 0:
            break
    return np.concatenate(out)


# -----------------------------------------------------------------------------
# FSDP2: every rank holds 1/N of each parameter, gradient and optimizer state (ZeRO-3;
# docs/recipe.md "General guidance": sharded data parallel). Tanuki trained with Megatron; FSDP2 is the PyTorch-native
# equivalent.

def device_mesh(device_type, world_size, hsdp_replicas=0, expert_parallel=1):
    """The ranks' mesh of a sharded run (train.py; simulate.py): ("shard",), FSDP over every rank, or with
    hsdp_replicas > 1 ("replicate", "shard"), HSDP: shard within a group of world / hsdp_replicas ranks (a node),
    replicate across groups. expert_parallel is checked here (it must divide the shard group) and applied by
    shard_model, which splits "shard" into ("shard_mod_ep", "ep")."""
    replicas = hsdp_replicas if hsdp_replicas > 1 else 1
    if world_size % replicas or (world_size // replicas) % expert_parallel:
        raise SystemExit(f"{world_size} ranks cannot make {replicas} replicas of a shard group divisible into "
                         f"expert-parallel groups of {expert_parallel} (hsdp_replicas={hsdp_replicas}, "
                         f"expert_parallel={expert_parallel})")
    from torch.distributed.device_mesh import init_device_mesh
    shape, names = (replicas, world_size // replicas), ("replicate", "shard")
    return init_device_mesh(device_type, shape[replicas == 1:], mesh_dim_names=names[replicas == 1:])


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ for parameters sharded over any mix of meshes (with expert parallelism the
    experts' DTensors and the rest live on different meshes, which DTensor's own norm cannot combine): the L2 norm
    of every gradient, from each rank's local shards and one all-reduce, and the gradients scaled by
    min(1, max_norm / norm). A shard replicated over a mesh dimension (HSDP) counts once. Returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    copies = [math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
              if isinstance(g, DTensor) else (dist.get_world_size() if dist.is_initialized() else 1) for g in grads]
    squares = torch.stack([n.float().square() / c for n, c in zip(torch._foreach_norm(local), copies)]).sum()
    if dist.is_initialized():
        dist.all_reduce(squares)
    norm = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


AC_MODES = ("none", "selective", "full")


def _save_matmuls(ctx, op, *args, **kwargs):
    """Selective activation checkpointing's policy (Korthikanti et al. 2022; torchtitan's "op" mode): keep the
    outputs of the expensive products (matrix multiplies, attention) for the backward and recompute the cheap
    elementwise ops (norms, RoPE, SiLU, the gating product) from them. About half the memory of keeping everything,
    for a recompute of a few percent of the FLOPs instead of full checkpointing's one extra forward."""
    from torch.utils.checkpoint import CheckpointPolicy
    aten = torch.ops.aten
    expensive = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten._grouped_mm.default,
                 aten._scaled_dot_product_efficient_attention.default,
                 aten._scaled_dot_product_flash_attention.default,
                 aten._scaled_dot_product_flash_attention_for_cpu.default}
    # the kernels' custom ops count as products; expert parallelism's row exchange is kept too, so that the
    # recompute does not send every token's rows over the network again (torchtitan keeps it as well)
    exchange = torch.ops._c10d_functional.all_to_all_single.default
    if op in expensive or op is exchange or str(op).startswith("nanotanuki."):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def shard_model(model, mesh, param_dtype, activation_checkpoint="full", compile=False, reshard_after_forward=True,
                expert_parallel=1):
    """Shard `model` (a Transformer) in place over `mesh`, in torchtitan's order: the embedding, each block,
    the final norm + lm_head, then the root, which takes whatever is left. A block is all-gathered just before
    its forward and freed after it, so at most about one block's full weights exist at a time.
    Mixed precision: weights are all-gathered and computed in `param_dtype` (bf16 on H100) while the master
    copy the optimizer updates stays float32, and gradients are reduce-scattered in float32 so that summing
    over hundreds of ranks does not round away small updates.
    A 1-D mesh is plain FSDP; a 2-D mesh ("replicate", "shard") is hybrid sharding: shard within a node
    over NVLink, replicate across nodes, so only the gradient all-reduce crosses the slower network.
    activation_checkpoint: "none" keeps every activation, "selective" keeps the products' outputs and recomputes
    the elementwise ops (_save_matmuls), "full" keeps only each block's input and recomputes the block (True and
    False mean "full" and "none"). reshard_after_forward=False keeps each block gathered from its forward to its
    backward: one all-gather per block per micro-batch instead of two, for the memory of the unsharded weights.
    expert_parallel > 1: each MoE layer's experts are split over groups of that many consecutive ranks of the
    shard group (shard_experts)."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    mode = {True: "full", False: "none"}.get(activation_checkpoint, activation_checkpoint)
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint={activation_checkpoint!r}: use one of {AC_MODES}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if expert_parallel > 1:
        # device_mesh's "shard" split in two (torchtitan's arrangement): "ep", groups of expert_parallel consecutive
        # ranks (a node's NVLink) that split the experts among them, and "shard_mod_ep", the ranks that hold the
        # same experts, over which FSDP shards those; the dense parameters stay on `mesh`
        replicated = "replicate" in (mesh.mesh_dim_names or ())
        shard = mesh["shard"].size() if replicated else mesh.size()
        split = mesh._unflatten("shard", (shard // expert_parallel, expert_parallel), ("shard_mod_ep", "ep"))
        ep_mesh = split["ep"]
        expert_mesh = split["replicate", "shard_mod_ep"] if replicated else split["shard_mod_ep"]

    def placement(param):
        # FSDP shards dim 0 by default. The stacked experts (moe.py, (E, ffn, d) and (E, d, ffn)) have only E = 8
        # rows there: over 128 ranks each shard would be padded to a whole expert and ranks 0-7 would hold ~15x
        # their share. Their dim 1 (ffn 14336 or d_model 4096) splits evenly over any power-of-two group.
        return Shard(1) if param.ndim == 3 else Shard(0)

    for i, block in enumerate(model.blocks):
        if expert_parallel > 1 and isinstance(block.ffn, MoE):
            shard_experts(block.ffn, ep_mesh, expert_mesh, mesh, mp, reshard_after_forward)
        if mode == "full":
            # recompute the block's activations in the backward instead of keeping them
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay
        elif mode == "selective":
            block = checkpoint_wrapper(block, preserve_rng_state=False,
                                       context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        if compile:
            # per block, not the whole model: one graph compiled once, reused n_layer times. fullgraph: a graph
            # break would silently split the block and lose the fusion (tests/test_moe.py checks there is none).
            # An MoE block records its balance losses and routing counts on the module in its forward; under
            # recomputation dynamo refuses such side effects unless told not to replay them in the backward,
            # which is what they need: recorded once per forward, not again by the recompute.
            # With expert parallelism the block is compiled in pieces: the exchange's sizes are read on the host
            # mid-block (moe.host_splits): a graph break by nature
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
            block.compile(fullgraph=expert_parallel <= 1)
        fully_shard(block, mesh=mesh, mp_policy=mp, shard_placement_fn=placement,
                    reshard_after_forward=reshard_after_forward)
        model.blocks[i] = block
    if not model.cfg.tie_embeddings:  # a tied weight belongs to two modules: leave it to the root
        fully_shard(model.embed, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # the output layer runs last in the forward and first in the backward: keeping it gathered between the
        # two saves one all-gather of the largest matrix per step
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def shard_experts(moe, ep_mesh, expert_mesh, dense_mesh, mp, reshard_after_forward):
    """Expert parallelism for one MoE layer (torchtitan's arrangement): its stacked experts become DTensors split
    by expert (dim 0) over `ep_mesh`, so each rank of an expert-parallel group holds E / ep of them and runs their
    rows (moe.expert_parallel_ffn), and FSDP shards those along dim 1 over `expert_mesh`, the ranks that hold the
    same experts: a rank all-gathers only its own experts, 1/ep of the layer's. The router stays with the dense
    parameters (its own FSDP group: a parameter belongs to one group, and the experts' is on another mesh)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    ep = ep_mesh.size()
    if moe.n_experts % ep:
        raise SystemExit(f"expert_parallel={ep} must divide n_experts={moe.n_experts}")
    for name in ("w_gate", "w_up", "w_down"):
        setattr(moe, name, torch.nn.Parameter(distribute_tensor(getattr(moe, name).data, ep_mesh, [Shard(0)])))
    moe.ep_group = ep_mesh.get_group()
    fully_shard(moe.router, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(moe, mesh=expert_mesh, mp_policy=mp, shard_placement_fn=lambda param: Shard(1),
                reshard_after_forward=reshard_after_forward)
    # an expert's gradient arrives summed over its expert-parallel group (the exchange's backward brings every
    # rank's rows), then FSDP sums it over expert_mesh: over every rank once. Divided by the world size, as the
    # dense gradients are averaged, not by expert_mesh's size
    moe.set_gradient_divide_factor(float(dense_mesh.size()))


GRAD_SYNC_MODES = ("every", "last_all_reduce", "last")


def set_grad_sync(model, last_micro_batch, grad_sync="every"):
    """Which gradient communication the coming backward does, under gradient accumulation:
    every            reduce-scatter (and, with HSDP, all-reduce across replicas) after every micro-batch
    last_all_reduce  reduce-scatter every micro-batch, the cross-replica all-reduce (HSDP's slow inter-node hop)
                     only after the last: the shard's float32 gradient accumulates locally in between
    last             no gradient communication until the last micro-batch: the unsharded float32 gradients are
                     kept meanwhile (the memory of a full gradient copy), then reduced once per step"""
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync={grad_sync!r}: use one of {GRAD_SYNC_MODES}")
    if grad_sync == "last":
        model.set_requires_gradient_sync(last_micro_batch)
    elif grad_sync == "last_all_reduce":
        model.set_requires_all_reduce(last_micro_batch)
