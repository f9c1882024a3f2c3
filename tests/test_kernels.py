"""Claims about kernels/: each Triton kernel computes the same function as its PyTorch reference (values and
gradients), checked in Triton's interpreter on the CPU in float32 and float16; and each compiles for H100 in bf16 at
its production configuration with no spills, using wgmma where it multiplies matrices
(docs/design.md "Running without a GPU"). The interpreter multiplies bf16 bit patterns, so bf16 is checked only by
the compile.

TRITON_INTERPRET=1 must be set before the kernels are decorated; it is set here, for this whole pytest process, and
the kernel modules are reloaded in case a test collected earlier imported them without it. It only changes how
Triton kernels run, and the other test files use PyTorch on the CPU (kernels.use_triton is False there)."""

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
import moe  # noqa: E402
from kernels import attention, cross_entropy, rmsnorm  # noqa: E402
from kernels import moe as kmoe  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

for _module in (attention, rmsnorm, cross_entropy, kmoe):
    importlib.reload(_module)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32: the interpreter multiplies in float32, as the kernels do on H100 for float32 inputs (IEEE, no tf32).
# fp16: inputs, outputs and the probabilities fed to the second product round to 11 bits of mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}


def max_rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the error against the scale of the result, never NaN-tolerant."""
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_against_float64(fn, ours_fn, inputs, grad_out, dtype):
    """Run the kernel on `inputs` and the reference on float64 copies; compare outputs and input gradients."""
    out = ours_fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = fn(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    assert out.dtype == dtype
    assert max_rel_err(out, ref) <= TOLERANCE[dtype]
    for name, g, r in zip("abcdefgh", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert max_rel_err(g, r) <= TOLERANCE[dtype], f"gradient of input {name}"


# -----------------------------------------------------------------------------
# attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 4, 8])  # query heads per K/V head
def test_flash_attention_matches_reference(dtype, causal, group):
    torch.manual_seed(group)
    # 45 tokens: one full block of 32 and a masked tail, for queries and keys alike; batch 2, head dim 32
    B, H_kv, T, D = 2, 1 if group == 8 else 2, 45, 32
    # q is a transposed view, as model.py passes it: the kernel reads through strides
    q = torch.randn(B, T, H_kv * group, D, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, H_kv, T, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, dtype=dtype, requires_grad=True)
    do = torch.randn(B, H_kv * group, T, D, dtype=dtype)
    check_against_float64(lambda q, k, v: attention.reference(q, k, v, causal),
                          lambda q, k, v: attention.flash_attention(q, k, v, causal), (q, k, v), do, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_production_head_dims(head_dim):
    torch.manual_seed(head_dim)
    B, H, H_kv, T = 1, 4, 1, 33
    q = torch.randn(B, H, T, head_dim, requires_grad=True)
    k = torch.randn(B, H_kv, T, head_dim, requires_grad=True)
    v = torch.randn(B, H_kv, T, head_dim, requires_grad=True)
    do = torch.randn(B, H, T, head_dim)
    check_against_float64(attention.reference, attention.flash_attention, (q, k, v), do, torch.float32)


# -----------------------------------------------------------------------------
# RMSNorm and the fused loss

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rmsnorm_matches_reference(dtype):
    torch.manual_seed(0)
    # 21 rows (not a multiple of the backward's rows per program) of 48 (not a power of two: masked lanes)
    x = torch.randn(3, 7, 48, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48, dtype=dtype)).requires_grad_()
    dy = torch.randn(3, 7, 48, dtype=dtype)
    check_against_float64(lambda x, w: rmsnorm.reference(x, w, 1e-5), lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
                          (x, w), dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_cross_entropy_matches_reference(dtype):
    """Tanuki's vocab of 65,536, 37 tokens in chunks of 16 (the last chunk is short), ignored targets and a loss
    mask, as model.py's forward passes them."""
    torch.manual_seed(0)
    N, C, V = 37, 16, 65536
    x = torch.randn(N, C, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[[3, 10, 36]] = -1
    mask = (torch.rand(N) > 0.3).float()
    loss = cross_entropy.linear_cross_entropy(x, w, targets, mask, chunk=16)
    grads = torch.autograd.grad(2 * loss, (x, w))  # a non-unit incoming gradient scales the saved ones
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cross_entropy.reference(x64, w64, targets, mask)
    ref_grads = torch.autograd.grad(2 * ref, (x64, w64))
    assert max_rel_err(loss, ref) <= TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and max_rel_err(g, r) <= TOLERANCE[dtype]
    with torch.no_grad():  # the forward alone skips the gradients and gives the same loss
        assert cross_entropy.linear_cross_entropy(x, w, targets, mask, chunk=16).item() == loss.item()
    nothing = torch.full((N,), -1)  # a batch with nothing to learn gives 0, not NaN
    assert cross_entropy.linear_cross_entropy(x, w, nothing, chunk=16).item() == 0.0


# -----------------------------------------------------------------------------
# MoE routing

@pytest.mark.parametrize("n_experts, top_k", [(6, 2), (64, 8)])  # 6: not a power of two; 64 x top-8: the limits
@pytest.mark.parametrize("mode", moe.ROUTER_MODES)
def test_fused_router_equals_route(mode, n_experts, top_k):
    """Same experts in the same order, same gates and probs, and the same gradient to the logits through both the
    gates and the probs (the balance loss differentiates the probs), with and without a selection bias."""
    torch.manual_seed(n_experts)
    logits = 2 * torch.randn(45, n_experts)  # 45 tokens: the router's last block of tokens is masked
    for bias in (None, 0.05 * torch.randn(n_experts)):
        ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours, ref = kmoe.route(ours_in, top_k, mode, bias), moe.route(ref_in, top_k, mode, bias)
        assert torch.equal(ours[0], ref[0])
        for a, b in zip(ours[1:], ref[1:]):
            assert max_rel_err(a, b) <= 1e-6
        d_gates, d_probs = torch.randn(45, top_k), torch.randn(45, n_experts)
        grads = [torch.autograd.grad((g * d_gates).sum() + (p * d_probs).sum(), x)[0]
                 for (_, g, p), x in ((ours, ours_in), (ref, ref_in))]
        assert max_rel_err(*grads) <= 1e-5


def skewed_experts():
    """29 tokens x top-2 over 5 experts: experts 0, 2 and 4 get many tokens, 1 none and 3 exactly one."""
    torch.manual_seed(0)
    experts = torch.tensor([[0, 2], [2, 4], [4, 0]])[torch.randint(0, 3, (29,))]
    experts[7, 1] = 3
    return experts


@pytest.mark.parametrize("capacity", [None, 5])
def test_permutation_then_inverse_is_identity(capacity):
    """The counting sort gives the stable argsort's order, offsets and drops (moe.expert_sorted's), each kept
    assignment's position and the row holding it are inverse maps, and gathering x into expert order and combining
    it back with gates (1, 0) returns x bit for bit."""
    experts = skewed_experts()
    position, sorted_assign, offsets = kmoe.permute(experts, 5, capacity)
    for ours, ref in zip((position, sorted_assign, offsets), kmoe.permute_reference(experts, 5, capacity)):
        assert torch.equal(ours, ref)
    counts = offsets[1:] - offsets[:-1]
    assert counts[1] == 0 and counts[3] == 1 and (capacity is None or counts.max() == capacity)
    kept = position >= 0
    assert torch.equal(sorted_assign[position[kept].long()], torch.arange(58, dtype=torch.int32)[kept])
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(29, 40, dtype=dtype)
        xs = kmoe.Gather.apply(x, position, sorted_assign, 2)
        rows = int(offsets[-1])
        assert torch.equal(xs[:rows], x[sorted_assign[:rows].long() // 2]) and not xs[rows:].any()
        first = torch.tensor([[1.0, 0.0]]).expand(29, 2)
        back = kmoe.Combine.apply(xs, first, position, sorted_assign)
        # capacity may drop a token's first assignment: those rows come back as zeros
        assert torch.equal(back, torch.where(kept.view(29, 2)[:, :1], x, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_gemm_equals_per_expert_loop(dtype):
    """Forward, d_input and d_weight over groups of 0, 1, 17, 0 and 33 rows (one expert tile holds 16 rows under
    the interpreter, so groups end mid-tile), with K = 40 and N = 48 not multiples of the blocks."""
    torch.manual_seed(0)
    offsets = torch.tensor([0, 0, 1, 18, 18, 51], dtype=torch.int32)
    x = torch.randn(51, 40, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(5, 48, 40)).to(dtype).requires_grad_()
    check_against_float64(lambda x, w: kmoe.grouped_mm_reference(x, w, offsets),
                          lambda x, w: kmoe.grouped_mm(x, w, offsets), (x, w), torch.randn(51, 48, dtype=dtype),
                          dtype)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])  # dropless, and a capacity that drops assignments
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_moe_layer_with_kernels_equals_reference(monkeypatch, dtype, capacity_factor):
    """moe.MoE through the kernels (router, permutation, grouped GEMMs, combine) gives the PyTorch path's output,
    and the same gradients to the input and every parameter, with the balance and z losses in the loss."""
    torch.manual_seed(0)
    layer = moe.MoE(SimpleNamespace(d_model=32, ffn_hidden=48, n_experts=6, moe_top_k=2,
                                    moe_router="softmax_topk_renorm", moe_capacity_factor=capacity_factor,
                                    moe_bias_update_rate=1e-3))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.expert_bias.normal_(std=0.02)
    layer.to(dtype)
    x = torch.randn(2, 13, 32, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 13, 32, dtype=dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
        layer.zero_grad()
        y = layer(x)
        loss = (y.float() * dy.float()).sum() + layer.aux_loss + layer.z_loss
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        results[backend] = y, grads, layer.stats["dropped"]
    (y_ref, grads_ref, dropped), (y, grads, dropped_kernels) = results["torch"], results["triton"]
    assert dropped == dropped_kernels and (dropped > 0) == (capacity_factor > 0)
    assert max_rel_err(y, y_ref) <= TOLERANCE[dtype]
    for name, g, r in zip(["x", *dict(layer.named_parameters())], grads, grads_ref):
        assert g.dtype == r.dtype and max_rel_err(g, r) <= TOLERANCE[dtype], name


# -----------------------------------------------------------------------------
# dispatch and model.py

def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NANOTANUKI_KERNELS", raising=False)
    assert not kernels.use_triton(cpu)  # the default on a CPU is PyTorch
    monkeypatch.setenv("NANOTANUKI_KERNELS", "triton")
    assert kernels.use_triton(cpu)  # allowed here because TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_triton(cpu)
    monkeypatch.setenv("NANOTANUKI_KERNELS", "torch")
    assert not kernels.use_triton(cpu)
    monkeypatch.setenv("NANOTANUKI_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernels.use_triton(cpu)


def test_model_with_kernels_equals_model_with_torch(monkeypatch):
    """The whole model through the kernels (attention, both RMSNorms, the fused loss) gives model.py's loss and
    gradients; on that path it returns no logits, and without targets it still does."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=1, ffn_hidden=96, max_seq_len=64)
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 97, (2, 21)), torch.randint(0, 97, (2, 21))
    targets[0, :4] = -1
    mask = (torch.rand(2, 21) > 0.2).float()
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
        model.zero_grad()
        logits, loss = model(idx, targets, loss_mask=mask)
        loss.backward()
        results[backend] = logits, loss.detach(), [p.grad.clone() for p in model.parameters()]
        assert (logits is None) == (backend == "triton")
        assert model(idx)[0].shape == (2, 21, 97)
    (_, loss_torch, grads_torch), (_, loss_triton, grads_triton) = results["torch"], results["triton"]
    assert max_rel_err(loss_triton, loss_torch) <= 1e-5
    for g, r in zip(grads_triton, grads_torch):
        assert max_rel_err(g, r) <= 1e-4


# -----------------------------------------------------------------------------
# torch.compile: each kernel is one custom op (kernels/__init__.py), so a block compiles as one graph around them

@pytest.mark.parametrize("ffn", ["dense", "moe", "moe_capacity"])
def test_block_with_kernels_compiles_whole(monkeypatch, ffn):
    """With the kernels on (the CUDA path, here in the interpreter), dynamo traces a dense or MoE block with no graph
    break: the launches, their host-side grids and the MoE's data-dependent sizes stay inside the nanotanuki ops,
    whose fake functions give the output shapes. Compiled (aot_eager) equals eager to 1e-5, gradients included."""
    from test_moe import assert_compiles_whole, block_config
    monkeypatch.setenv("NANOTANUKI_KERNELS", "triton")
    ops = ["nanotanuki.flash_attention", "nanotanuki.rms_norm"]
    overrides = {}
    if ffn != "dense":
        ops += ["nanotanuki.moe_route", "nanotanuki.moe_ffn"]
        overrides = dict(n_experts=8, moe_top_k=2, moe_router="softmax_topk_renorm", moe_bias_update_rate=1e-3,
                         moe_capacity_factor=1.0 if ffn == "moe_capacity" else 0.0)
    assert_compiles_whole(block_config(**overrides), expect_ops=ops)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_row_cross_entropy_matches_reference(monkeypatch, backend, dtype):
    """DPO's per-sequence sums: each row's summed loss and its gradients for a different incoming gradient per row
    (what the DPO loss sends back) equal full float64 logits', with ignored targets, a loss mask and a short last
    chunk, through the row kernel (interpreted) and through the PyTorch chunks."""
    monkeypatch.setenv("NANOTANUKI_KERNELS", backend)
    torch.manual_seed(0)
    B, T, C, V = 3, 13, 16, 4096
    x = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    targets[0, :5] = -1
    targets[2] = -1  # a row with nothing that counts sums to 0
    mask = (torch.rand(B, T) > 0.3).float()
    upstream = torch.tensor([1.5, -0.7, 2.0])
    sums = kernels.linear_cross_entropy_per_row(x, w, targets, mask, chunk=7)
    grads = torch.autograd.grad((sums * upstream).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cross_entropy.reference_per_row(x64, w64, targets, mask)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (x64, w64))
    assert sums.shape == (B,) and sums[2].item() == 0.0
    assert max_rel_err(sums, ref) <= TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and max_rel_err(g, r) <= TOLERANCE[dtype]


def test_fused_loss_compiles_whole():
    """The fused lm_head + cross-entropy op under torch.compile(fullgraph=True): eager's loss and gradients."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 32, requires_grad=True), torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (2, 9))
    targets[0, :3] = -1
    mask = (torch.rand(2, 9) > 0.3).float()

    def loss_fn(x, w, targets, mask):
        return kernels.linear_cross_entropy(x, w, targets, mask, chunk=8)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        loss = fn(x, w, targets, mask)
        results.append([loss.detach(), *torch.autograd.grad(2 * loss, (x, w))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


# -----------------------------------------------------------------------------
# ahead-of-time compile for H100, and the CPU half of the benchmark

def run_bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOTANUKI_KERNELS")}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_kernel_compiles_for_h100_without_spills_and_with_wgmma():
    # a fresh process: the real compiler needs kernels decorated without TRITON_INTERPRET
    result = run_bench("--aot")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = {row.split("|")[1].strip() for row in rows}
    assert names == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_delta",
                     "rmsnorm_fwd", "rmsnorm_bwd", "cross_entropy_rows", "moe_router", "moe_count", "moe_scan",
                     "moe_rank", "moe_gather", "moe_gather_bwd", "moe_combine", "moe_grouped_mm",
                     "moe_grouped_mm_dx", "moe_grouped_mm_dw"}
    multiply_matrices = {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "moe_grouped_mm",
                         "moe_grouped_mm_dx", "moe_grouped_mm_dw"}
    for row in rows:
        name, _, registers, spill_bytes, _, wgmma = [c.strip() for c in row.split("|")[1:-1]]
        assert int(registers) <= 255 and spill_bytes == "0", row
        assert wgmma == "yes" if name in multiply_matrices else wgmma.startswith("n/a"), row


def test_aot_check_fails_spills_shared_memory_and_matmuls_without_wgmma():
    from kernels.aot import SMEM_LIMIT, problems
    good = {"error": None, "spill_bytes": 0, "shared_bytes": 1024, "matmul": True, "wgmma": True}
    assert problems(good) == []
    assert problems({**good, "spill_bytes": 8})
    assert problems({**good, "shared_bytes": SMEM_LIMIT + 1})
    assert problems({**good, "wgmma": False})
    assert problems({**good, "matmul": False, "wgmma": False}) == []
    assert problems({**good, "error": "CompilationError: ..."})


def test_bench_on_cpu_measures_nothing_and_says_so():
    result = run_bench("--seq_len=1024")
    assert result.returncode == 0, result.stderr
    assert "measured nothing" in result.stdout
    assert "attention fwd (causal)" in result.stdout and "linear + cross-entropy" in result.stdout
    assert "moe grouped GEMM fwd" in result.stdout and "moe combine" in result.stdout
