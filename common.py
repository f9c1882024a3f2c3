"""
What several stages share, and nothing else (DESIGN.md): configuration, distributed set-up, the OpenAI-compatible
client and the LLM judge, checkpoints of model + config + tokenizer, FSDP2 sharding and the fine-tuning model
build, training checkpoints, data shards, learning-rate schedules and the MFU helper.
"""

import ast
import concurrent.futures
import contextlib
import datetime
import difflib
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import time
import unicodedata
import zlib
import urllib.error
import urllib.request
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model import ModelConfig, Transformer, add_lora, init_value
from tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash

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

def setup_distributed(device="auto", timeout_minutes=30, world_of_one=False):
    """Returns (rank, local_rank, world_size, device). NCCL on CUDA, gloo on CPU. The process-group timeout is a
    setting because collectives wait on the slowest rank: Tanuki's 8x8B checkpoint saves to slow storage hit the
    default 10 minutes and needed 30 (TANUKI.md "What failed"). With world_of_one, a plain `python stage.py` gets a
    process group of one, so an FSDP stage has a single code path to read and test."""
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
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only: 128 ranks printing the same line help nobody"""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# the OpenAI-compatible client of the stages that talk to a teacher, a judge or a served model

def chat_completion(messages, sampling, url, key, model_name, request_timeout, retries, backoff_s):
    """One POST {url}/chat/completions to any OpenAI-compatible server (vLLM, serve.py): the teacher of synth.py,
    the judge of eval.py and dpo.py. Retries: 5xx, 429, timeouts, dropped connections and unparsable replies
    are retried after backoff_s * 2^attempt (plus jitter, so many workers do not retry in lockstep); other 4xx
    are the request's fault and fail at once. Returns (content, finish_reason, completion_tokens)."""
    body = json.dumps({"model": model_name, "messages": messages, **sampling}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
        try:
            request = urllib.request.Request(f"{url.rstrip('/')}/chat/completions", data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=request_timeout) as response:
                data = json.loads(response.read())
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return choice["message"]["content"] or "", choice.get("finish_reason"), usage.get("completion_tokens", 0)
        except urllib.error.HTTPError as e:  # before URLError: it is one
            if e.code < 500 and e.code != 429:
                raise RuntimeError(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
            error = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:  # timeouts, refused or dropped connections, cut bodies
            error = f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            error = f"invalid response: {type(e).__name__}: {e}"
    raise RuntimeError(f"{url}: gave up after {retries + 1} attempts: {error}")


# -----------------------------------------------------------------------------
# an LLM judge: MT-Bench-style single-answer grading 1-10 (TANUKI.md "Evaluation", "Reference thresholds": the judge
# answers "評価：[[N]]" and deducts for answering in the wrong language), for eval.py's MT-Bench and dpo.py's pairs.
# The prompts are our own words.

JUDGE_SYSTEM = {
    "ja": "あなたは公平で厳格な審査員です。AIアシスタントの回答を、有用性・正確さ・深さ・創造性・詳しさの観点から評価して"
          "ください。質問と異なる言語で書かれた回答（日本語の質問に日本語以外で答えたもの）は大きく減点してください。"
          "参照解答が示されている場合は、それと照らして正しいかを確かめてください。まず短く講評を書き、最後に必ず"
          "「評価：[[N]]」（Nは1から10の整数）の形で点数を書いてください。",
    "en": "You are an impartial and strict judge. Rate the AI assistant's answer for helpfulness, accuracy, depth, "
          "creativity and level of detail. An answer written in a different language from the question loses many "
          "points. If a reference answer is given, check the answer against it. Write a short assessment first, then "
          "end with the score exactly in the form \"Rating: [[N]]\", where N is an integer from 1 to 10.",
}
JUDGE_LABELS = {  # question, reference, answer, which turn is judged
    "ja": ("質問", "参照解答", "アシスタントの回答", "評価するのは最後のアシスタントの回答です。"),
    "en": ("Question", "Reference answer", "Assistant's answer", "Rate the assistant's last answer only."),
}


def judge_prompt(lang, turns, answers, references):
    """The judge's messages for the last answer of a conversation (turn 2 is judged with turn 1 in view, as
    MT-Bench does)."""
    q_label, ref_label, a_label, which = JUDGE_LABELS[lang]
    parts = []
    for i, (q, a) in enumerate(zip(turns, answers)):
        parts.append(f"[{q_label} {i + 1}]\n{q}")
        if i < len(references) and references[i]:
            parts.append(f"[{ref_label} {i + 1}]\n{references[i]}")
        parts.append(f"[{a_label} {i + 1}]\n{a}")
    parts.append(which)
    return [{"role": "system", "content": JUDGE_SYSTEM[lang]}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_rating(text):
    """The judge's 1-10 rating: the last [[N]] of the reply (a judge may quote the format before using it), after
    NFKC so that full-width ［［８］］ counts; None when there is none or it is out of range (never guessed)."""
    found = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", unicodedata.normalize("NFKC", text))
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1 <= rating <= 10 else None


def judge_ratings(prompts, judge, cache_path, retries=2, max_tokens=512, concurrency=8, request_timeout=120.0,
                  http_retries=4, backoff_s=1.0):
    """Rate every judge prompt (a list of message lists, judge_prompt's) with judge = {"url", "key", "model"}.
    Returns ({key: record}, number of requests sent), where key = judge_key(judge model, messages) and the record
    holds the rating (None when unparsable), the judgment and the attempts. Judgments are cached in cache_path
    (JSONL, one line per judgment as it arrives), so a re-run, or a run killed midway and started again, sends only
    what is new. A reply without a rating is asked again (the first request is greedy, as MT-Bench's judge; retries
    sample at 0.7, since a greedy judge repeats itself word for word); after `retries` it is recorded unparsable and
    counted by the caller, never given a score."""
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    cache[record["key"]] = record
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: judged again
                    pass
    todo = {judge_key(judge["model"], m): m for m in prompts}
    todo = [(k, m) for k, m in todo.items() if k not in cache]

    def ask(job):
        for attempt in range(retries + 1):
            reply = chat_completion(job[1], {"max_tokens": max_tokens, "temperature": 0.0 if attempt == 0 else 0.7},
                                    judge["url"], judge["key"], judge["model"], request_timeout, http_retries,
                                    backoff_s)[0]
            if parse_rating(reply) is not None:
                break
        return {"key": job[0], "rating": parse_rating(reply), "judgment": reply, "attempts": attempt + 1}

    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool, \
            open(cache_path, "a", encoding="utf-8") as f:
        for record in pool.map(ask, todo):
            cache[record["key"]] = record
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return cache, len(todo)


def judge_key(model_name, messages):
    return hashlib.sha256(json.dumps([model_name, messages], ensure_ascii=False).encode()).hexdigest()


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
    """(header {name: {"dtype", "shape", "data_offsets"}}, byte offset where the data begins) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
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


def load_checkpoint(directory, device="cpu", dtype=None):
    """Returns (model, enc, meta) from a directory written by save_checkpoint. Weights load through safetensors,
    never pickle, so a checkpoint from elsewhere cannot run code."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} is not a checkpoint: no config.json")
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    enc = load_tokenizer(directory)
    if meta.get("tokenizer_hash") not in (None, tokenizer_hash(enc)):
        raise ValueError(f"{directory}: the tokenizer files do not match the one the model was trained with")
    with torch.device("meta"):
        model = Transformer(ModelConfig(**meta["model"]))
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
# learning-rate schedules

def lr_at(step, max_lr, min_lr, warmup_steps, total_steps, schedule="cosine", decay_frac=0.2):
    """Learning rate at `step` (0-based).
    cosine: linear warmup, then cosine from max_lr to min_lr at total_steps (Tanuki's Megatron runs:
            1000 warmup steps, 1e-4 -> 1e-6; TANUKI.md).
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
    "H100 SXM": 989e12,   # the 989 TFLOP/s that Tanuki's ~25% MFU is measured against (TANUKI.md)
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
    checked without reading them: Tanuki's runs died on missing or tiny shards at start-up (TANUKI.md "What
    failed"), so every mismatch is an error naming the file, raised before a single step is trained.
    Returns (list of 1-D numpy memmaps, meta dict)."""
    where = os.path.join(data_dir, source)
    meta_path = os.path.join(where, "meta.json")
    if not os.path.isdir(where):
        found = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "meta.json"))) \
            if os.path.isdir(data_dir) else []
        raise SystemExit(f"data source '{source}' not found: no directory {where} (sources in {data_dir}: {found})")
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
# FSDP2: every rank holds 1/N of each parameter, gradient and optimizer state (ZeRO-3; TANUKI.md "General
# guidance": sharded data parallel). Tanuki trained with Megatron; FSDP2 is the PyTorch-native equivalent.

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
    if op in expensive or str(op).startswith("nanotanuki."):  # the kernels' custom ops count as products
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def shard_model(model, mesh, param_dtype, activation_checkpoint="full", compile=False, reshard_after_forward=True):
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
    backward: one all-gather per block per micro-batch instead of two, for the memory of the unsharded weights."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    mode = {True: "full", False: "none"}.get(activation_checkpoint, activation_checkpoint)
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint={activation_checkpoint!r}: use one of {AC_MODES}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

    def placement(param):
        # FSDP shards dim 0 by default. The stacked experts (moe.py, (E, ffn, d) and (E, d, ffn)) have only E = 8
        # rows there: over 128 ranks each shard would be padded to a whole expert and ranks 0-7 would hold ~15x
        # their share. Their dim 1 (ffn 14336 or d_model 4096) splits evenly over any power-of-two group.
        return Shard(1) if param.ndim == 3 else Shard(0)

    for i, block in enumerate(model.blocks):
        if mode == "full":
            # recompute the block's activations in the backward instead of keeping them
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay
        elif mode == "selective":
            block = checkpoint_wrapper(block, preserve_rng_state=False,
                                       context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        if compile:
            # per block, not the whole model: one graph compiled once, reused n_layer times. fullgraph: a graph
            # break would silently split the block and lose the fusion (tests/test_moe.py checks there is none)
            block.compile(fullgraph=True)
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
    with open(os.path.join(init_from, "config.json"), encoding="utf-8") as f:
        cfg = ModelConfig(**json.load(f)["model"])
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
# counters and config, rng_rank<r>.pt each rank's random-number state

def latest_checkpoint(root, max_step=None):
    """The newest complete training checkpoint under `root` (of a step <= max_step when given), or None. A `.tmp`
    directory is a save that was interrupted (the process was killed while writing) and is never picked."""
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
            and os.path.isfile(os.path.join(root, d, "meta.json"))
            and (max_step is None or int(d[5:]) <= max_step)]
    return os.path.join(root, max(done)) if done else None


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
    meta_text = json.dumps({"step": step, **meta}, indent=1, ensure_ascii=False)  # now: training goes on mutating it
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}

    def commit():  # rank 0, once every rank's shards and DCP's .metadata are on disk
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            f.write(meta_text)
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
        if rank == 0:
            commit()
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
        # so rank 0's future completing means the whole checkpoint is on disk
        try:
            if rank == 0 and future.exception() is None:
                commit()
        finally:
            committed.set()

    pending.add_done_callback(on_written)

    def finish():
        pending.result()  # raises if a write failed
        committed.wait()
        dist.barrier()

    return finish


def load_train_checkpoint(directory, model, optimizer, expect=None):
    """Collective. Loads a checkpoint written by save_train_checkpoint into `model` and `optimizer` (already
    sharded the same way or not: DCP reshards to the current world size), restores this rank's random-number
    state when the checkpoint has one, and returns its meta dict. expect: {meta key: value} that must match (the
    tokenizer, the data), or the resume would not continue the same run: an error says which differs."""
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
