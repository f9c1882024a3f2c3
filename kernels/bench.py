"""
Each kernel's cost at a model's shape, and on a GPU its time against its PyTorch counterpart: the kernel half of
bench.py (`python bench.py` runs it; `python bench.py --aot` runs kernels/aot.py). `shape` is a dict with
batch_size, seq_len, n_head, n_kv_head, head_dim, d_model, vocab_size, ffn_hidden, n_experts, top_k and dtype.
"""

import torch

import common

# H100 SXM5 data sheet: HBM3 bandwidth, for the analytic memory floor (the bf16 peak is common.PEAK_BF16_FLOPS)
H100_BYTES_PER_S = 3.35e12


def unpack(s):
    return (s["batch_size"], s["seq_len"], s["n_head"], s["n_kv_head"], s["head_dim"], s["d_model"], s["vocab_size"],
            s["ffn_hidden"], s["n_experts"], s["top_k"], s["dtype"])


def kernel_costs(shape):
    """(name, FLOPs, bytes) of one call of each kernel at the configured shape: the arithmetic the call must do
    and the fewest bytes it must move (each input read once, each output written once). Causal attention counts
    the half of the score matrix it computes; its backward does 2.5x the forward's products (FlashAttention-2's
    convention: dV, dP, dQ, dK and the recomputed S, against S and PV). The MoE layer's grouped GEMMs are the
    three expert products on the N*k routed rows (gate, up, down); their backward does twice that (d_input and
    d_weight) and reads every expert's weights again."""
    B, T, H, H_kv, D, C, V, F_, E, k, dtype = unpack(shape)
    e = torch.finfo(getattr(torch, dtype)).bits // 8
    N = B * T
    q_bytes, kv_bytes = N * H * D * e, N * H_kv * D * e
    attn_fwd = 4 * B * H * T * T * D / 2
    ce_flops = 6 * N * C * V  # logits, then their gradient times W (for dx) and times x (for dW)
    rows = N * k  # routed (token, expert) rows
    moe_flops = 3 * 2 * rows * C * F_
    # weights once; x rows read once through the sorted index (gate and up are one kernel, the gather fused into its
    # loads), g and u written, h read, the down product written
    moe_bytes = 3 * E * F_ * C * e + rows * C * e + 3 * rows * F_ * e + rows * C * e
    return [
        ("attention fwd (causal)", attn_fwd, 2 * q_bytes + 2 * kv_bytes + N * H * 4),
        ("attention bwd (causal)", 2.5 * attn_fwd, 4 * q_bytes + 4 * kv_bytes + 2 * N * H * 4),
        ("rmsnorm fwd", 4 * N * C, 2 * N * C * e + C * e),
        ("rmsnorm bwd", 8 * N * C, 3 * N * C * e + 2 * C * e),
        ("linear + cross-entropy fwd+bwd", ce_flops, 2 * N * C * e + 2 * V * C * e + N * 8),
        # float32 logits in, probs out, k (id, gate) pairs out; about 5 operations per score (max, exp, sum,
        # divide, compare)
        ("moe router top-k", 5 * N * E, 2 * N * E * 4 + N * k * 12),
        # the int64 expert ids read twice (count, rank), each row's position and assignment written as int32; no
        # copy of x in expert order (gate+up reads its rows through the assignment)
        ("moe permute", 0, N * k * 24),
        ("moe grouped GEMM fwd (3 products)", moe_flops, moe_bytes),
        ("moe grouped GEMM bwd (3 products)", 2 * moe_flops, 2 * moe_bytes + 3 * E * F_ * C * e),
        ("moe combine", 2 * rows * C, rows * C * e + N * C * e + N * k * 8),
    ]


def analytic_report(shape):
    B, T, H, H_kv, D, C, V, F_, E, k, dtype = unpack(shape)
    print(f"no GPU: measured nothing. Analytic cost of one call at batch {B} x {T} tokens, "
          f"{H} heads ({H_kv} K/V) of {D}, d_model {C}, vocab {V}, MoE {E} experts x ffn {F_} top-{k}, {dtype}.")
    print("The floors are what an H100 SXM could not beat at its data-sheet rates "
          f"({common.PEAK_BF16_FLOPS['H100 SXM'] / 1e12:.0f} TFLOP/s bf16, {H100_BYTES_PER_S / 1e12:.2f} TB/s).")
    print(f"{'kernel':34s} {'GFLOP':>10s} {'MB':>10s} {'FLOP/byte':>10s} {'floor us':>10s} {'bound':>8s}")
    for name, flops, nbytes in kernel_costs(shape):
        t_compute = flops / common.PEAK_BF16_FLOPS["H100 SXM"]
        t_memory = nbytes / H100_BYTES_PER_S
        print(f"{name:34s} {flops / 1e9:10.2f} {nbytes / 1e6:10.2f} {flops / nbytes:10.1f} "
              f"{max(t_compute, t_memory) * 1e6:10.1f} {'compute' if t_compute > t_memory else 'memory':>8s}")


def gpu_report(shape, dev, warmup_ms=100, rep_ms=500):
    """Each kernel and its PyTorch counterpart on the same inputs: median time (triton.testing.do_bench, device
    events), TFLOP/s from the analytic FLOPs above, and the fraction of the device's bf16 peak."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    import kernels
    import moe
    from kernels import cross_entropy, rmsnorm
    B, T, H, H_kv, D, C, V, ffn_hidden, moe_experts, moe_top_k, dtype = unpack(shape)
    dt = getattr(torch, dtype)
    peak = common.peak_flops(torch.cuda.get_device_name(dev))
    costs = {name: (flops, nbytes) for name, flops, nbytes in kernel_costs(shape)}

    def total(*names):  # (FLOPs, bytes) of several kernel calls
        return tuple(sum(costs[n][i] for n in names) for i in (0, 1))

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
         total("moe permute", "moe grouped GEMM fwd (3 products)", "moe grouped GEMM bwd (3 products)",
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
