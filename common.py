"""
What several stages share, and nothing else (DESIGN.md): configuration, distributed set-up, the OpenAI-compatible
client and the LLM judge, checkpoints of model + config + tokenizer, FSDP2 sharding and the fine-tuning model
build, training checkpoints, data shards, learning-rate schedules and the MFU helper.
"""

import ast
import concurrent.futures
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
import urllib.error
import urllib.request
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

from model import ModelConfig, Transformer, add_lora, merge_lora
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
    (16 GB for Tanuki-8B in bf16). The format is an 8-byte header length, a JSON header, then raw bytes."""
    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without format "pt"
    for name, t in tensors.items():
        size = t.numel() * (dtype or t.dtype).itemsize
        header[name] = {"dtype": dtype_names[dtype or t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(header).encode()
    header += b" " * (-len(header) % 8)  # pad to 8 bytes, as safetensors does, so tensors stay aligned
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for t in tensors.values():
            f.write(t.detach().to("cpu", dtype or t.dtype).contiguous().view(torch.uint8).numpy())


def save_checkpoint(directory, model, enc, stage, extra=None):
    """Write model weights (safetensors), config.json (model shape, stage provenance, tokenizer hash) and the
    tokenizer files. Atomic: everything is written into a temporary sibling that is renamed into place, so a
    crash mid-write leaves the previous checkpoint intact and never a half-written one under `directory`."""
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed.weight: stored once, tied again on load
    write_safetensors(os.path.join(tmp, "model.safetensors"), state)
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

def shard_model(model, mesh, param_dtype, activation_checkpoint=False, compile=False):
    """Shard `model` (a Transformer) in place over `mesh`, in torchtitan's order: the embedding, each block,
    the final norm + lm_head, then the root, which takes whatever is left. A block is all-gathered just before
    its forward and freed after it, so at most about one block's full weights exist at a time.
    Mixed precision: weights are all-gathered and computed in `param_dtype` (bf16 on H100) while the master
    copy the optimizer updates stays float32, and gradients are reduce-scattered in float32 so that summing
    over hundreds of ranks does not round away small updates.
    A 1-D mesh is plain FSDP; a 2-D mesh ("replicate", "shard") is hybrid sharding: shard within a node
    over NVLink, replicate across nodes, so only the gradient all-reduce crosses the slower network."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        if activation_checkpoint:
            # recompute the block's activations in the backward instead of keeping them: at 8B and 4k
            # sequences the kept activations would not fit next to the weights and optimizer state
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay
        if compile:
            block.compile()  # per block, not the whole model: one graph compiled once, reused 32 times
        fully_shard(block, mesh=mesh, mp_policy=mp)
        model.blocks[i] = block
    if not model.cfg.tie_embeddings:  # a tied weight belongs to two modules: leave it to the root
        fully_shard(model.embed, mesh=mesh, mp_policy=mp)
        # the output layer runs last in the forward and first in the backward: keeping it gathered between the
        # two saves one all-gather of the largest matrix per step
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


# fine-tuning (sft.py, dpo.py): a checkpoint in, sharded, optionally with LoRA adapters; merged and saved out

def load_for_finetuning(init_from, mesh, device, param_dtype, lora=None, activation_checkpoint=False):
    """Collective. The checkpoint in `init_from` as a sharded model to fine-tune, as train.py builds one: on the meta
    device, sharded, then filled from rank 0's full weights (only rank 0 reads the file). lora = (rank, alpha,
    dropout, targets) adds adapters before sharding, so FSDP shards them with their block; rank 0 draws their
    initial values. None: full fine-tuning."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with open(os.path.join(init_from, "config.json"), encoding="utf-8") as f:
        cfg = ModelConfig(**json.load(f)["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    full_state = {}
    if dist.get_rank() == 0:
        base = load_checkpoint(init_from, dtype=torch.float32)[0]
        if lora:
            add_lora(base, *lora)
        full_state = base.state_dict()
        del base
    if lora:
        add_lora(model, *lora)
    shard_model(model, mesh, param_dtype, activation_checkpoint)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.init_buffers()
    return model


def save_finetuned(model, directory, enc, stage, dtype, lora=None, extra=None):
    """Collective. Gather the sharded model's full weights to rank 0's CPU, merge the adapters into the weights (in
    float32, then cast: the update is small next to the weight it is added to) and write a plain checkpoint that
    every later stage loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            export = Transformer(model.cfg)
        if lora:
            add_lora(export, *lora)
        export.load_state_dict(full, assign=True)
        merge_lora(export)
        save_checkpoint(directory, export.to(dtype), enc, stage=stage, extra=extra)
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
    background while training goes on and the returned function must be called later (before the next save and
    at exit) to wait for the writes and rename the checkpoint into place; without it, returns None when done."""
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
    pending = None
    if async_save:
        # the background writer's collectives get a process group of their own: on the training group they would
        # interleave with FSDP's all-gathers and deadlock (torchtitan does the same)
        global _async_group
        _async_group = _async_group or dist.new_group(backend="gloo")
        # DCP stages GPU tensors into CPU memory before it returns; CPU tensors could be written while the next
        # optimizer steps change them in place, so they are copied first
        from torch.utils._pytree import tree_map_only
        state = tree_map_only(torch.Tensor, lambda t: t.detach().clone() if t.device.type == "cpu" else t, state)
        pending = dcp.async_save(state, checkpoint_id=tmp, process_group=_async_group)
    if not async_save:
        dcp.save(state, checkpoint_id=tmp)

    def finish():
        if pending is not None:
            pending.result()
        dist.barrier()  # every rank's shards are on disk
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                f.write(meta_text)
            if os.path.exists(final):  # the same step again, after a rollback: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)  # the commit point: before it the previous checkpoint is the latest
            done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
            for old in done[:-keep] if keep > 0 else []:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            for d in os.listdir(root):  # leftovers of saves that were killed
                if d.endswith(".tmp"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        dist.barrier()

    if async_save:
        return finish
    finish()
    return None


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
