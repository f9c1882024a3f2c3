"""
Benchmarks and the plan of a run, in four modes (the traced simulation of a whole training step at 128 GPUs is
simulate.py):

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
dtype = "bfloat16"    # what the kernels and the model run in on H100
# the planner
gpus = 128            # Tanuki's 16 nodes x 8 H100 (docs/recipe.md "Pretraining")
plan_mfu = 0.25       # Tanuki's 241-246 TFLOP/s of 989: about a quarter ("Pretraining")
activation_checkpoint = "full"  # as train.py: with "full" the GPUs also recompute each forward
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
grad_sync = ""
reshard_after_forward = False
hsdp_replicas = expert_parallel = 0
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
    print("memory per GPU and the communication of a step: python simulate.py <configs> (traced)")
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
