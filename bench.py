"""
Benchmarks and the plan of a run, in five modes:

    python bench.py configs/8b.py --simulate --gpus=128  no hardware: one whole training step of train.py at its
                                                        real size on 128 fake ranks (fake process group, fake
                                                        tensors, ~1 minute on a CPU): per-GPU peak memory by kind,
                                                        each collective's bytes and link, and the step time,
                                                        tokens/s/GPU and MFU an H100 cluster could reach at most
    python bench.py configs/8b.py configs/8x8b.py --simulate --gpus=128 --hsdp_replicas=16 --grad_sync=last_all_reduce
    python bench.py configs/8b.py --plan --gpus=128      no hardware: the parameter counts and the time of the run
                                                        at an assumed MFU, next to Tanuki's figures and Chinchilla's
    python bench.py configs/8b.py configs/8x8b.py --plan --gpus=128 --plan_mfu=0.25
    python bench.py --measure                           the model on this device: forward+backward tokens/s,
                                                        TFLOP/s, MFU and peak memory with and without the
                                                        kernels, the MoE dispatch paths, KV-cache generation.
                                                        On a CPU with no config file it measures configs/tiny.py
    python bench.py --aot                               compile every Triton kernel for H100 (sm_90, bf16,
                                                        production block sizes) on any machine, no GPU needed,
                                                        and print registers, spills, shared memory and whether
                                                        the matrix products use wgmma; exits 1 if any fails
    python bench.py                                     on CUDA: each kernel against its PyTorch counterpart,
                                                        median time, TFLOP/s and the fraction of the bf16 peak.
                                                        On a CPU it measures nothing and prints the analytic
                                                        FLOPs and bytes of each kernel call instead
    python bench.py --batch_size=4 --seq_len=8192

The shape defaults to one Tanuki-8B micro-batch (configs/8b.py: 4096 tokens, 32 heads of 128, 8 K/V heads,
d_model 4096, vocab 65,536); the kernel rows for the MoE use one 8x8B layer on the same tokens (configs/8x8b.py:
8 experts of ffn 14,336, top-2), also for a dense config. The same config files as train.py's load here.
"""

import json
import math
import os
import resource
import sys
import time

import torch

import common

# -----------------------------------------------------------------------------
# defaults (override with --key=value)
aot = False           # compile for H100 and report instead of timing
plan = False          # the planner: no hardware
simulate = False      # one whole training step at the real size, traced on this CPU (fake GPUs, fake tensors)
measure = False       # the model on this device
# the model: Tanuki-8B's shape (model.ModelConfig's defaults); configs/*.py override it
vocab_size = 65536
d_model = 4096
n_layer = 32
n_head = 32
n_kv_head = 8
ffn_hidden = 14336
max_seq_len = 4096
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
init_std = 0.02
n_experts = 0         # a config with none still gets MoE rows: one 8x8B layer (8 experts, top-2)
moe_top_k = 2
moe_layer_interval = 1
moe_router = "topk_softmax"
# the batch, as train.py reads it: each GPU runs micro-batches of micro_batch_size x seq_len tokens and
# accumulates them to tokens_per_step per optimizer step
seq_len = 4096
tokens_per_step = 1024 * 4096
micro_batch_size = 1
max_iters = 300_000
activation_checkpoint = "full"  # as train.py: "none", "selective" or "full" (common.shard_model)
reshard_after_forward = True    # as train.py: False keeps each block gathered from its forward to its backward
grad_sync = "every"             # as train.py: "every", "last_all_reduce" or "last" (common.set_grad_sync)
dtype = "bfloat16"    # what the kernels and the model run in on H100
# the planner
gpus = 128            # Tanuki's 16 nodes x 8 H100 (docs/recipe.md "Pretraining")
hsdp_replicas = 0     # as train.py: >1 shards within gpus / hsdp_replicas GPUs (a node) and replicates across;
                      # -1: one replica per node of gpus_per_node
