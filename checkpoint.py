"""
Checkpoints, which several stages share: the model + config + tokenizer directory every later stage
loads (safetensors, written and read one tensor or one shard at a time), a sharded model filled rank by rank from
scratch or from such a checkpoint, the fine-tuning model build and its merged export, and the training checkpoints
(DCP) that a run resumes from, each checked against the manifest written when it was committed.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common import print0, shard_model
from model import ModelConfig, Transformer, add_lora, init_value
from tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash

# -----------------------------------------------------------------------------
# checkpoints every later stage loads: a directory with config.json, model.safetensors and the tokenizer

def write_safetensors(path, tensors, dtype=None):
    """Write {name: tensor} as one safetensors file, one tensor at a time, cast to `dtype` on the way.
    safetensors.torch.save_file would first build the whole file in memory: a second copy of the model
    (16 GB for Tanuki-8B in bf16). The format is an 8-byte header length, a JSON header, then raw bytes.
    Sharded tensors (DTensors of an FSDP model) are gathered one at a time: then every rank must call this, in
    the same order (each gather is a collective), and only the rank with a `path` (not None) writes. No rank ever
    holds more than one whole tensor (at most one stacked expert weight, 1.9 GB at 8x8B in bf16)."""
    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without format "pt"
    for name, t in tensors.items():  # a DTensor's shape and dtype are the whole tensor's
        size = t.numel() * (dtype or t.dtype).itemsize
        header[name] = {"dtype": dtype_names[dtype or t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(header).encode()
    header += b" " * (-len(header) % 8)  # pad to 8 bytes, as safetensors does, so tensors stay aligned
    with open(path, "wb") if path is not None else contextlib.nullcontext() as f:
        if f:
            f.write(len(header).to_bytes(8, "little") + header)
        for t in tensors.values():
            t = t.detach().to(dtype or t.dtype)  # cast before a gather: half the bytes moved in bf16
            if isinstance(t, DTensor):
                # a gather returns before it is done and waits at the first use of its result; a rank that writes
                # nothing never uses it, so it waits here (an unwaited collective aborts the process at exit)
                t = torch.distributed._functional_collectives.wait_tensor(t.full_tensor())
            if f:
                f.write(t.to("cpu").contiguous().view(torch.uint8).numpy())
            del t


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors_header(path):
    """(header {name: {"dtype", "shape", "data_offsets"}}, byte offset where the data begins) of a safetensors file,
    checked against the file: every tensor's bytes are its shape's, within the file, and the file holds no more."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    data_bytes, end = os.path.getsize(path) - 8 - n, 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            size = math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: a bad header entry for {name}: {entry} ({e!r})") from None
        if stop - start != size or not 0 <= start <= stop:
            raise ValueError(f"{path}: {name} is {entry['shape']} {entry['dtype']} ({size} bytes) but has bytes "
                             f"{start}-{stop}")
        end = max(end, stop)
    if end != data_bytes:
        raise ValueError(f"{path} holds {data_bytes} bytes of tensors, its header {end} (truncated?)")
    return header, 8 + n


def read_safetensors_slice(f, entry, data_start, slices, out):
    """Read the part `slices` of one stored tensor (header `entry`) from the open file `f` into `out`, cast to its
    dtype. `slices` narrows at most one dim, as an FSDP shard does (Shard(0) rows, or Shard(1) of stacked experts):
    then the part is, for every index of the dims before that one, one contiguous run of bytes, read straight from
    the file with no memory map, so this rank's host memory holds its shard and nothing else of the file."""
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    narrowed = [i for i, (s, n) in enumerate(zip(slices, shape)) if (s.start, s.stop) != (0, n)]
    if len(narrowed) > 1:
        raise ValueError(f"cannot read a slice narrowed in dims {narrowed} (one at most)")
    dim = narrowed[0] if narrowed else 0
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    start, stop = (slices[dim].start, slices[dim].stop) if shape else (0, 1)
    direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    rows = buf.view(torch.uint8).view(outer, -1)  # (outer, run of bytes)
    for i in range(outer):
        f.seek(data_start + entry["data_offsets"][0] + (i * (shape[dim] if shape else 1) + start) * inner * dtype.itemsize)
        if f.readinto(rows[i].numpy()) != rows.size(1):
            raise ValueError(f"{f.name}: the file ends inside a tensor (truncated?)")
    if not direct:
        out.copy_(buf)
    return out


