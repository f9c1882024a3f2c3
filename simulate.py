"""
One whole training step of train.py at its real size and world, traced on this CPU: no hardware. torch's fake process
group plays one rank of the run (every collective goes through the dispatcher and moves nothing), fake tensors carry
the real shapes without data, and the model is built, sharded and stepped by the run's own code (model.py, moe.py,
common.device_mesh and shard_model, AdamW). It prints per-GPU peak memory by kind, each collective's bytes and link,
and the step time, tokens/s/GPU and MFU an H100 cluster could reach at most (~1 minute for the 8x8B on a CPU).

    python simulate.py configs/8b.py --gpus=128
    python simulate.py configs/8b.py configs/8x8b.py --gpus=128 --hsdp_replicas=16 --grad_sync=last_all_reduce
    python simulate.py configs/8b.py configs/8x8b.py --gpus=128 --expert_parallel=8   (experts split over a node:
                                                       all-to-alls on NVLink; routing assumed balanced)
    python simulate.py configs/8b.py configs/8x8b.py --gpus=128 --simulate_ep=1,2,4,8 --simulate_micro=12,24
                                                       a sweep: one table of every setting, the best that fits
    python simulate.py configs/8b.py configs/8x8b.py --gpus=128 --simulate_expert_load=2
                                                       a hot expert (2x its share) on the traced rank: the memory
                                                       and step time of the rank every other one waits for
    python simulate.py configs/8b.py --gpus=128 --micro_batch_size=4 --activation_checkpoint=selective

Every train.py setting that shapes the step is a setting here with the same name, so the same config files load.
`python bench.py configs/8b.py --plan` gives the run's length at an assumed MFU instead.
"""

import functools
import json
import math
import time
from dataclasses import asdict

import torch

import common
from model import ModelConfig

# -----------------------------------------------------------------------------
# defaults (override with config files and --key=value), train.py's names
# the model: every ModelConfig field is a setting, with its defaults (Tanuki-8B's shape), as in train.py
globals().update(asdict(ModelConfig()))
# the step, as train.py runs it: each GPU runs micro-batches of micro_batch_size x seq_len tokens and accumulates
# them to tokens_per_step per optimizer step
seq_len = 4096
tokens_per_step = 1024 * 4096
micro_batch_size = 1
activation_checkpoint = "full"  # as train.py: "none", "selective" or "full" (common.shard_model)
reshard_after_forward = True    # as train.py: False keeps each block gathered from its forward to its backward
grad_sync = "every"             # as train.py: "every", "last_all_reduce" or "last" (common.set_grad_sync)
hsdp_replicas = 0     # as train.py: >1 shards within gpus / hsdp_replicas GPUs (a node) and replicates across;
                      # -1: one replica per node of gpus_per_node
expert_parallel = 1   # as train.py: >1 splits an MoE's experts over groups of this many consecutive ranks
weight_decay = 0.1    # AdamW's settings (its state is what matters here, not its numbers)
beta1 = 0.9
beta2 = 0.95
learning_rate = 1e-4
grad_clip = 1.0
# the cluster
gpus = 128            # Tanuki's 16 nodes x 8 H100 (docs/recipe.md "Pretraining")
gpu_memory_gib = 80.0  # H100 SXM5's 80 GB of HBM3 (nvidia-smi shows 81,559 MiB; allocator and NCCL take some)
# the stated H100 figures (arguments, not measurements): NVIDIA's H100 SXM5 data sheet gives 989 TFLOP/s dense bf16
# and NVLink 4 at 900 GB/s per GPU, i.e. 450 GB/s each way; a DGX H100 node has 8 GPUs and one 400 Gb/s NDR
# InfiniBand adapter per GPU, i.e. 50 GB/s each way per GPU across nodes
peak_tflops = 989.0
nvlink_gb_s = 450.0
ib_gb_s = 50.0
gpus_per_node = 8
# the trace
simulate_rank = 0           # the rank whose view is traced (every rank allocates the same: FSDP2 pads shards)
simulate_all_micro = False  # trace every micro-batch instead of the first, second and last (see simulate_step)
simulate_json = ""          # also write the results here as JSON
simulate_ep = None          # a sweep: expert_parallel degrees (--simulate_ep=1,2,4,8), each traced in a fresh world
simulate_micro = None       # ... and micro_batch_size values for each (--simulate_micro=6,12,24); one table
simulate_expert_load = 1.0  # expert_parallel > 1: the busiest expert's share of the assignments over its fair 1/E,
                            # held by the traced rank (dropless, it runs them all: memory and time of a hot expert)
