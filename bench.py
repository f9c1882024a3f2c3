"""
Benchmarks and the plan of a run, in four modes:

    python bench.py configs/8b.py --plan --gpus=128      no hardware: per-GPU memory under FSDP (parameters,
                                                        gradients, AdamW state, activations with and without
                                                        checkpointing) and the time of the run at an assumed MFU,
                                                        next to Tanuki's figures and Chinchilla's token count
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
activation_checkpoint = True
dtype = "bfloat16"    # what the kernels and the model run in on H100
# the planner
gpus = 128            # Tanuki's 16 nodes x 8 H100 (TANUKI.md "Pretraining")
hsdp_replicas = 0     # as train.py: >1 shards within gpus / hsdp_replicas GPUs (a node) and replicates across
plan_mfu = 0.25       # Tanuki's 241-246 TFLOP/s of 989: about a quarter ("Pretraining")
gpu_memory_gib = 80.0  # H100 SXM5's 80 GB of HBM3 (nvidia-smi shows 81,559 MiB; allocator and NCCL take some)
# the kernels' micro-benchmarks
batch_size = 1        # sequences per call
warmup_ms = 100       # triton.testing.do_bench: milliseconds of warm-up, then of timed repeats
rep_ms = 500
# the measurement
steps = 3             # timed forward+backward steps after one warm-up step
gen_tokens = 32       # new tokens per generated row, after a 16-token prompt
device = "auto"       # cuda if available
# train.py's settings that configs/*.py also set: accepted so that the same files load here, and not used
learning_rate = min_lr = weight_decay = beta1 = beta2 = grad_clip = moe_aux_loss_coef = moe_z_loss_coef = 0.0
warmup_iters = checkpoint_interval = keep_checkpoints = log_interval = eval_interval = eval_iters = 0
spike_window = pg_timeout_minutes = 0
lr_schedule = ""
async_checkpoint = compile = False
if __name__ == "__main__":  # only as a script: the tests import its functions
    config = common.load_config(globals())
    if measure and not torch.cuda.is_available() and all(arg.startswith("--") for arg in sys.argv[1:]):
        # the 8B default would not fit a laptop's memory: a CPU measures the tiny model unless told otherwise
        config = common.load_config(globals(), [os.path.join(os.path.dirname(__file__), "configs", "tiny.py"),
                                                *sys.argv[1:]])
# -----------------------------------------------------------------------------

# H100 SXM5 data sheet: HBM3 bandwidth, for the analytic memory floor (the bf16 peak is common.PEAK_BF16_FLOPS)
H100_BYTES_PER_S = 3.35e12
head_dim = d_model // n_head
moe_experts = n_experts or 8  # the MoE kernel rows and dispatch timings of a dense config: 8x8B's 8 experts


def aot_report():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--aot compiles real kernels: unset TRITON_INTERPRET")
    from kernels import aot as kernels_aot
    _, table, ok = kernels_aot.report()
    print(table)
    print("all kernels compile for sm_90 without spills, with wgmma where they multiply matrices" if ok
          else "FAILED: see the rows marked FAIL")
    return ok


def kernel_costs():
    """(name, FLOPs, bytes) of one call of each kernel at the configured shape: the arithmetic the call must do
    and the fewest bytes it must move (each input read once, each output written once). Causal attention counts
    the half of the score matrix it computes; its backward does 2.5x the forward's products (FlashAttention-2's
    convention: dV, dP, dQ, dK and the recomputed S, against S and PV). The MoE layer's grouped GEMMs are the
    three expert products on the N*k routed rows (gate, up, down); their backward does twice that (d_input and
    d_weight) and reads every expert's weights again."""
    B, T, H, H_kv, D, C, V = batch_size, seq_len, n_head, n_kv_head, head_dim, d_model, vocab_size
    F_, E, k = ffn_hidden, moe_experts, moe_top_k
    e = torch.finfo(getattr(torch, dtype)).bits // 8
    N = B * T
    q_bytes, kv_bytes = N * H * D * e, N * H_kv * D * e
    attn_fwd = 4 * B * H * T * T * D / 2
    ce_flops = 6 * N * C * V  # logits, then their gradient times W (for dx) and times x (for dW)
    rows = N * k  # routed (token, expert) rows
    moe_flops = 3 * 2 * rows * C * F_
    # weights once; x rows read for gate and up, g and u written, h read, the down product written
    moe_bytes = 3 * E * F_ * C * e + 2 * rows * C * e + 3 * rows * F_ * e + rows * C * e
    return [
        ("attention fwd (causal)", attn_fwd, 2 * q_bytes + 2 * kv_bytes + N * H * 4),
        ("attention bwd (causal)", 2.5 * attn_fwd, 4 * q_bytes + 4 * kv_bytes + 2 * N * H * 4),
        ("rmsnorm fwd", 4 * N * C, 2 * N * C * e + C * e),
        ("rmsnorm bwd", 8 * N * C, 3 * N * C * e + 2 * C * e),
        ("linear + cross-entropy fwd+bwd", ce_flops, 2 * N * C * e + 2 * V * C * e + N * 8),
        # float32 logits in, probs out, k (id, gate) pairs out; about 5 operations per score (max, exp, sum,
        # divide, compare)
        ("moe router top-k", 5 * N * E, 2 * N * E * 4 + N * k * 12),
        # the int64 expert ids read twice (count, rank), each row's position and assignment written as int32
        ("moe permute + gather", 0, N * k * 24 + N * C * e + rows * C * e),
        ("moe grouped GEMM fwd (3 products)", moe_flops, moe_bytes),
        ("moe grouped GEMM bwd (3 products)", 2 * moe_flops, 2 * moe_bytes + 3 * E * F_ * C * e),
        ("moe combine", 2 * rows * C, rows * C * e + N * C * e + N * k * 8),
    ]


