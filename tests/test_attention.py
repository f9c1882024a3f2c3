"""Claims about kernels/attention.py: the flash kernel computes softmax attention, causal or not, grouped-query, and
with document masking, values and gradients, checked in Triton's interpreter on the CPU in float32 and float16
against float64 (at the interpreter's small blocks and at the production ones); it never reads the blocks of
documents a block of queries does not attend to; and document_attention, the CPU path, computes the same function a
chunk of queries at a time. Its compile for H100 is checked with every other kernel's in tests/test_kernels.py.

TRITON_INTERPRET=1 must be set before the kernels are decorated; it is set here, for this whole pytest process, and
the kernel module is reloaded in case a test collected earlier imported it without it (tests/test_kernels.py does
the same)."""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import attention  # noqa: E402

importlib.reload(attention)

# fp32: the interpreter multiplies in float32, as the kernels do on H100 for float32 inputs (IEEE, no tf32).
# fp16: inputs, outputs and the probabilities fed to the second product round to 11 bits of mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}
BLOCK = attention.INTERPRETER_CONFIGS["fwd"][0]  # 32 queries and keys per block in the interpreter


def max_rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the error against the scale of the result, never NaN-tolerant."""
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def qkv(B, H, H_kv, T, D, dtype=torch.float32, seed=0):
    """q as a transposed view of (B, T, H, D), as model.py passes it (the kernels read through strides); k, v; and
    an incoming gradient."""
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, H_kv, T, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn(B, H, T, D, dtype=dtype)


def check_attention(q, k, v, do, causal, doc_ids=None, attend=attention.flash_attention, tolerance=None):
    """`attend` and the float64 reference: outputs and the gradients of q, k, v."""
    out = attend(q, k, v, causal, doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention.reference(*ref_inputs, causal, doc_ids)
    ref_grads = torch.autograd.grad(ref, ref_inputs, do.double())
    tolerance = tolerance or TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and max_rel_err(out, ref) <= tolerance
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype and g.shape == r.shape
        assert max_rel_err(g, r) <= tolerance, f"gradient of {name}"


def packed_documents(T, lengths):
    """Row 0 packs documents of `lengths` (the rest of the row is one more), row 1 is one document. Ids repeat
    across documents: a run of equal consecutive ids is a document, not an id."""
    row = torch.zeros(T, dtype=torch.int64)
    start = 0
    for i, n in enumerate(lengths):
        row[start + n:] = (i + 1) % 2
        start += n
    assert start < T
    return torch.stack([row, torch.full((T,), 3)])


# documents of one block (aligned), 1 token, one block + 1 (straddling two blocks), and the 4-token rest
LENGTHS = [BLOCK, 1, BLOCK + 1]
T_DOCS = 2 * BLOCK + 6


# -----------------------------------------------------------------------------
# the flash kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 4, 8])  # query heads per K/V head
def test_flash_attention_matches_reference(dtype, causal, group):
    # 45 tokens: one full block of 32 and a masked tail, for queries and keys alike; head dim 32; a batch of 2
    # with 2 K/V heads, or (grouped) one of each, which keeps the interpreter's programs few
    B, H_kv = (2, 2) if group == 1 else (1, 1)
    check_attention(*qkv(B, H_kv * group, H_kv, 45, 32, dtype, seed=group), causal)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_production_head_dims(head_dim):
    check_attention(*qkv(1, 4, 1, 33, head_dim, seed=head_dim), causal=True)


def test_document_bounds_are_runs_of_equal_ids():
    first, end = attention.document_bounds(torch.tensor([[5, 5, 7, 7, 7, 5], [1, 2, 3, 4, 5, 6]]))
    assert first.tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 2, 3, 4, 5]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("dtype, causal, group", [(torch.float32, True, 1), (torch.float16, True, 8),
                                                  (torch.float32, False, 4), (torch.float16, False, 1)], ids=str)
def test_document_masking_matches_reference(dtype, causal, group):
    """Packed documents of 1 token, exactly one block, a block + 1, and (batch 2) a whole row, in both directions."""
    doc_ids = packed_documents(T_DOCS, LENGTHS)[:1 if group == 8 else 2]  # 8 heads: one row keeps it quick
    check_attention(*qkv(len(doc_ids), group, 1, T_DOCS, 32, dtype, seed=group), causal, doc_ids)


@pytest.mark.parametrize("config, causal", [(0, True), (0, False), (1, True), (2, False)])
def test_production_tiles_with_documents(monkeypatch, config, causal):
    """Every block shape of CONFIGS (the config-th of each kernel's list, or its last), in the interpreter: documents
    of 64 tokens (one key block of the defaults), 1, 65, and a whole row, grouped-query attention, head dim 64."""
    configs = {name: options[min(config, len(options) - 1)] for name, options in attention.CONFIGS.items()}
    monkeypatch.setattr(attention, "INTERPRETER_CONFIGS", configs)
    q, k, v, do = qkv(2, 2, 1, 170, 64, seed=config)
    check_attention(q, k, v, do, causal, packed_documents(170, [64, 1, 65]))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's row maxima of the NaN rows
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_never_read(causal):
    """Two documents meeting at a block boundary, the first all NaN (q, k, v and the incoming gradient): the second
    document's outputs and gradients are finite and equal attention over the second document alone, so no program
    of the second document loaded a block of the first (a loaded block would carry its NaN through P V and the
    gradients' products even where masked)."""
    T = 3 * BLOCK
    doc_ids = (torch.arange(T) >= BLOCK).long()[None]
    q, k, v, do = qkv(1, 4, 2, T, 32)
    with torch.no_grad():
        for t in (q, k, v, do):
            t[:, :, :BLOCK] = float("nan")
    out = attention.flash_attention(q, k, v, causal, doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), do)
    second = [t.detach()[:, :, BLOCK:].double().requires_grad_() for t in (q, k, v)]
    ref = attention.reference(*second, causal)
    ref_grads = torch.autograd.grad(ref, second, do[:, :, BLOCK:].double())
    assert max_rel_err(out[:, :, BLOCK:], ref) <= 1e-4
    for g, r in zip(grads, ref_grads):
        assert max_rel_err(g[:, :, BLOCK:], r) <= 1e-4


def test_custom_op_with_documents_traces_and_differentiates():
    """nanotanuki::flash_attention with doc_ids passes torch.library.opcheck: its fake gives the real outputs'
    shapes and strides, autograd is registered, and it traces under torch.compile's fake tensors."""
    q, k, v, _ = qkv(1, 2, 1, 8, 16)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    torch.library.opcheck(torch.ops.nanotanuki.flash_attention.default, (q, k, v, True, doc_ids))


# -----------------------------------------------------------------------------
# the CPU path

@pytest.mark.parametrize("causal", [True, False])
def test_document_attention_equals_reference(monkeypatch, causal):
    """Chunks of 16 queries (documents of 33 and 38 tokens straddle chunk boundaries), grouped-query, in float64:
    the same values and gradients as the reference's whole (T, T) mask. Each chunk's SDPA sees only the keys from
    its first query's document start to its last query (or its last query's document end)."""
    doc_ids = packed_documents(T_DOCS, LENGTHS)
    q, k, v, do = [t.detach().double().requires_grad_(t.requires_grad) for t in qkv(2, 4, 2, T_DOCS, 16)]

    def chunked(q, k, v, causal, doc_ids):
        return attention.document_attention(q, k, v, doc_ids, causal, chunk=16)

    check_attention(q, k, v, do, causal, doc_ids, attend=chunked, tolerance=1e-12)
    check_attention(q, k, v, do, causal, doc_ids, tolerance=1e-12,  # as exposed to model.py: 256 queries a chunk
                    attend=lambda q, k, v, causal, doc_ids: kernels.document_attention(q, k, v, doc_ids, causal))
    spans = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask, **kwargs):
        spans.append(tuple(attn_mask.shape[-2:]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    chunked(q[:1], k[:1], v[:1], causal, doc_ids[:1])  # documents of 32, 1, 33 and 4 tokens
    keys = [16, 32, 16, 31, 37] if causal else [32, 32, 34, 33, 37]
    assert spans == [(16, n) for n in keys[:-1]] + [(6, keys[-1])]