plan_mfu = 0.25       # Tanuki's 241-246 TFLOP/s of 989: about a quarter ("Pretraining")
gpu_memory_gib = 80.0  # H100 SXM5's 80 GB of HBM3 (nvidia-smi shows 81,559 MiB; allocator and NCCL take some)
# the simulation's stated H100 figures (arguments, not measurements): NVIDIA's H100 SXM5 data sheet gives 989
# TFLOP/s dense bf16 and NVLink 4 at 900 GB/s per GPU, i.e. 450 GB/s each way; a DGX H100 node has 8 GPUs and one
# 400 Gb/s NDR InfiniBand adapter per GPU, i.e. 50 GB/s each way per GPU across nodes
peak_tflops = 989.0
nvlink_gb_s = 450.0
ib_gb_s = 50.0
gpus_per_node = 8
simulate_rank = 0           # the rank whose view is traced (every rank allocates the same: FSDP2 pads shards)
simulate_all_micro = False  # trace every micro-batch instead of the first, second and last (see simulate_step)
simulate_json = ""          # also write the results here as JSON
# the kernels' micro-benchmarks
batch_size = 1        # sequences per call
warmup_ms = 100       # triton.testing.do_bench: milliseconds of warm-up, then of timed repeats
rep_ms = 500
# the measurement
steps = 3             # timed forward+backward steps after one warm-up step
gen_tokens = 32       # new tokens per generated row, after a 16-token prompt
decode_compiled = True  # also time generation with the compiled decode step (it compiles first: a minute on a CPU)
device = "auto"       # cuda if available
# train.py's settings that configs/*.py also set: accepted so that the same files load here, and not used
learning_rate = min_lr = weight_decay = beta1 = beta2 = grad_clip = moe_aux_loss_coef = moe_z_loss_coef = 0.0
warmup_iters = checkpoint_interval = keep_checkpoints = log_interval = eval_interval = eval_iters = 0
spike_window = pg_timeout_minutes = 0
lr_schedule = ""
async_checkpoint = compile = False
z_loss = 0.0
if __name__ == "__main__":  # only as a script: the tests import its functions
    config = common.load_config(globals())
    if measure and not torch.cuda.is_available() and all(arg.startswith("--") for arg in sys.argv[1:]):
        # the 8B default would not fit a laptop's memory: a CPU measures the tiny model unless told otherwise
        config = common.load_config(globals(), [os.path.join(os.path.dirname(__file__), "configs", "tiny.py"),
                                                *sys.argv[1:]])
# -----------------------------------------------------------------------------

head_dim = d_model // n_head
moe_experts = n_experts or 8  # the MoE kernel rows and dispatch timings of a dense config: 8x8B's 8 experts
# the kernel rows (kernels/bench.py) at this shape
kernel_shape = {"batch_size": batch_size, "seq_len": seq_len, "n_head": n_head, "n_kv_head": n_kv_head,
                "head_dim": head_dim, "d_model": d_model, "vocab_size": vocab_size, "ffn_hidden": ffn_hidden,
                "n_experts": moe_experts, "top_k": moe_top_k, "dtype": dtype}


def aot_report():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--aot compiles real kernels: unset TRITON_INTERPRET")
    from kernels import aot as kernels_aot
    _, table, ok = kernels_aot.report()
    print(table)
    print("all kernels compile for sm_90 without spills, with wgmma where they multiply matrices" if ok
          else "FAILED: see the rows marked FAIL")
    return ok


# -----------------------------------------------------------------------------
# the planner: memory per GPU and the time of a run, from model.py's counts on the meta device (no formula for
# the parameter count that could drift from the model)

GiB = 2**30
# Tanuki's throughput on 16 nodes x 8 H100, Megatron-LM, bf16 (docs/recipe.md "Pretraining")
TANUKI_GPUS = 128
TANUKI_TOKENS_PER_DAY = {"8B": 60e9, "8x8B": 30e9}
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, compute-optimal (docs/recipe.md "General guidance")