def analytic_report():
    print(f"no GPU: measured nothing. Analytic cost of one call at batch {batch_size} x {seq_len} tokens, "
          f"{n_head} heads ({n_kv_head} K/V) of {head_dim}, d_model {d_model}, vocab {vocab_size}, "
          f"MoE {moe_experts} experts x ffn {ffn_hidden} top-{moe_top_k}, {dtype}.")
    print("The floors are what an H100 SXM could not beat at its data-sheet rates "
          f"({common.PEAK_BF16_FLOPS['H100 SXM'] / 1e12:.0f} TFLOP/s bf16, {H100_BYTES_PER_S / 1e12:.2f} TB/s).")
    print(f"{'kernel':34s} {'GFLOP':>10s} {'MB':>10s} {'FLOP/byte':>10s} {'floor us':>10s} {'bound':>8s}")
    for name, flops, nbytes in kernel_costs():
        t_compute = flops / common.PEAK_BF16_FLOPS["H100 SXM"]
        t_memory = nbytes / H100_BYTES_PER_S
        print(f"{name:34s} {flops / 1e9:10.2f} {nbytes / 1e6:10.2f} {flops / nbytes:10.1f} "
              f"{max(t_compute, t_memory) * 1e6:10.1f} {'compute' if t_compute > t_memory else 'memory':>8s}")