# train.py's settings that configs/*.py also set: accepted so that the same files load here, and not used
min_lr = moe_aux_loss_coef = moe_z_loss_coef = z_loss = 0.0
max_iters = warmup_iters = checkpoint_interval = keep_checkpoints = log_interval = eval_interval = eval_iters = 0
spike_window = pg_timeout_minutes = 0
lr_schedule = dtype = ""
async_checkpoint = compile = False
if __name__ == "__main__":  # only as a script: the tests may import its functions
    config = common.load_config(globals())
model_cfg = common.model_config_from(globals())  # the model those settings name
# -----------------------------------------------------------------------------

GiB = 2**30


# train.py's step at its real size and world, on this CPU. torch's fake process group makes every
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
    c10d ops FSDP2 calls (all_gather_into_tensor, reduce_scatter_tensor, all_reduce for HSDP), the gradient norm's
    all-reduce, and expert parallelism's (moe.py: the routing counts' all_gather_single, kind "counts gather", and
    the rows' all-to-alls, whose bytes are the whole send buffer); and the FLOPs of the products that activation
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
        functional.all_to_all_single.default: ("all-to-all", lambda a: nbytes(a[0])),
        c10d.alltoall_base_.default: ("all-to-all", lambda a: nbytes(a[1])),
    }

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.phase, self.log, self.flops = None, [], {}  # flops[phase] = [aten fwd, aten bwd, kernels rerun]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional") and func is not functional.wait_tensor.default:
                if func not in full_buffer:
                    raise RuntimeError(f"simulate.py does not know the bytes of collective {func}: add it to "
                                       "full_buffer")
                kind, size = full_buffer[func]
                if kind == "all-gather" and args[0].dtype == torch.int64:  # not weights: moe.gather_counts
                    kind = "counts gather"
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
    then an all-gather) twice that; an all-to-all sends the (n-1)/n of its buffer that goes to the others. A group
    inside one node of consecutive ranks runs over NVLink; a group that crosses nodes is bound by each GPU's
    InfiniBand adapter."""
    n = len(ranks)
    link = "NVLink" if len({r // gpus_per_node for r in ranks}) == 1 else "InfiniBand"
    sent = nbytes * (n - 1) / n * (2 if kind == "all-reduce" else 1)
    return link, sent, sent / ((nvlink_gb_s if link == "NVLink" else ib_gb_s) * 1e9)


def unset_fake(fn):
    """fn run outside any fake tensor mode (on the real tensors it reads)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    @functools.wraps(fn)
    def unfaked(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    unfaked.unfaked = True
    return unfaked


def expert_rows():
    """The assignments each expert gets from one rank's micro-batch (N*k of them, N = micro_batch_size * seq_len
    tokens), the same from every rank: evenly spread (the assumption, which Tanuki's balance loss ~1.0 supports), or
    with simulate_expert_load > 1 the traced rank's first expert getting that many times its share and the others
    the rest evenly."""
    E, rows = model_cfg.n_experts, micro_batch_size * seq_len * model_cfg.moe_top_k
    hot = (simulate_rank % expert_parallel) * (E // expert_parallel)  # the traced rank's first expert
    hot_rows = min(rows, round(simulate_expert_load * rows / E))
    rest = rows - hot_rows
    others = iter([rest // (E - 1) + (i < rest % (E - 1)) for i in range(E - 1)])
    return [hot_rows if e == hot else next(others) for e in range(E)]


def routed_splits(keep, me, E_local):
    """moe.host_splits in the trace, where the counts are fake tensors without values: the exchange's sizes with
    expert_rows' routing. A rank sends each peer the rows of that peer's experts and receives its own experts' rows
    from each. (send, recv, per_expert) as host_splits."""
    ep = keep.shape[0]
    per = expert_rows()
    send = [sum(per[p * E_local:(p + 1) * E_local]) for p in range(ep)]
    mine = per[me * E_local:(me + 1) * E_local]
    return send, [sum(mine)] * ep, mine * ep


def fsdp_expert_share(model):
    """{(group size, buffer bytes): expert bytes in it} for every FSDP group's all-gather (bf16) and reduce-scatter
    (float32) buffer: which part of a collective moved the stacked experts (all of it for expert parallelism's own
    groups, a share of each MoE block's without)."""
    share = {}
    for module in model.modules():
        group = getattr(module, "_get_fsdp_state", lambda: None)()
        group = group and group._fsdp_param_group
        if group is None:
            continue
        n = group.mesh_info.shard_mesh_size
        numels = [(p.padded_sharded_param_size.numel(), p._module_info.param_name in ("w_gate", "w_up", "w_down"))
                  for p in group.fsdp_params]
        for itemsize in (2, 4):
            total = sum(k for k, _ in numels) * n * itemsize
            share[n, total] = sum(k for k, expert in numels if expert) * n * itemsize
    return share


def simulate_step():
    """Trace one optimizer step of train.py (every micro-batch's forward and backward under set_grad_sync, the
    gradient clipping, AdamW's step) and one eval forward, as rank `simulate_rank` of `gpus`. Unless
    simulate_all_micro, only micro-batches 0, 1 and the last are traced: micro-batch 1 stands for all the middle
    ones, which see the same state (accumulated gradients exist, no sync is due); tests/test_bench.py checks that
    this gives the same bytes and peak as tracing all of them."""
    import torch.distributed as dist
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _ModMemStats
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
    if expert_parallel > 1 and not model_cfg.n_experts:
        raise SystemExit(f"expert_parallel={expert_parallel} needs an MoE model (n_experts > 0)")
    if expert_parallel > 1 and not 0 < simulate_expert_load <= model_cfg.n_experts:
        raise SystemExit(f"simulate_expert_load={simulate_expert_load} must be in (0, n_experts]: a multiple of an "
                         f"expert's fair share of 1/{model_cfg.n_experts}")
    dist.init_process_group("fake", store=FakeStore(), rank=simulate_rank, world_size=world)
    mesh = common.device_mesh("cpu", world, hsdp_replicas, expert_parallel)  # train.py's meshes
    import kernels
    import moe
    # the CUDA path: the kernels are custom ops whose fake implementations give their outputs' shapes (what the op
    # keeps for its backward is among them), so model.py and moe.py run as on an H100, without Triton
    kernels.use_triton = lambda tensor: True
    # expert parallelism: the fake process group moves no data, so the routing counts behind the all-to-alls' split
    # sizes are not real; routed_splits stands in for them: routing is ASSUMED BALANCED, or skewed as asked
    host_splits, moe.host_splits = moe.host_splits, routed_splits
    # DTensor computes output shapes on fake tensors of the *global* shape, in the active fake mode when there is
    # one; the tracker then counts them as memory (the gradient norm of every full-size gradient at once). A fresh
    # mode for that propagation keeps it apart: the tracker skips ops of any other fake mode than its own.
    sharding_prop.detect_fake_mode = lambda *args: None
    # a DeviceMesh computes its rank tensor from the real rank map at each use; shard_model splits the mesh and FSDP2
    # concatenates the experts' two meshes (expert parallelism) inside the fake mode, which refuses a real tensor:
    # make, split and read meshes outside it
    if not hasattr(DeviceMesh.__init__, "unfaked"):
        DeviceMesh.__init__ = unset_fake(DeviceMesh.__init__)
        DeviceMesh._unflatten = unset_fake(DeviceMesh._unflatten)
        DeviceMesh.mesh = property(unset_fake(DeviceMesh.mesh.fget))
    t0 = time.perf_counter()
    with FakeTensorMode():
        with torch.device("meta"):
            model = Transformer(model_cfg)
        common.shard_model(model, mesh, torch.bfloat16, activation_checkpoint, compile=False,
                           reshard_after_forward=reshard_after_forward, expert_parallel=expert_parallel)
        model.to_empty(device="cpu")
        model.init_buffers()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = common.adamw(params, learning_rate or 1e-4, weight_decay, (beta1 or 0.9, beta2 or 0.95), "cpu")
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
            common.clip_grad_norm(model.parameters(), grad_clip if grad_clip > 0 else math.inf)  # train.py's
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counter.phase = "eval"
            model.eval()
            with torch.no_grad():
                model(ids[:, :-1], ids[:, 1:])
            model.train()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    trace_s = time.perf_counter() - t0
    moe.host_splits = host_splits
    expert_share = fsdp_expert_share(model)
    dist.destroy_process_group()  # and with it every group of the meshes: a sweep's next run starts a fresh world

    # every rank's own share of the parameters, from the DTensor placements (FSDP2 pads each shard to the largest,
    # so the bytes allocated are the same on every rank: the traced rank's). A parameter's mesh is the traced rank's
    # submesh; rank r's coordinate on the same-named dimensions of its own (common.device_mesh's layout)
    shard_size = world // hsdp_replicas if hsdp_replicas > 1 else world
    ep = expert_parallel
    coord = {"replicate": lambda r: r // shard_size, "shard": lambda r: r % shard_size,
             "shard_mod_ep": lambda r: r % shard_size // ep, "ep": lambda r: r % ep}
    shards = [sum(math.prod(_compute_local_shape_and_global_offset(
        p.shape, p.device_mesh.shape, [coord[name](r) for name in p.device_mesh.mesh_dim_names], p.placements)[0])
        for p in params) for r in range(world)]
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
                                                              "count": 0, "bytes": 0, "expert_bytes": 0, "sent": 0,
                                                              "seconds": 0.0})
        w = weight.get(phase, 1)
        experts = expert_share.get((len(ranks), nbytes), 0) if kind in ("all-gather", "reduce-scatter") else 0
        for key, value in (("count", 1), ("bytes", nbytes), ("expert_bytes", experts), ("sent", sent),
                           ("seconds", seconds)):
            row[key] += w * value
    # FLOPs per rank per step: the model's (MFU counts these) and those of the products that activation
    # checkpointing reruns in the backward, traced (the forward products of a block for "full"; for "selective"
    # only those its policy does not keep)
    tokens = micro_batch_size * seq_len * grad_accum
    flops = model.flops_per_token(seq_len) * tokens
    recompute = sum(weight.get(phase, 1) * (max(0, bwd - 2 * fwd) + kernels_rerun)
                    for phase, (fwd, bwd, kernels_rerun) in counter.flops.items() if phase in weight)
    # a rank whose experts get more than their share runs more rows than the model's FLOPs count, and the step
    # waits for it: per extra row, three products of 2 d f FLOPs forward and twice that backward, in every MoE
    # layer (the recomputation's rerun is traced, so it is in `recompute` already)
    received = fair = 0
    if ep > 1:
        E_local, per = model_cfg.n_experts // ep, expert_rows()
        received = ep * sum(per[simulate_rank % ep * E_local:(simulate_rank % ep + 1) * E_local])
        fair = micro_batch_size * seq_len * model_cfg.moe_top_k  # E_local * ep = E experts' worth of 1/E each
    moe_layers = sum(isinstance(m, moe.MoE) for m in model.modules())
    hot_flops = (received - fair) * 3 * 3 * 2 * model_cfg.d_model * model_cfg.ffn_hidden * moe_layers * grad_accum
    t_compute = (flops + recompute + hot_flops) / (peak_tflops * 1e12)
    t_comm = sum(row["seconds"] for row in comm.values())
    ceilings = {label: {"step_s": t, "tokens_per_s_per_gpu": tokens / t, "mfu": flops / t / (peak_tflops * 1e12)}
                for label, t in (("overlapped", max(t_compute, t_comm)), ("serial", t_compute + t_comm))}
    busiest = max(range(world), key=shards.__getitem__)
    return {
        "gpus": world, "hsdp_replicas": hsdp_replicas, "shard_group": shard_size, "expert_parallel": ep,
        "grad_accum": grad_accum,
        "micro_batch_size": micro_batch_size, "activation_checkpoint": activation_checkpoint, "grad_sync": grad_sync,
        "reshard_after_forward": reshard_after_forward, "params": model.num_params(),
        "traced_rank": simulate_rank, "traced_micro_batches": list(traced), "trace_s": trace_s,
        "shard_elements": {"first": shards[0], "last": shards[-1], "busiest": shards[busiest], "busiest_rank": busiest,
                           "even": model.num_params() / shard_size, "min": min(shards), "max": max(shards)},
        "memory": memory, "collectives": list(comm.values()),
        "eval_collectives": sum(1 for phase, *_ in counter.log if phase == "eval"),
        "flops": flops, "recompute_flops": recompute, "compute_s": t_compute, "comm_s": t_comm, "ceilings": ceilings,
        "expert_load": simulate_expert_load if ep > 1 else None, "expert_rows": {"received": received, "fair": fair},
        "hot_expert_flops": hot_flops,
    }


def routing_said(r=None):
    """How the exchange's sizes were made up, for the printed reports: of one result r, or of the settings."""
    if simulate_expert_load == 1.0:
        return "routing ASSUMED BALANCED"
    said = f"routing SKEWED: the traced rank's first expert gets {simulate_expert_load:g}x its share"
    if r and r["expert_rows"]["fair"]:
        said += (f", so the rank receives {r['expert_rows']['received'] / r['expert_rows']['fair']:.2f}x the balanced "
                 "rows and runs their products")
    return said


def simulate_report():
    r = simulate_step()
    sharding = (f"HSDP: sharded over {r['shard_group']}, {r['hsdp_replicas']} replicas" if r["hsdp_replicas"] > 1
                else f"FSDP: sharded over all {r['gpus']}")
    if r["expert_parallel"] > 1:
        sharding += (f"; expert parallel over groups of {r['expert_parallel']}, the experts sharded over "
                     f"{r['shard_group'] // r['expert_parallel']} ({routing_said(r)}: the all-to-alls' sizes are "
                     "simulate.routed_splits', not counted from fake tensors)")
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
    experts = sum(row["expert_bytes"] for row in r["collectives"] if row["kind"] == "all-gather")
    print(f"  of the all-gathers' buffers {experts / 1e9:.2f} GB are the experts'; (an eval forward adds "
          f"{r['eval_collectives']} collectives, every eval_interval steps; not counted)")
    print(f"\nceiling on H100 at the stated figures (analytic, not measured: every FLOP at {peak_tflops:.0f} TFLOP/s)")
    print(f"  compute {r['compute_s']:.3f} s: {r['flops'] / 1e12:.1f} TFLOP of the model + "
          f"{r['recompute_flops'] / 1e12:.1f} TFLOP recomputed (activation_checkpoint={r['activation_checkpoint']})"
          + (f" + {r['hot_expert_flops'] / 1e12:.1f} TFLOP of the hot expert's extra rows" if r["hot_expert_flops"]
             else "") + f"; communication {r['comm_s']:.3f} s")
    for label, c in r["ceilings"].items():
        what = "communication hidden under compute (max)" if label == "overlapped" else "no overlap (sum)"
        print(f"  {what:42s} step {c['step_s']:.3f} s, {c['tokens_per_s_per_gpu']:8,.0f} tokens/s/GPU, "
              f"MFU {c['mfu']:.1%}")
    print("SIMULATE " + json.dumps(r))
    if simulate_json:
        with open(simulate_json, "w") as f:
            json.dump(r, f, indent=1)


def simulate_sweep():
    """simulate_step for every expert_parallel in simulate_ep and micro_batch_size in simulate_micro (each a fresh
    fake world), one table; the best setting that fits gpu_memory_gib (highest MFU ceiling without overlap), then
    traced again as the last rank to check that every rank's peak is the same."""
    global expert_parallel, micro_batch_size, simulate_rank
    as_list = lambda v, default: [default] if v is None else [v] if isinstance(v, int) else list(v)  # noqa: E731
    rows = []
    for ep in as_list(simulate_ep, expert_parallel):
        for micro in as_list(simulate_micro, micro_batch_size):
            expert_parallel, micro_batch_size = ep, micro
            r = simulate_step()
            rows.append(r)
            print(f"traced expert_parallel={ep} micro_batch_size={micro} in {r['trace_s']:.0f} s\nSIMULATE "
                  + json.dumps(r), flush=True)
    print(f"\nsweep on {gpus} fake ranks ({routing_said()}; per GPU per step; the expert all-gather is the "
          "experts' part of the all-gathers' buffers; sent by the ring model; MFU ceilings at the stated figures)")
    print(f"  {'EP':>3s} {'micro':>5s} {'peak GiB':>8s} {'shard spread':>12s} {'expert AG GB':>12s} {'a2a GB':>7s} "
          f"{'NVLink GB':>9s} {'IB GB':>7s} {'compute s':>9s} {'comm s':>7s} {'MFU overl.':>10s} {'MFU serial':>10s}")
    for r in rows:
        c, s = r["collectives"], r["shard_elements"]
        r["sweep"] = {"expert_gather_bytes": sum(row["expert_bytes"] for row in c if row["kind"] == "all-gather"),
                      "all_to_all_bytes": sum(row["bytes"] for row in c if row["kind"] == "all-to-all"),
                      **{link: sum(row["sent"] for row in c if row["link"] == link)
                         for link in ("NVLink", "InfiniBand")},
                      "fits": r["memory"]["peak"] < gpu_memory_gib * GiB, "spread": s["max"] / s["min"] - 1}
        w = r["sweep"]
        print(f"  {r['expert_parallel']:3d} {r['micro_batch_size']:5d} {r['memory']['peak'] / GiB:8.2f} "
              f"{w['spread']:12.2%} {w['expert_gather_bytes'] / 1e9:12.1f} {w['all_to_all_bytes'] / 1e9:7.1f} "
              f"{w['NVLink'] / 1e9:9.1f} {w['InfiniBand'] / 1e9:7.1f} {r['compute_s']:9.3f} {r['comm_s']:7.3f} "
              f"{r['ceilings']['overlapped']['mfu']:10.1%} {r['ceilings']['serial']['mfu']:10.1%}"
              + ("" if w["fits"] else "  does NOT fit"))
    fitting = [r for r in rows if r["sweep"]["fits"]]
    best = max(fitting, key=lambda r: (r["ceilings"]["serial"]["mfu"], r["ceilings"]["overlapped"]["mfu"]),
               default=None)
    if best is None:
        print(f"no setting fits {gpu_memory_gib:.0f} GiB")
        return rows, None
    expert_parallel, micro_batch_size, simulate_rank = best["expert_parallel"], best["micro_batch_size"], gpus - 1
    last = simulate_step()
    peaks = best["memory"]["peak"], last["memory"]["peak"]
    print(f"best that fits {gpu_memory_gib:.0f} GiB: expert_parallel={best['expert_parallel']} micro_batch_size="
          f"{best['micro_batch_size']}: peak {peaks[0] / GiB:.2f} GiB on rank 0, {peaks[1] / GiB:.2f} GiB on rank "
          f"{gpus - 1} (traced again); shards within {best['sweep']['spread']:.2%} of each other over all ranks: "
          + ("every rank within 5%" if max(peaks) <= 1.05 * min(peaks) and best["sweep"]["spread"] <= 0.05
             else "ranks differ by MORE than 5%"))
    print("SIMULATE " + json.dumps(last))
    return rows, last


if __name__ == "__main__":
    if simulate_ep is not None or simulate_micro is not None:
        simulate_sweep()
    else:
        simulate_report()