def plan_report():
    from model import Transformer
    with torch.device("meta"):  # shapes without storage: the 8x8B's 47B parameters cost nothing
        model = Transformer(common.model_config_from(globals()))
    n, n_active = model.num_params(), model.num_params(active=True)
    flops = model.flops_per_token(seq_len)
    if tokens_per_step % (gpus * micro_batch_size * seq_len):
        raise SystemExit(f"tokens_per_step={tokens_per_step:,} is not a multiple of {gpus} GPUs x "
                         f"micro_batch_size={micro_batch_size} x seq_len={seq_len}")
    grad_accum = tokens_per_step // (gpus * micro_batch_size * seq_len)
    run_tokens = max_iters * tokens_per_step
    tanuki = "8x8B" if n_experts else "8B"
    print(f"plan (no hardware): {n:,} parameters ({n / 1e9:.4g}B), {n_active:,} active per token "
          f"({n_active / 1e9:.4g}B), counted by model.py on the meta device")
    print(f"{flops / 1e9:.4g} GFLOP per token forward+backward at seq_len {seq_len} (model.flops_per_token)")
    print(f"batch: {tokens_per_step:,} tokens per step = {gpus} GPUs x {grad_accum} micro-batches x "
          f"{micro_batch_size} x {seq_len}; {max_iters:,} steps = {run_tokens / 1e9:,.4g}B tokens")
    print("memory per GPU and the communication of a step: python bench.py <configs> --simulate (traced)")
    peak_flops = common.PEAK_BF16_FLOPS["H100 SXM"]
    tokens_per_day = plan_mfu * peak_flops * gpus / flops * 86400
    print(f"\ntime on {gpus} H100 at MFU {plan_mfu:.0%} of {peak_flops / 1e12:.0f} TFLOP/s "
          f"({plan_mfu * peak_flops / 1e12:.0f} TFLOP/s per GPU)")
    print(f"  {tokens_per_day / 1e9:.1f}B tokens/day; Tanuki: 8B ~{TANUKI_TOKENS_PER_DAY['8B'] / 1e9:.0f}B, "
          f'8x8B ~{TANUKI_TOKENS_PER_DAY["8x8B"] / 1e9:.0f}B tokens/day on {TANUKI_GPUS} H100 '
          '(docs/recipe.md "Pretraining")')
    print(f"  {max_iters:,} steps: {run_tokens / tokens_per_day:.1f} days, "
          f"{tokens_per_step / tokens_per_day * 86400:.1f} s per step")
    if activation_checkpoint == "full":  # MFU counts the model's FLOPs (6N), not the recomputed forward (2N)
        print("  with full activation checkpointing the GPUs also recompute each forward: about 4/3 of these FLOPs")
    implied = TANUKI_TOKENS_PER_DAY[tanuki] / 86400 * flops / (TANUKI_GPUS * peak_flops)
    print(f"  Tanuki-{tanuki}'s ~{TANUKI_TOKENS_PER_DAY[tanuki] / 1e9:.0f}B tokens/day on {TANUKI_GPUS} H100 at this "
          f"config's FLOPs per token is MFU {implied:.1%} (their 8x8B log: 241-246 TFLOP/s, 24-25%)")
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n
    print(f"\nChinchilla-optimal: {CHINCHILLA_TOKENS_PER_PARAM} tokens/parameter x {n / 1e9:.2f}B = "
          f"{chinchilla / 1e9:,.0f}B tokens; this run: {run_tokens / n:.0f} tokens/parameter "
          f"({run_tokens / chinchilla:.1f}x Chinchilla; Tanuki-8B trained ~170)")


# -----------------------------------------------------------------------------
# the simulation: train.py's step at its real size and world, on this CPU. torch's fake process group makes every
# collective a no-op that still goes through the dispatcher, and fake tensors carry shapes without data, so one
# process plays one rank of the real world with the run's own code (model.py, moe.py, common.shard_model, AdamW).
# FSDPMemTracker (torch.distributed._tools) attributes every tensor to parameters, gradients, optimizer state,
# activations or collective buffers; a dispatch mode below records each collective's buffer and group.

def product_flops(func, args):
    """FLOPs of one call of a product (aten's matrix multiplies, the kernels' custom ops), 2 per multiply-add.
    Attention counts the full T x T matrix, as model.flops_per_token does."""
    aten, ops = torch.ops.aten, torch.ops.nanotanuki
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        a, b = args[-2:]
        return 2 * a.numel() * b.shape[-1]
    if func is ops.flash_attention.default:  # q (B, H, T, D): Q K^T and P V
        B, H, T, D = args[0].shape
        return 4 * B * H * T * T * D
    if func is ops.moe_ffn.default:  # x (N, d), experts (N, k), w_gate (E, f, d): three products on N*k rows
        (N, d), k, f = args[0].shape, args[1].shape[1], args[3].shape[1]
        return 3 * 2 * N * k * d * f
    return 0