def save_checkpoint(directory, model, enc, stage, extra=None, dtype=None, state=None):
    """Write model weights (safetensors, in `dtype` if given), config.json (model shape, stage provenance,
    tokenizer hash) and the tokenizer files. Atomic: everything is written into a temporary sibling that is renamed
    into place, so a crash mid-write leaves the previous checkpoint intact and never a half-written one under
    `directory`. For a sharded model (common.shard_model) this is collective: every rank calls it, the tensors are
    gathered one by one and rank 0 writes them, so no rank holds the whole model (write_safetensors). `state`: the
    tensors to write under the model's names, when they are not model.state_dict() (save_finetuned's merge)."""
    state = model.state_dict() if state is None else state
    refuse_nonfinite(state, directory)
    writer = not any(isinstance(t, DTensor) for t in state.values()) or dist.get_rank() == 0
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed.weight: stored once, tied again on load
    if not writer:
        write_safetensors(None, state, dtype)  # this rank's part of each gather
        return
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_safetensors(os.path.join(tmp, "model.safetensors"), state, dtype)
    save_tokenizer(enc, tmp)
    meta = {"model": asdict(model.cfg), "stage": stage, "tokenizer_hash": tokenizer_hash(enc),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    old = f"{directory}.old-{os.getpid()}"
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def refuse_nonfinite(tensors, what):
    """SystemExit naming the tensors ({name: tensor}) that hold a NaN or Inf, if any: a model of them is never
    written, so every checkpoint on disk is one to resume or roll back to. Sharded tensors (DTensors) are checked
    shard by shard and the counts summed over the ranks: then it is collective, and every rank exits together."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors.values()]
    if not local:
        return
    bad = torch.stack([(~t.isfinite()).sum().to(local[0].device) for t in local])
    if any(isinstance(t, DTensor) for t in tensors.values()):
        dist.all_reduce(bad)
    names = [name for name, n in zip(tensors, bad.tolist()) if n]
    if names:
        raise SystemExit(f"not writing {what}: the weights hold NaN/Inf ({', '.join(names[:8])}"
                         f"{', ...' if len(names) > 8 else ''}); checkpoints written before are left as they were")


def read_model_config(directory):
    """(config.json as a dict, its ModelConfig), checked against model.safetensors' header before the model is built
    from it, even on the meta device: config.json is the one file read before the weights, and n_layer=10**6 in it
    would otherwise build a million blocks (a meta module still costs host memory) before anything failed. The header
    is a few KB and names every tensor with its shape: the config must give exactly those tensors."""
    config_path, weights = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} is not a checkpoint: no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
        cfg = ModelConfig(**meta["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a model config ({e!r})") from None
    header, _ = read_safetensors_header(weights)
    blocks = {name.split(".")[1] for name in header if name.startswith("blocks.")}
    if len(blocks) != cfg.n_layer or blocks != {str(i) for i in range(cfg.n_layer)}:  # the count first: cheap
        raise ValueError(f"{config_path} says n_layer={cfg.n_layer} but {weights} holds {len(blocks)} blocks")
    with torch.device("meta"):
        want = {name: list(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del want["lm_head.weight"]  # stored once, as embed.weight
    wrong = [f"{name} is {header[name]['shape'] if name in header else 'missing'} in the file, "
             f"{want[name] if name in want else 'not in the model'} by the config"
             for name in [*want, *(n for n in header if n not in want)]  # the model's order: embed.weight first
             if want.get(name) != header.get(name, {}).get("shape")]
    if wrong:
        raise ValueError(f"{config_path} does not match {weights}: {'; '.join(wrong[:4])}"
                         f"{f' (and {len(wrong) - 4} more)' if len(wrong) > 4 else ''}")
    return meta, cfg


def load_checkpoint(directory, device="cpu", dtype=None):
    """Returns (model, enc, meta) from a directory written by save_checkpoint. Weights load through safetensors,
    never pickle, so a checkpoint from elsewhere cannot run code; the config is checked against the weights' shapes
    and the tokenizer before anything is built (read_model_config)."""
    from safetensors.torch import load_file
    meta, cfg = read_model_config(directory)
    enc = load_tokenizer(directory)
    if meta.get("tokenizer_hash") not in (None, tokenizer_hash(enc)):
        raise ValueError(f"{directory}: the tokenizer files do not match the one the model was trained with")
    if enc.n_vocab > cfg.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {enc.n_vocab} ids but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_file(os.path.join(directory, "model.safetensors"))  # on the CPU
    # allocate in the final dtype (default: the file's) on the final device, then copy the tensors in
    # (load_state_dict casts): an 8B in bf16 never passes through the GPU in float32
    model.to_empty(device=device).to(dtype or state["embed.weight"].dtype)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty gives every module a fresh tensor: tie again
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    model.init_buffers()  # derived buffers are not in the file
    return model, enc, meta


# -----------------------------------------------------------------------------
# a sharded model filled rank by rank, from scratch or from a checkpoint (train.py, and the fine-tuning below)

def canonical_name(name):
    """A parameter's name as in the model's state dict: without the prefixes that activation checkpointing and
    torch.compile wrappers add to named_parameters()."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def local_slices(param):
    """The part of the whole tensor that this rank's shard of `param` holds, as a tuple of slices (a plain tensor:
    all of it)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def init_sharded(model, seed, init_from=""):
    """Fill a model that shard_model sharded and to_empty() materialized, each rank writing only its own shards:
    no rank builds or reads the whole model (Tanuki-8x8B: 188 GB in float32). From scratch, every parameter is
    drawn whole on this rank's device from a generator seeded by (seed, its name), by model.init_value, and only
    this rank's slice is kept: one whole tensor exists at a time, and the weights do not depend on the number of
    ranks. init_from: a checkpoint directory (save_checkpoint's); each rank reads only its slices of
    model.safetensors (read_safetensors_slice), cast to the parameter's dtype.
    Parameters not in the file (LoRA adapters added for fine-tuning) are drawn as from scratch."""
    path = os.path.join(init_from, "model.safetensors")
    stored, data_start = read_safetensors_header(path) if init_from else ({}, 0)
    with open(path, "rb") if init_from else contextlib.nullcontext() as f:
        for name, p in model.named_parameters():
            name = canonical_name(name)
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.numel() == 0:
                continue
            if name in stored:
                if list(p.shape) != stored[name]["shape"]:
                    raise ValueError(f"{path}: {name} is {stored[name]['shape']}, the model's is {list(p.shape)}")
                read_safetensors_slice(f, stored[name], data_start, local_slices(p), local)
                continue
            generator = torch.Generator(local.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            whole = torch.empty(p.shape, dtype=local.dtype, device=local.device)
            local.copy_(init_value(whole, name, model.cfg, generator)[local_slices(p)])
            del whole
        for name, b in model.named_buffers():  # buffers are not sharded; the MoE selection bias is the saved one
            name = canonical_name(name)
            if name in stored:
                read_safetensors_slice(f, stored[name], data_start, local_slices(b), b)
            elif name.endswith("expert_bias"):
                b.zero_()
    model.init_buffers()  # RoPE tables and counters


# fine-tuning (sft.py, dpo.py): a checkpoint in, sharded, optionally with LoRA adapters; merged and saved out

def load_for_finetuning(init_from, mesh, device, param_dtype, lora=None, activation_checkpoint="none", seed=0):
    """Collective. The checkpoint in `init_from` as a sharded model to fine-tune, as train.py builds one: on the meta
    device, sharded, then each rank reads its own slices of the file (init_sharded). lora = (rank, alpha, dropout,
    targets) adds adapters before sharding, so FSDP shards them with their block; their initial values are drawn
    from `seed` (the same on any number of ranks). None: full fine-tuning."""
    _, cfg = read_model_config(init_from)
    with torch.device("meta"):
        model = Transformer(cfg)
    if lora:
        add_lora(model, *lora)
    shard_model(model, mesh, param_dtype, activation_checkpoint)
    model.to_empty(device=device)
    init_sharded(model, seed, init_from)
    return model


def save_finetuned(model, directory, enc, stage, dtype, lora=None, extra=None):
    """Collective. Write a plain checkpoint that every later stage loads from the sharded model, with the adapters
    merged into their weights: W + (alpha / r) B A, in float32, then cast (the update is small next to the weight
    it is added to). Each rank merges its own rows: B's rows are sharded like W's (both have W's out_features), and
    A (r x in_features) is small enough to gather whole. Then save_checkpoint gathers the tensors one at a time."""
    state, export = model.state_dict(), {}
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    for name, w in state.items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        if not name.endswith(".base.weight"):
            export[name] = w
            continue
        prefix = name[: -len(".base.weight")]
        a, b = state[prefix + ".lora_a"], state[prefix + ".lora_b"]
        a = a.full_tensor() if isinstance(a, DTensor) else a
        merged = (local(w).float() + (local(b).float() @ a.float()) * (lora[1] / lora[0])).to(dtype)  # alpha / r
        export[prefix + ".weight"] = (DTensor.from_local(merged, w.device_mesh, w.placements, shape=w.shape,
                                                         stride=w.stride()) if isinstance(w, DTensor) else merged)
    save_checkpoint(directory, model, enc, stage=stage, extra=extra, dtype=dtype, state=export)
    dist.barrier()


# -----------------------------------------------------------------------------
# training checkpoints: torch distributed checkpoint (DCP), each rank writing its own shards in parallel, into
# ROOT/step_00001000.tmp renamed to ROOT/step_00001000 once complete; meta.json holds step, loader position,
# counters and config, rng_rank<r>.pt each rank's random-number state, and manifest.json every other file's size and
# sha256, written as part of the commit.
#
# The trust boundary: DCP's .metadata is a pickle, which torch unpickles when it loads it, so a planted checkpoint
# runs code. The manifest is checked before anything is read: a flipped, truncated, missing or extra file is refused
# by name, and --resume=auto falls back to the checkpoint before (4 KB of flipped bytes in a shard used to resume
# with exit 0, put NaN in the weights at the next update and save a NaN model). It guards against corruption and
# accidentally mixed files; not against someone who can write the directory, who can write a manifest too. So only
# load checkpoints your own job wrote, and keep them on storage that only the job writes.

def list_files(directory):
    """Every file under `directory` but manifest.json, as sorted relative paths."""
    found = []
    for parent, _, files in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, name), directory) for name in files]
    return sorted(name for name in found if name != "manifest.json")


def file_digests(directory, names):
    """{name: {"size", "sha256"}} of these files under `directory`, streamed in 16 MiB chunks by up to 8 threads
    (file reads and hashlib release the GIL, so the threads add up); a file that cannot be read gets its error."""
    def digest(name):
        h, size = hashlib.sha256(), 0
        try:
            with open(os.path.join(directory, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as e:
            return name, {"error": str(e)}
        return name, {"size": size, "sha256": h.hexdigest()}

    with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
        return dict(pool.map(digest, names))


def shared_file_digests(directory, names):
    """file_digests with the reading shared out: each rank reads every world_size-th file and every rank gets all the
    digests (collective when a process group exists). Tanuki-8B's checkpoint is ~90 GB of weights and Adam moments:
    128 ranks read it back in the time one reads 0.7 GB."""
    if not dist.is_initialized():
        return file_digests(directory, names)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, file_digests(directory, names[dist.get_rank()::dist.get_world_size()]))
    return {name: d for part in parts for name, d in part.items()}


def write_manifest(directory, digests):
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"files": digests}, f, indent=1)


def check_train_checkpoint(directory, trust_unverified=False):
    """None when the files of the training checkpoint `directory` are exactly those its manifest.json lists, with
    their sizes and sha256; else what is wrong, naming the file. Nothing outside the directory is read (a name in the
    manifest must be one of the files found in it). Collective when a process group exists: every rank calls it and
    gets the same answer. trust_unverified: a checkpoint without a manifest (older versions wrote none) passes."""
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.isfile(manifest):
        if trust_unverified:
            return None if os.path.isfile(os.path.join(directory, "meta.json")) else "no meta.json (incomplete)"
        return ("no manifest.json (written by an older version, or not by this code): its .metadata is a pickle, "
                "which torch runs as code when it loads it; if your own job wrote it, --trust_unverified_checkpoint "
                "loads it unchecked")
    try:
        with open(manifest, encoding="utf-8") as f:
            want = {str(name): {"size": int(d["size"]), "sha256": str(d["sha256"])}
                    for name, d in json.load(f)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"manifest.json is unreadable ({e!r})"
    present = list_files(directory)
    wrong = [f"manifest.json lists no {name}" for name in (".metadata", "meta.json") if name not in want]
    wrong += [f"{name} is not in manifest.json" for name in present if name not in want]
    wrong += [f"{name} is missing" for name in want if name not in present]
    if not wrong:
        got = shared_file_digests(directory, sorted(want))
        wrong = [f"{name} has {got[name].get('size', got[name].get('error'))} bytes, sha256 "
                 f"{got[name].get('sha256', '-')[:16]}...; manifest.json says {w['size']} bytes, sha256 "
                 f"{w['sha256'][:16]}..." for name, w in want.items() if got[name] != w]
    return "; ".join(wrong) or None


_verified = set()  # checked by latest_checkpoint: the load that follows does not read every file again


def latest_checkpoint(root, max_step=None, trust_unverified=False):
    """The newest training checkpoint under `root` (of a step <= max_step when given) that passes
    check_train_checkpoint, or None when there is none. A `.tmp` directory is a save that was interrupted (the process
    was killed while writing) and is never picked. A refused checkpoint is reported and the one before it tried; when
    every one is refused, SystemExit: starting over from scratch would silently throw the run away. Collective when a
    process group exists."""
    if not os.path.isdir(root):
        return None
    candidates = sorted((d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()
                         and (max_step is None or int(d[5:]) <= max_step)), reverse=True)
    refused = []
    for d in candidates:
        directory = os.path.join(root, d)
        problem = check_train_checkpoint(directory, trust_unverified)
        if problem is None:
            if refused:
                print0("\n".join(refused) + f"\nusing {directory}, the newest checkpoint that passed its check")
            _verified.add(os.path.abspath(directory))
            return directory
        refused.append(f"{directory} refused: {problem}")
    if refused:
        raise SystemExit("no training checkpoint passed its check:\n" + "\n".join(refused))
    return None


_async_group = None  # created on the first async save


def save_train_checkpoint(root, step, model, optimizer, meta, keep=3, async_save=False):
    """Collective: every rank calls it. Writes model + optimizer shards and `meta` (a JSON-able dict) as the
    checkpoint of `step`, then keeps only the newest `keep`. With async_save the shards are written in the
    background while training goes on, and the checkpoint is committed (renamed into place) by rank 0 the moment
    the last rank's write is done, from the writer's own thread: a crash at any later moment resumes from it. The
    returned function waits for that (call it before the next save and at exit); without async_save, returns None
    when the checkpoint is committed."""
    import threading

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank = dist.get_rank()
    refuse_nonfinite({canonical_name(n): p for n, p in model.named_parameters()}, f"the checkpoint of step {step}")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:  # now: training goes on mutating it
            json.dump({"step": step, **meta}, f, indent=1, ensure_ascii=False)
    dist.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}

    def commit(digests):  # rank 0, once every rank's shards and DCP's .metadata are on disk
        write_manifest(tmp, digests)
        if os.path.exists(final):  # the same step again, after a rollback: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point: before it the previous checkpoint is the latest
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        for d in os.listdir(root):  # leftovers of saves that were killed
            if d.endswith(".tmp") and d != os.path.basename(tmp):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    if not async_save:
        dcp.save(state, checkpoint_id=tmp)
        dist.barrier()  # every rank's shards are on disk
        digests = shared_file_digests(tmp, list_files(tmp))  # each rank reads back its share of the files
        if rank == 0:
            commit(digests)
        dist.barrier()
        return None
    # the background writer's collectives get a process group of their own: on the training group they would
    # interleave with FSDP's all-gathers and deadlock (torchtitan does the same)
    global _async_group
    _async_group = _async_group or dist.new_group(backend="gloo")
    # DCP stages GPU tensors into CPU memory before it returns; CPU tensors could be written while the next
    # optimizer steps change them in place, so they are copied first
    from torch.utils._pytree import tree_map_only
    state = tree_map_only(torch.Tensor, lambda t: t.detach().clone() if t.device.type == "cpu" else t, state)
    pending = dcp.async_save(state, checkpoint_id=tmp, process_group=_async_group)
    committed = threading.Event()

    def on_written(future):
        # DCP's save ends with the coordinator (rank 0) gathering every rank's write results and writing .metadata,
        # so rank 0's future completing means the whole checkpoint is on disk. Rank 0 reads it all back for the
        # manifest, here, while training goes on
        try:
            if rank == 0 and future.exception() is None:
                commit(file_digests(tmp, list_files(tmp)))
        finally:
            committed.set()

    pending.add_done_callback(on_written)

    def finish():
        pending.result()  # raises if a write failed
        committed.wait()
        dist.barrier()

    return finish


def load_train_checkpoint(directory, model, optimizer, expect=None, trust_unverified=False):
    """Collective. Loads a checkpoint written by save_train_checkpoint into `model` and `optimizer` (already
    sharded the same way or not: DCP reshards to the current world size), restores this rank's random-number
    state when the checkpoint has one, and returns its meta dict. Refused before anything is read unless its files
    match its manifest (check_train_checkpoint; done already when latest_checkpoint picked it). expect: {meta key:
    value} that must match (the tokenizer, the data), or the resume would not continue the same run: an error says
    which differs."""
    if os.path.abspath(directory) in _verified:
        _verified.discard(os.path.abspath(directory))
    elif problem := check_train_checkpoint(directory, trust_unverified):
        raise SystemExit(f"{directory} refused: {problem}")
    if expect:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        wrong = [f"{k}: {meta.get(k)!r} there, {v!r} now" for k, v in expect.items() if meta.get(k) != v]
        if wrong:
            raise SystemExit(f"{directory} was written for another run ({'; '.join(wrong)}): resume would not be exact")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(directory, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        return json.load(f)
