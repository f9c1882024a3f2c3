"""Build a model the way train.py does (meta device -> common.shard_model -> to_empty -> checkpoint.init_sharded), then
export it with checkpoint.save_checkpoint, writing this rank's peak host memory (max RSS) at each point to
OUT_DIR.rank<r>.json. tests/test_train.py runs it under torchrun at 1 and 2 ranks:
    python tests/shard_probe.py OUT_DIR SEED INIT_FROM D_MODEL N_LAYER N_EXPERTS
INIT_FROM is a checkpoint directory or "-" (from scratch)."""

import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch
from torch.distributed.device_mesh import init_device_mesh

import checkpoint
import common
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

out_dir, seed, init_from, d_model, n_layer, n_experts = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
init_from = "" if init_from == "-" else init_from


def max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


rank, _, world_size, device = common.setup_distributed("cpu", world_of_one=True)
enc = load_tokenizer(os.environ["PROBE_TOKENIZER"])
cfg = ModelConfig(vocab_size=512, d_model=d_model, n_layer=n_layer, n_head=8, n_kv_head=2, ffn_hidden=4 * d_model,
                  max_seq_len=64, n_experts=n_experts)
with torch.device("meta"):
    model = Transformer(cfg)
mesh = init_device_mesh("cpu", (world_size,))
common.shard_model(model, mesh, torch.float32, "none")
start = max_rss()
model.to_empty(device=device)
checkpoint.init_sharded(model, seed, init_from)
after_init = max_rss()
checkpoint.save_checkpoint(out_dir, model, enc, stage="probe")
after_export = max_rss()
shard_bytes = sum(p.to_local().numel() * 4 for p in model.parameters())
block_bytes = sum(p.numel() * 4 for p in model.blocks[0].parameters())  # a DTensor's numel is the whole tensor's
model_bytes = sum(p.numel() * 4 for p in model.parameters())
with open(f"{out_dir}.rank{rank}.json", "w") as f:  # a file per rank: lines printed by two ranks interleave
    json.dump({"rank": rank, "start": start, "after_init": after_init, "after_export": after_export,
                  "shard_bytes": shard_bytes, "block_bytes": block_bytes, "model_bytes": model_bytes}, f)
torch.distributed.barrier()
common.cleanup_distributed()  # leaves the process