def collective_counter():
    """A dispatch mode that records (phase, kind, group ranks, bytes of the full buffer) for every collective: the
    c10d ops FSDP2 calls (all_gather_into_tensor, reduce_scatter_tensor, all_reduce for HSDP) and the functional
    ones DTensor calls (the gradient norm's all-reduce); and the FLOPs of the products that activation
    checkpointing recomputes: a kernel's forward op (attention, the experts) called in the backward is a rerun, and of
    aten's matrix multiplies the backward needs two per forward one (d_input, d_weight), so any more are reruns."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    from torch.utils._python_dispatch import TorchDispatchMode
    c10d, functional = torch.ops.c10d, torch.ops._c10d_functional

    def nbytes(t):
        return sum(x.numel() * x.element_size() for x in (t if isinstance(t, (list, tuple)) else [t]))

    full_buffer = {  # op -> (kind, bytes of the unsharded buffer from its arguments)
        c10d._allgather_base_.default: ("all-gather", lambda a: nbytes(a[0])),
        c10d._reduce_scatter_base_.default: ("reduce-scatter", lambda a: nbytes(a[1])),
        c10d.allreduce_.default: ("all-reduce", lambda a: nbytes(a[0])),
        functional.all_reduce.default: ("all-reduce", lambda a: nbytes(a[0])),
        functional.all_gather_into_tensor.default: ("all-gather", lambda a: nbytes(a[0]) * a[1]),
        functional.reduce_scatter_tensor.default: ("reduce-scatter", lambda a: nbytes(a[0])),
    }

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.phase, self.log, self.flops = None, [], {}  # flops[phase] = [aten fwd, aten bwd, kernels rerun]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional") and func is not functional.wait_tensor.default:
                if func not in full_buffer:
                    raise RuntimeError(f"--simulate does not know the bytes of collective {func}: add it to "
                                       "full_buffer")
                kind, size = full_buffer[func]
                group = next(_resolve_process_group(a) if isinstance(a, str) else
                             torch._C._distributed_c10d.ProcessGroup.unbox(a) for a in args
                             if isinstance(a, str) or isinstance(a, torch.ScriptObject)
                             and a._type().qualified_name().endswith("ProcessGroup"))
                self.log.append((self.phase, kind, tuple(dist.get_process_group_ranks(group)), size(args)))
            elif product_flops(func, args):
                backward = torch._C._current_graph_task_id() != -1  # inside the autograd engine
                slot = 2 if func.namespace == "nanotanuki" else int(backward)
                if slot < 2 or backward:
                    self.flops.setdefault(self.phase, [0, 0, 0])[slot] += product_flops(func, args)
            return func(*args, **(kwargs or {}))

    return Counter()


def ring_cost(kind, ranks, nbytes):
    """(link, bytes each rank sends, seconds) of one collective by the ring algorithm (NCCL's for large buffers):
    all-gather and reduce-scatter pass (n-1)/n of the full buffer through every rank, all-reduce (a reduce-scatter
    then an all-gather) twice that. A group inside one node of consecutive ranks runs over NVLink; a group that
    crosses nodes is bound by each GPU's InfiniBand adapter."""
    n = len(ranks)
    link = "NVLink" if len({r // gpus_per_node for r in ranks}) == 1 else "InfiniBand"
    sent = nbytes * (n - 1) / n * (2 if kind == "all-reduce" else 1)
    return link, sent, sent / ((nvlink_gb_s if link == "NVLink" else ib_gb_s) * 1e9)


def simulate_step():
    """Trace one optimizer step of train.py (every micro-batch's forward and backward under set_grad_sync, the
    gradient clipping, AdamW's step) and one eval forward, as rank `simulate_rank` of `gpus`. Unless
    simulate_all_micro, only micro-batches 0, 1 and the last are traced: micro-batch 1 stands for all the middle
    ones, which see the same state (accumulated gradients exist, no sync is due); tests/test_bench.py checks that
    this gives the same bytes and peak as tracing all of them."""
    import torch.distributed as dist
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _ModMemStats
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model import Transformer
    world = gpus
    global hsdp_replicas
    if hsdp_replicas == -1:  # one replica per node, as train.py
        hsdp_replicas = world // gpus_per_node
    if hsdp_replicas > 1 and world % hsdp_replicas:
        raise SystemExit(f"hsdp_replicas={hsdp_replicas} must divide gpus={gpus}")
    global_seqs = tokens_per_step // seq_len
    per_rank = global_seqs // world
    grad_accum = per_rank // micro_batch_size
    if global_seqs * seq_len != tokens_per_step or per_rank * world != global_seqs \
            or grad_accum * micro_batch_size != per_rank or grad_accum == 0:  # train.py's check
        raise SystemExit(f"tokens_per_step={tokens_per_step} must be a whole number of sequences of seq_len={seq_len}, "
                         f"split evenly over {world} ranks into micro-batches of {micro_batch_size}")
    if not 0 <= simulate_rank < world:
        raise SystemExit(f"simulate_rank={simulate_rank} is not a rank of {world}")
    dist.init_process_group("fake", store=FakeStore(), rank=simulate_rank, world_size=world)
    if hsdp_replicas > 1:  # train.py's meshes
        mesh = init_device_mesh("cpu", (hsdp_replicas, world // hsdp_replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    import kernels
    # the CUDA path: the kernels are custom ops whose fake implementations give their outputs' shapes (what the op
    # keeps for its backward is among them), so model.py and moe.py run as on an H100, without Triton
    kernels.use_triton = lambda tensor: True
    # DTensor computes output shapes on fake tensors of the *global* shape, in the active fake mode when there is
    # one; the tracker then counts them as memory (the gradient norm of every full-size gradient at once). A fresh
    # mode for that propagation keeps it apart: the tracker skips ops of any other fake mode than its own.
    sharding_prop.detect_fake_mode = lambda *args: None
    t0 = time.perf_counter()
    with FakeTensorMode():
        with torch.device("meta"):
            model = Transformer(common.model_config_from(globals()))
        common.shard_model(model, mesh, torch.bfloat16, activation_checkpoint, compile=False,
                           reshard_after_forward=reshard_after_forward)
        model.to_empty(device="cpu")
        model.init_buffers()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                      lr=learning_rate or 1e-4, betas=(beta1 or 0.9, beta2 or 0.95), eps=1e-8)
        ids = torch.randint(0, model.cfg.vocab_size, (micro_batch_size, seq_len + 1))
        # AdamW creates its state at the first step: one step on zero gradients first, so that the traced step is
        # any later one, with exp_avg and exp_avg_sq alive through the forward and backward
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker = FSDPMemTracker(mod=model, optm=optimizer)
        # the fused loss takes lm_head.weight without calling lm_head, so the tracker never creates the record of
        # that module (at its forward) that its FSDP group's backward hook looks up
        tracker.memory_tracking[model.lm_head] = _ModMemStats("lm_head")
        tracker.track_inputs((ids,))
        counter = collective_counter()
        traced = range(grad_accum) if simulate_all_micro else sorted({0, min(1, grad_accum - 1), grad_accum - 1})
        with tracker, counter:
            for micro in traced:  # train.py's loop
                counter.phase = micro
                common.set_grad_sync(model, micro == grad_accum - 1, grad_sync)
                loss = model(ids[:, :-1], ids[:, 1:])[1]
                (loss / grad_accum).backward()
            counter.phase = "step"
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counter.phase = "eval"
            model.eval()
            with torch.no_grad():
                model(ids[:, :-1], ids[:, 1:])
            model.train()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    trace_s = time.perf_counter() - t0
    dist.destroy_process_group()

    # every rank's own share of the parameters, from the DTensor placements (FSDP2 pads each shard to the largest,
    # so the bytes allocated are the same on every rank: the traced rank's)
    shard_size = world // hsdp_replicas if hsdp_replicas > 1 else world
    coords = ([r // shard_size, r % shard_size] if hsdp_replicas > 1 else [r] for r in range(world))
    shards = [sum(math.prod(_compute_local_shape_and_global_offset(p.shape, mesh.shape, c, p.placements)[0])
                  for p in params) for c in coords]
    kinds = {k.value: v for k, v in peak.items() if k != "Total"}
    memory = {
        "parameters": kinds["Sharded Param"] + kinds["Unsharded Param"] + kinds["Buffer"],
        "gradients": kinds["Sharded Grad"] + kinds["Unsharded Grad"],
        "optimizer": kinds["OptState"],
        "activations": kinds["Activation"] + kinds["Temp"] + kinds["Inputs"],
        "communication": kinds["All Gather"] + kinds["Reduce Scatter"],
        "peak": peak["Total"],
    }
    # the step's collectives: micro-batch 1 counts for the grad_accum - 2 middle ones when they were not traced
    weight = {m: 1 for m in traced}
    if not simulate_all_micro and grad_accum > 2:
        weight[1] = grad_accum - 2
    comm = {}
    for phase, kind, ranks, nbytes in counter.log:
        if phase == "eval":
            continue
        link, sent, seconds = ring_cost(kind, ranks, nbytes)
        row = comm.setdefault(f"{kind} {len(ranks)} {link}", {"kind": kind, "group": len(ranks), "link": link,
                                                              "count": 0, "bytes": 0, "sent": 0, "seconds": 0.0})
        w = weight.get(phase, 1)
        for key, value in (("count", 1), ("bytes", nbytes), ("sent", sent), ("seconds", seconds)):
            row[key] += w * value
    # FLOPs per rank per step: the model's (MFU counts these) and those of the products that activation
    # checkpointing reruns in the backward, traced (the forward products of a block for "full"; for "selective"
    # only those its policy does not keep)
    tokens = micro_batch_size * seq_len * grad_accum
    flops = model.flops_per_token(seq_len) * tokens
    recompute = sum(weight.get(phase, 1) * (max(0, bwd - 2 * fwd) + kernels_rerun)
                    for phase, (fwd, bwd, kernels_rerun) in counter.flops.items() if phase in weight)
    t_compute = (flops + recompute) / (peak_tflops * 1e12)
    t_comm = sum(row["seconds"] for row in comm.values())
    ceilings = {label: {"step_s": t, "tokens_per_s_per_gpu": tokens / t, "mfu": flops / t / (peak_tflops * 1e12)}
                for label, t in (("overlapped", max(t_compute, t_comm)), ("serial", t_compute + t_comm))}
    busiest = max(range(world), key=shards.__getitem__)
    return {
        "gpus": world, "hsdp_replicas": hsdp_replicas, "shard_group": shard_size, "grad_accum": grad_accum,
        "micro_batch_size": micro_batch_size, "activation_checkpoint": activation_checkpoint, "grad_sync": grad_sync,
        "reshard_after_forward": reshard_after_forward, "params": model.num_params(),
        "traced_rank": simulate_rank, "traced_micro_batches": list(traced), "trace_s": trace_s,
        "shard_elements": {"first": shards[0], "last": shards[-1], "busiest": shards[busiest], "busiest_rank": busiest,
                           "even": model.num_params() / shard_size, "min": min(shards)},
        "memory": memory, "collectives": list(comm.values()),
        "eval_collectives": sum(1 for phase, *_ in counter.log if phase == "eval"),
        "flops": flops, "recompute_flops": recompute, "compute_s": t_compute, "comm_s": t_comm, "ceilings": ceilings,
    }


def simulate_report():
    r = simulate_step()
    sharding = (f"HSDP: sharded over {r['shard_group']}, {r['hsdp_replicas']} replicas" if r["hsdp_replicas"] > 1
                else f"FSDP: sharded over all {r['gpus']}")
    print(f"simulated step (no hardware): {r['params'] / 1e9:.4g}B parameters on {r['gpus']} fake ranks, {sharding}; "
          f"{r['grad_accum']} micro-batches of {r['micro_batch_size']} x {seq_len}, activation_checkpoint="
          f"{r['activation_checkpoint']}, grad_sync={r['grad_sync']}, reshard_after_forward="
          f"{r['reshard_after_forward']}")
    print(f"traced rank {r['traced_rank']}, micro-batches {r['traced_micro_batches']} of {r['grad_accum']}, the "
          f"clip, AdamW and an eval forward, in {r['trace_s']:.0f} s on this CPU")
    m, s, G = r["memory"], r["shard_elements"], GiB
    print("\nmemory per GPU at the peak (FSDPMemTracker, GiB; every rank allocates the traced rank's bytes: FSDP2 "
          "pads each shard to the largest; the shard column is the rank's own share, from the placements)")
    print(f"  {'rank':>12s} {'shard (M)':>10s} {'of even':>8s} {'params':>7s} {'grads':>7s} {'optim':>7s} "
          f"{'activ':>7s} {'comm':>7s} {'peak':>7s}")
    for label, rank, n in (("first", 0, s["first"]), ("last", r["gpus"] - 1, s["last"]),
                           ("busiest", s["busiest_rank"], s["busiest"])):
        print(f"  {label + ' ' + str(rank):>12s} {n / 1e6:10.1f} {n / s['even']:8.1%} {m['parameters'] / G:7.2f} "
              f"{m['gradients'] / G:7.2f} {m['optimizer'] / G:7.2f} {m['activations'] / G:7.2f} "
              f"{m['communication'] / G:7.2f} {m['peak'] / G:7.2f}")
    fits = "fits" if m["peak"] < gpu_memory_gib * G else "does NOT fit"
    print(f"  peak {m['peak'] / G:.2f} GiB of {gpu_memory_gib:.0f}: {fits} (tensors only: the CUDA context, NCCL and "
          f"the allocator's fragmentation come on top)")
    print(f"\ncollectives per step per rank (ring: all-gather, reduce-scatter send (n-1)/n of the buffer, all-reduce "
          f"twice that; at {nvlink_gb_s:.0f} GB/s NVLink inside a node of {gpus_per_node}, {ib_gb_s:.0f} GB/s "
          f"InfiniBand across)")
    print(f"  {'collective':16s} {'group':>6s} {'link':>11s} {'count':>6s} {'buffer GB':>10s} {'sent GB':>9s} "
          f"{'seconds':>8s}")
    for row in r["collectives"]:
        print(f"  {row['kind']:16s} {row['group']:6d} {row['link']:>11s} {row['count']:6d} {row['bytes'] / 1e9:10.2f} "
              f"{row['sent'] / 1e9:9.2f} {row['seconds']:8.3f}")
    print(f"  (an eval forward adds {r['eval_collectives']} collectives, every eval_interval steps; not counted)")
    print(f"\nceiling on H100 at the stated figures (analytic, not measured: every FLOP at {peak_tflops:.0f} TFLOP/s)")
    print(f"  compute {r['compute_s']:.3f} s: {r['flops'] / 1e12:.1f} TFLOP of the model + "
          f"{r['recompute_flops'] / 1e12:.1f} TFLOP recomputed (activation_checkpoint={r['activation_checkpoint']}); "
          f"communication {r['comm_s']:.3f} s")
    for label, c in r["ceilings"].items():
        what = "communication hidden under compute (max)" if label == "overlapped" else "no overlap (sum)"
        print(f"  {what:42s} step {c['step_s']:.3f} s, {c['tokens_per_s_per_gpu']:8,.0f} tokens/s/GPU, "
              f"MFU {c['mfu']:.1%}")
    print("SIMULATE " + json.dumps(r))
    if simulate_json:
        with open(simulate_json, "w") as f:
            json.dump(r, f, indent=1)


# -----------------------------------------------------------------------------
# measurements on this device: the model's forward+backward, the MoE dispatch paths, generation

def timed(fn, dev, n, best=False):
    """Seconds per call of fn: one warm-up call (compilation, allocator), then the mean of n, or with best=True the
    fastest of n (short calls on a shared CPU: the least disturbed run is the closest to the code's own speed)."""
    fn()
    times = []
    for _ in range(n):
        if dev.type == "cuda":  # kernels run asynchronously: wait for the last before reading the clock
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return min(times) if best else sum(times) / n


def peak_memory(dev):
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / GiB:.2f} GiB allocated"
    # ru_maxrss is the process's peak resident set in KiB on Linux: it never resets, so it is the maximum so far
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS"


def kernel_choices(dev):
    # (label, NANOTANUKI_KERNELS): the kernels run only for CUDA tensors, so a CPU has the PyTorch path alone
    return [("kernels", "auto"), ("torch", "torch")] if dev.type == "cuda" else [("torch", "torch")]


def measure_report(dev):
    import moe
    from model import Transformer
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    with dev:  # built on the device: an 8B built on the host first would need 30 GB of host memory for nothing
        model = Transformer(common.model_config_from(globals())).to(dt)
    # a CPU's numbers depend on what else runs on it: the load average says how shared it was
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    flops = model.flops_per_token(seq_len)
    tokens = micro_batch_size * seq_len
    print(f"measured on {name} ({dtype}): {model.num_params() / 1e6:,.1f}M parameters, micro-batch "
          f"{micro_batch_size} x {seq_len}, mean of {steps} calls after one warm-up"
          + ("" if dev.type == "cuda" else "; a CPU has no peak in the table, so no MFU"))
    idx = torch.randint(0, model.cfg.vocab_size, (micro_batch_size, seq_len + 1), device=dev)

    def train_step():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    print("\nforward+backward (no optimizer step, no activation checkpointing)")
    print(f"  {'path':10s} {'tokens/s':>12s} {'TFLOP/s':>9s} {'MFU':>6s}  peak memory")
    for label, choice in kernel_choices(dev):
        os.environ["NANOTANUKI_KERNELS"] = choice
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        tok_s = tokens / timed(train_step, dev, steps)
        utilization = common.mfu(flops, tok_s, name)
        print(f"  {label:10s} {tok_s:12,.0f} {flops * tok_s / 1e12:9.3f} "
              f"{'-' if utilization is None else f'{utilization:.1%}':>6s}  {peak_memory(dev)}")

    # one MoE layer at this config's width on the same tokens: moe.py's reference loop, its sorted dispatch, and
    # on CUDA the kernels behind the sorted dispatch; FLOPs: three expert products on N*k rows, x3 with backward
    E, k, C = moe_experts, moe_top_k, model.cfg.d_model
    x = torch.randn(tokens, C, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(tokens, C, device=dev, dtype=dt)
    experts, gates, _ = moe.route(torch.randn(tokens, E, device=dev), k, "topk_softmax")
    gates.requires_grad_()
    weights = [(0.02 * torch.randn(E, *shape, device=dev, dtype=dt)).requires_grad_()
               for shape in ((ffn_hidden, C), (ffn_hidden, C), (C, ffn_hidden))]
    moe_flops = 3 * 3 * 2 * tokens * k * C * ffn_hidden
    print(f"\nMoE layer forward+backward: {tokens} tokens, {E} experts of ffn {ffn_hidden}, top-{k}")
    paths = [("expert_loop", moe.expert_loop, "torch"), ("expert_sorted", moe.expert_sorted, "torch")]
    if dev.type == "cuda":
        paths.append(("kernels", moe.expert_sorted, "auto"))
    for label, dispatch, choice in paths:
        os.environ["NANOTANUKI_KERNELS"] = choice

        def layer_step(dispatch=dispatch):
            out = dispatch(x, experts, gates, *weights)
            torch.autograd.grad(out, [x, gates, *weights], dy)

        t = timed(layer_step, dev, steps)
        print(f"  {label:14s} {tokens / t:12,.0f} tokens/s {moe_flops / t / 1e12:9.3f} TFLOP/s")
    os.environ.pop("NANOTANUKI_KERNELS")

    decode_report(model, dev)


def decode_report(model, dev):
    """Tokens per second of greedy decoding with the KV cache: model.generate eagerly, model.generate with its
    compiled step, and transformers' generate on the same weights (export.py's Llama/Mixtral), which is the yardstick
    most users know. All three must produce the same tokens, or the timing compares different work."""
    model.eval()
    try:
        import transformers
        from export import hf_config, hf_tensors
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config(model)))
        hf.load_state_dict(hf_tensors(model))
        hf = hf.to(dev, model.embed.weight.dtype).eval()
    except ImportError:
        hf = None
    print(f"\ngeneration with the KV cache: 16-token prompts, {gen_tokens} new tokens per row, greedy, tokens/s "
          f"(the best of {max(steps, 5)} runs)"
          + ("" if hf is not None else " (transformers is not installed: no comparison)"))
    print(f"  {'batch':>5s} {'eager':>10s} {'compiled':>10s} {'transformers':>13s} {'eager/hf':>9s} {'compiled/hf':>12s}")
    for batch in (1, 8):
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
        runs = {"eager": lambda: model.generate(prompts.tolist(), gen_tokens, temperature=0)}
        if decode_compiled:
            runs["compiled"] = lambda: model.generate(prompts.tolist(), gen_tokens, temperature=0, compile=True)
        if hf is not None:
            def hf_generate():
                with torch.no_grad():  # min_new_tokens and no eos: exactly gen_tokens new tokens per row
                    return hf.generate(prompts.to(dev), max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)[:, 16:].tolist()
            runs["transformers"] = hf_generate
        tokens = {name: run() for name, run in runs.items()}  # the first call also compiles
        rate = {name: batch * gen_tokens / timed(run, dev, max(steps, 5), best=True) for name, run in runs.items()}
        same = all(t == tokens["eager"] for t in tokens.values())
        cells = [f"{rate[name]:,.0f}" if name in rate else "-" for name in ("eager", "compiled", "transformers")]
        cells += [f"{rate[name] / rate['transformers']:.2f}x" if name in rate and hf is not None else "-"
                  for name in ("eager", "compiled")]
        print(f"  {batch:5d} {cells[0]:>10s} {cells[1]:>10s} {cells[2]:>13s} {cells[3]:>9s} {cells[4]:>12s}"
              + ("" if same else "  DIFFERENT TOKENS"))


if __name__ == "__main__":
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if aot:
        sys.exit(0 if aot_report() else 1)
    elif simulate:
        simulate_report()
    elif plan:
        plan_report()
    elif measure:
        measure_report(dev)
    elif dev.type == "cuda":
        from kernels import bench as kernels_bench
        kernels_bench.gpu_report(kernel_shape, dev, warmup_ms, rep_ms)
    else:
        from kernels import bench as kernels_bench
        kernels_bench.analytic_report(kernel_shape)