def gpu_report(dev):
    """Each kernel and its PyTorch counterpart on the same inputs: median time (triton.testing.do_bench, device
    events), TFLOP/s from the analytic FLOPs above, and the fraction of the device's bf16 peak."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    import kernels
    import moe
    from kernels import cross_entropy, rmsnorm
    dt = getattr(torch, dtype)
    peak = common.peak_flops(torch.cuda.get_device_name(dev))
    costs = {name: (flops, nbytes) for name, flops, nbytes in kernel_costs()}

    def total(*names):  # (FLOPs, bytes) of several kernel calls
        return tuple(sum(costs[n][i] for n in names) for i in (0, 1))

    B, T, H, H_kv, D, C, V = batch_size, seq_len, n_head, n_kv_head, head_dim, d_model, vocab_size

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_(grad)

    q, k, v = randn(B, H, T, D), randn(B, H_kv, T, D), randn(B, H_kv, T, D)
    do = randn(B, H, T, D, grad=False)
    x, w, dy = randn(B * T, C), (1 + 0.1 * randn(C, grad=False)).requires_grad_(), randn(B * T, C, grad=False)
    lm_w = (randn(V, C, grad=False) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (B * T,), device=dev)
    # one 8x8B MoE layer on the same tokens, routed by the PyTorch router on random logits
    experts, gates, _ = moe.route(torch.randn(B * T, moe_experts, device=dev), moe_top_k, "topk_softmax")
    gates.requires_grad_()
    moe_weights = [(0.02 * randn(moe_experts, *shape, grad=False)).requires_grad_()
                   for shape in ((ffn_hidden, C), (ffn_hidden, C), (C, ffn_hidden))]  # w_gate, w_up, w_down
    moe_args = (x, experts, gates, *moe_weights)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != H_kv)

    def fwd_bwd(fn, args, grad):
        def run():
            out = fn(*args)
            torch.autograd.grad(out, [a for a in args if a.requires_grad], grad)
        return run

    def loss_bwd(fn):
        def run():
            loss = fn(x, lm_w, targets)
            torch.autograd.grad(loss, (x, lm_w))
        return run

    cases = [  # (kernel, ours, theirs, analytic (FLOPs, bytes))
        ("attention fwd (causal)", lambda: kernels.flash_attention(q, k, v), lambda: sdpa(q, k, v),
         total("attention fwd (causal)")),
        ("attention fwd+bwd (causal)", fwd_bwd(kernels.flash_attention, (q, k, v), do), fwd_bwd(sdpa, (q, k, v), do),
         total("attention fwd (causal)", "attention bwd (causal)")),
        ("rmsnorm fwd+bwd", fwd_bwd(lambda x, w: rmsnorm.rms_norm(x, w, 1e-5), (x, w), dy),
         fwd_bwd(lambda x, w: rmsnorm.reference(x, w, 1e-5), (x, w), dy), total("rmsnorm fwd", "rmsnorm bwd")),
        ("linear + cross-entropy fwd+bwd", loss_bwd(cross_entropy.linear_cross_entropy),
         loss_bwd(cross_entropy.reference), total("linear + cross-entropy fwd+bwd")),
        ("moe layer fwd+bwd (vs expert loop)", fwd_bwd(kernels.moe_ffn, moe_args, dy),
         fwd_bwd(moe.expert_loop, moe_args, dy),
         total("moe permute + gather", "moe grouped GEMM fwd (3 products)", "moe grouped GEMM bwd (3 products)",
               "moe combine")),
    ]
    print(f"{torch.cuda.get_device_name(dev)}, {dtype}, batch {B} x {T} tokens, heads {H}/{H_kv} x {D}, "
          f"d_model {C}, vocab {V}; median of do_bench")
    # TFLOP/s and the fraction of the bf16 peak say how a matrix-bound kernel does; GB/s (the analytic fewest
    # bytes over the time) how a memory-bound one does, against the device's bandwidth
    print(f"{'kernel':32s} {'ours ms':>9s} {'torch ms':>9s} {'speed-up':>9s} {'TFLOP/s':>9s} {'of peak':>8s} "
          f"{'GB/s':>8s}")
    for name, ours, theirs, (flops, nbytes) in cases:
        t_ours = do_bench(ours, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        t_theirs = do_bench(theirs, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        tflops = flops / (t_ours * 1e-3) / 1e12
        of_peak = f"{tflops * 1e12 / peak:.0%}" if peak else "?"
        print(f"{name:32s} {t_ours:9.3f} {t_theirs:9.3f} {t_theirs / t_ours:8.2f}x {tflops:9.1f} {of_peak:>8s} "
              f"{nbytes / (t_ours * 1e-3) / 1e9:8.0f}")
    print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")


# -----------------------------------------------------------------------------
# the planner: memory per GPU and the time of a run, from model.py's counts on the meta device (no formula for
# the parameter count that could drift from the model)

GiB = 2**30
# Tanuki's throughput on 16 nodes x 8 H100, Megatron-LM, bf16 (TANUKI.md "Pretraining")
TANUKI_GPUS = 128
TANUKI_TOKENS_PER_DAY = {"8B": 60e9, "8x8B": 30e9}
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, compute-optimal (TANUKI.md "General guidance")


def activation_bytes_per_token(cfg, is_moe):
    """Bytes one block keeps for its backward, per token, in bf16 with the CUDA kernels. Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1: 34 s b h + 5 a s^2 b per GPT
    layer) redone for this block: flash attention keeps no T x T scores (their 5 a s^2 b term), only a float32
    log-sum-exp per head; there is no dropout (their masks); grouped-query attention keeps K and V at n_kv_head
    heads; SwiGLU keeps four ffn-wide tensors where GeLU keeps two. With C = d_model, C_kv = n_kv_head x head_dim,
    F = ffn_hidden, H = n_head, 2 bytes per bf16 element:
        attention  2C + 4 (the norm's input and float32 1/rms) + 2C (normed: the q/k/v input) + 2C (q)
                   + 4C_kv (k, v) + 2C (output, also wo's input) + 4H (log-sum-exp)  = 8C + 4C_kv + 4H + 4
        FFN        2C + 4 (norm) + 2C (normed) + 2F (gate: silu's input) + 2F (silu(gate)) + 2F (up)
                   + 2F (their product: w_down's input)  = 4C + 8F + 4
    An MoE FFN (moe.py) keeps the norm's 2C + 4 and 2C, the router's float32 input 4C and its float32 logits and
    probabilities 8E, and for each of a token's k experts the gathered input 2C, the expert's 8F and its output
    2C (the gate's gradient needs it): 8C + 4 + 8E + k (4C + 8F). The PyTorch path keeps more: its norms save
    float32 inputs, and SDPA's fallback on a CPU keeps the T x T probabilities (a saved-tensor hook count on a
    small bf16 block gave 15.9 kB per token against this formula's 10.5 kB)."""
    C, F_, H = cfg.d_model, cfg.ffn_hidden, cfg.n_head
    attention = 8 * C + 4 * cfg.n_kv_head * cfg.head_dim + 4 * H + 4
    if is_moe:
        return attention + 8 * C + 4 + 8 * cfg.n_experts + cfg.moe_top_k * (4 * C + 8 * F_)
    return attention + 4 * C + 8 * F_ + 4


def memory_plan(model, shard_group, micro_batch_size, seq_len):
    """Bytes per GPU of one training step of `model` (built on the meta device) under FSDP2 as
    common.shard_model sets it up: every parameter, gradient and optimizer state sharded over `shard_group` GPUs
    (ZeRO-3; with hybrid sharding the GPUs of one replica), compute in bf16, float32 master weights."""
    from moe import MoE
    cfg = model.cfg
    n = model.num_params()
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    kept = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    tokens = micro_batch_size * seq_len
    layers = [activation_bytes_per_token(cfg, isinstance(b.ffn, MoE)) for b in model.blocks]
    # after the last block: the final norm's input and 1/rms (2C + 4) and the fused loss's dx (2C), which
    # kernels/cross_entropy.py computes in the forward together with dW (V x C, bf16); no logits are kept
    head = tokens * (4 * cfg.d_model + 4) + 2 * cfg.vocab_size * cfg.d_model
    return {
        # the float32 master shard, plus the bf16 copies all-gathered for compute: the block that runs, the one
        # FSDP2 prefetches, and the lm_head, kept gathered from the forward to the backward (common.shard_model)
        "parameters": 4 * n / shard_group + 2 * (2 * block + kept),
        # the float32 shard (reduce_dtype), plus one block's unsharded gradient: bf16, then float32 to reduce-scatter
        "gradients": 4 * n / shard_group + (2 + 4) * block,
        "optimizer": 2 * 4 * n / shard_group,  # AdamW's exp_avg and exp_avg_sq in float32
        "activations": tokens * sum(layers) + head,
        # per-block checkpointing keeps each block's input (2C per token) and recomputes one block at a time in
        # the backward: Korthikanti et al.'s full recomputation, 2 s b h L plus one layer
        "activations checkpointed": tokens * (2 * cfg.d_model * cfg.n_layer + max(layers)) + head,
    }


def plan_report():
    from model import Transformer
    with torch.device("meta"):  # shapes without storage: the 8x8B's 47B parameters cost nothing
        model = Transformer(common.model_config_from(globals()))
    n, n_active = model.num_params(), model.num_params(active=True)
    flops = model.flops_per_token(seq_len)
    shard_group = gpus // hsdp_replicas if hsdp_replicas > 1 else gpus
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
    sharding = (f"hybrid: sharded over {shard_group} GPUs, {hsdp_replicas} replicas" if hsdp_replicas > 1
                else f"ZeRO-3: sharded over all {gpus} GPUs")
    mem = memory_plan(model, shard_group, micro_batch_size, seq_len)
    print(f"\nmemory per GPU, FSDP2 {sharding}, bf16 compute, float32 master weights / gradients / AdamW")
    notes = {"parameters": "float32 shard + bf16 gathered: 2 blocks and the lm_head",
             "gradients": "float32 shard + one block's unsharded bf16 and float32",
             "optimizer": "AdamW: 2 x float32 shard",
             "activations": "per micro-batch, no checkpointing (Korthikanti et al. 2022, adapted)",
             "activations checkpointed": "per micro-batch, each block's input + one block recomputed"}
    for key, note in notes.items():
        print(f"  {key:25s} {mem[key] / GiB:8.2f} GiB  {note}")
    states = mem["parameters"] + mem["gradients"] + mem["optimizer"]
    for label, acts in (("without checkpointing", mem["activations"]),
                        ("with checkpointing", mem["activations checkpointed"])):
        peak = states + acts
        fits = "fits" if peak < gpu_memory_gib * GiB else "does NOT fit"
        chosen = " (the config's choice)" if activation_checkpoint == (label == "with checkpointing") else ""
        print(f"  peak estimate {label:22s} {peak / GiB:8.2f} GiB of {gpu_memory_gib:.0f}: {fits}{chosen}")
    peak_flops = common.PEAK_BF16_FLOPS["H100 SXM"]
    tokens_per_day = plan_mfu * peak_flops * gpus / flops * 86400
    print(f"\ntime on {gpus} H100 at MFU {plan_mfu:.0%} of {peak_flops / 1e12:.0f} TFLOP/s "
          f"({plan_mfu * peak_flops / 1e12:.0f} TFLOP/s per GPU)")
    print(f"  {tokens_per_day / 1e9:.1f}B tokens/day; Tanuki: 8B ~{TANUKI_TOKENS_PER_DAY['8B'] / 1e9:.0f}B, "
          f"8x8B ~{TANUKI_TOKENS_PER_DAY['8x8B'] / 1e9:.0f}B tokens/day on {TANUKI_GPUS} H100 (TANUKI.md)")
    print(f"  {max_iters:,} steps: {run_tokens / tokens_per_day:.1f} days, "
          f"{tokens_per_step / tokens_per_day * 86400:.1f} s per step")
    if activation_checkpoint:  # MFU counts the model's FLOPs (6N), not the recomputed forward (another 2N)
        print("  with activation checkpointing the GPUs also recompute each forward: about 4/3 of these FLOPs")
    implied = TANUKI_TOKENS_PER_DAY[tanuki] / 86400 * flops / (TANUKI_GPUS * peak_flops)
    print(f"  Tanuki-{tanuki}'s ~{TANUKI_TOKENS_PER_DAY[tanuki] / 1e9:.0f}B tokens/day on {TANUKI_GPUS} H100 at this "
          f"config's FLOPs per token is MFU {implied:.1%} (their 8x8B log: 241-246 TFLOP/s, 24-25%)")
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n
    print(f"\nChinchilla-optimal: {CHINCHILLA_TOKENS_PER_PARAM} tokens/parameter x {n / 1e9:.2f}B = "
          f"{chinchilla / 1e9:,.0f}B tokens; this run: {run_tokens / n:.0f} tokens/parameter "
          f"({run_tokens / chinchilla:.1f}x Chinchilla; Tanuki-8B trained ~170)")


# -----------------------------------------------------------------------------
# measurements on this device: the model's forward+backward, the MoE dispatch paths, generation

def timed(fn, dev, n):
    """Seconds per call of fn: one warm-up call (compilation, allocator), then the mean of n."""
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":  # kernels run asynchronously: wait for the last before reading the clock
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / n


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

    # decoding with the KV cache (model.generate, greedy): each new token attends to the cached keys and values
    model.eval()
    print(f"\ngeneration with the KV cache: 16-token prompts, {gen_tokens} new tokens per row, greedy")
    for batch in (1, 8):
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, 16)).tolist()
        t = timed(lambda prompts=prompts: model.generate(prompts, gen_tokens, temperature=0), dev, steps)
        print(f"  batch {batch}: {batch * gen_tokens / t:10,.0f} new tokens/s")


if __name__ == "__main__":
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if aot:
        sys.exit(0 if aot_report() else 1)
    elif plan:
        plan_report()
    elif measure:
        measure_report(dev)
    elif dev.type == "cuda":
        gpu_report(dev)
    else:
        analytic_report()
