"""Claims about model.py: causal, GQA is MHA with shared heads, RoPE is relative, the KV cache changes nothing,
and the 8B config is Tanuki-8B's size."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer, apply_rope, rope_factors, rope_tables, sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    shape = dict(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=96, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**shape, **overrides}))
    return model.eval()


def test_causal():
    model = tiny()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(before[:, 12:], after[:, 12:], atol=1e-3)  # and the change itself is seen


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(n_head=4, n_kv_head=2)
    mha = tiny(n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    head_dim = 64 // 4
    for key in list(state):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            # (n_kv_head * head_dim, d) -> every K/V head repeated for the 2 query heads that share it
            w = state[key].view(2, head_dim, 64)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * head_dim, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


def test_rope_depends_only_on_relative_position():
    head_dim = 32
    cos, sin = rope_tables(head_dim, 256, theta=10000.0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(m, n):
        at_m = rope_factors(cos[m : m + 1], sin[m : m + 1], q.dtype)
        at_n = rope_factors(cos[n : n + 1], sin[n : n + 1], q.dtype)
        return (apply_rope(q, *at_m) * apply_rope(k, *at_n)).sum()

    assert torch.allclose(score(5, 2), score(105, 102), atol=1e-4)
    assert torch.allclose(score(40, 40), (q * k).sum(), atol=1e-5)  # same position: no rotation left
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_kv_cache_greedy_equals_full_forward_greedy():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 7)).tolist()[0]
    cached = model.generate([prompt], max_new_tokens=15, temperature=0)[0]
    idx = torch.tensor([prompt])
    for _ in range(15):  # no cache: the whole sequence every step
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached == idx[0, 7:].tolist()


def test_batched_generation_with_mixed_prompt_lengths_equals_one_by_one():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batched = model.generate(prompts, max_new_tokens=10, temperature=0)
    alone = [model.generate([p], max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_packed_documents_chunked_and_dense_mask_paths_agree(monkeypatch):
    """Packed documents (doc_ids) on the CPU go through kernels.document_attention (SDPA a chunk of queries at a time,
    no (T, T) mask); under torch.compile through the dense block-diagonal mask. Same logits and gradients, with
    documents of 1 token, a chunk boundary inside a document, and an id that comes back later as a new document."""
    import kernels.attention
    monkeypatch.setattr(kernels.attention.document_attention, "__defaults__", (True, 16))  # chunks of 16 queries
    model = tiny(n_layer=1).train()
    idx = torch.randint(0, 97, (2, 40))
    doc_ids = torch.tensor([[0] * 10 + [1] + [2] * 20 + [0] * 9, [5] * 17 + [6] * 23])
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        model.zero_grad()
        logits = model(idx, doc_ids=doc_ids)[0]
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert (a - b).abs().max() < 1e-5
    assert all((ga - gb).abs().max() < 1e-5 for ga, gb in zip(grads_a, grads_b))
    # the last document of row 0 reuses id 0 yet sees nothing of the first: alone it gives the same logits
    alone = model(idx[:1, 31:])[0]
    assert (a[0, 31:] - alone[0]).abs().max() < 1e-5


def test_compiled_decode_step_equals_eager_decoding():
    """The compiled step (fixed shapes: the whole cache buffer and a full mask) gives eager decoding's logits at every
    step, for left-padded rows of different prompt lengths, and generate(compile=True) the same tokens."""
    from model import KVCache
    model = tiny(n_layer=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    idx = torch.tensor([[0, 0, 0, 0, 1, 2, 3], prompts[1]])
    # 64: the cache generate(compile=True) allocates below, so the step is compiled once for both
    eager, static = (KVCache(model.cfg, 2, 64, "cpu", torch.float32) for _ in range(2))
    for cache in (eager, static):
        cache.key_valid[0, :4], cache.padded = False, True
    with torch.no_grad():
        model(idx, cache=eager)
        model(idx, cache=static)
        step = model.compiled_step()
        token = torch.tensor([[5], [6]])
        for _ in range(6):
            static.step_pos = torch.tensor([static.pos])
            ours, static.pos = step(token, static), static.pos + 1
            theirs = model(token, cache=eager)[0]
            assert (ours - theirs).abs().max() < 1e-5
            token = theirs[:, -1].argmax(-1, keepdim=True)
    assert model.generate(prompts, 12, temperature=0, compile=True) == model.generate(prompts, 12, temperature=0)


def test_stop_tokens_end_a_row():
    model = tiny()
    prompt = [3, 1, 4, 1, 5]
    free = model.generate([prompt], max_new_tokens=10, temperature=0)[0]
    stop = free[4]
    first_stop = free.index(stop)
    steps = list(model.stream([prompt, prompt], max_new_tokens=10, temperature=0, stop_tokens=[stop]))
    assert len(steps) == first_stop + 1 and steps[-1] == [stop, stop]  # the stop token is yielded, then it ends
    assert model.generate([prompt], max_new_tokens=10, temperature=0, stop_tokens=[stop])[0] == free[:first_stop]


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)  # the nucleus keeps the best token
    draws = torch.stack([sample(logits, top_k=3, generator=torch.Generator().manual_seed(i)) for i in range(200)])
    top3 = logits.topk(3, dim=-1).indices
    assert all((draws[:, row, None] == top3[row]).any(-1).all() for row in range(4))
    model = tiny()
    a = model.generate([[1, 2]], max_new_tokens=8, temperature=1.0, seed=7)
    b = model.generate([[1, 2]], max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b


def test_loss_mask_and_ignore_index():
    model = tiny()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    mask = torch.zeros(2, 10)
    mask[0, 3:6] = 1
    mask[1, 8] = 1
    logits, loss = model(idx, targets, loss_mask=mask)
    per_token = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1), reduction="none")
    assert torch.allclose(loss, per_token[mask.view(-1) == 1].mean(), atol=1e-6)
    ignored = targets.masked_fill(mask == 0, -1)
    assert torch.allclose(model(idx, ignored)[1], loss, atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == tiny().num_params() - 97 * 64


def test_8b_config_is_tanuki_8b_size():
    scope = {}
    exec(open(os.path.join(ROOT, "configs", "8b.py")).read(), scope)
    from dataclasses import fields
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{f.name: scope[f.name] for f in fields(ModelConfig) if f.name in scope}))
    n = model.num_params()
    print(f"\n8b: {n / 1e9:.3f}B parameters, {model.flops_per_token(4096) / 1e9:.1f} GFLOPs/token at seq 4096")
    assert 7.4e9 <= n <= 7.6e9  # docs/recipe.md "Models": 7.5B, 7.52B by our count


def test_flops_per_token_by_hand():
    model = tiny()
    d, L, V, f = 64, 2, 97, 96
    matmul = L * (d * d + 2 * d * (d // 2) + d * d + 3 * d * f) + V * d  # attention, SwiGLU, lm_head
    norms = (2 * L + 1) * d
    assert model.flops_per_token(32) == 6 * (matmul + norms) + 12 * L * d * 32


def test_meta_init_then_materialize_matches_eager_shapes_and_statistics():
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layer=4, n_head=4, n_kv_head=2, ffn_hidden=96, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    eager = Transformer(cfg)
    assert torch.equal(model.rope_cos, eager.rope_cos)
    std = model.blocks[0].ffn.w_down.weight.std().item()
    assert math.isclose(std, cfg.init_std / math.sqrt(2 * cfg.n_layer), rel_tol=0.1)
    assert torch.all(model.norm.weight == 1)


def test_generation_longer_than_context_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1] * 60], max_new_tokens=10)
