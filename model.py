"""
The Tanuki model: a Llama-style decoder (docs/recipe.md "Models").

    token ids -> embedding -> n_layer x [RMSNorm -> grouped-query attention with RoPE -> +residual,
                                         RMSNorm -> SwiGLU FFN -> +residual] -> RMSNorm -> lm_head -> logits

One file, no framework: `ModelConfig` holds the shape, `Transformer` the weights. The same code builds the
2-layer CPU model of configs/tiny.py and the Tanuki-8B of configs/8b.py (7.52B parameters). Weight names and
conventions (RoPE on split halves, RMSNorm in float32, no biases) follow Hugging Face's Llama so that the
export in serve.py is a renaming, not a conversion.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from moe import ROUTER_MODES, MoE


@dataclass
class ModelConfig:
    # defaults are Tanuki-8B's shape, a Llama-3-8B with a 65,536 vocab (docs/recipe.md "Models")
    vocab_size: int = 65536      # fits uint16 token shards; docs/recipe.md "Tokenizer": 65k pieces, ours is 2**16
    d_model: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 8           # grouped-query attention: 4 query heads share each K/V head
    ffn_hidden: int = 14336      # SwiGLU hidden width (3.5 x d_model)
    rope_theta: float = 10000.0  # 10k from scratch; 500k from the start was a suspect of the failed 38B run
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # Tanuki-8B: untied
    init_std: float = 0.02        # GPT-2's; configs/8b.py sets Tanuki's Megatron value 0.008
    # Mixture of Experts (moe.py; upcycle.py fills these in): 0 experts is the dense model
    n_experts: int = 0            # Tanuki-8x8B: 8 ...
    moe_top_k: int = 2            # ... of which 2 per token: 47B total, 13B active
    moe_layer_interval: int = 1   # every k-th layer's FFN is an MoE (1: all, as Tanuki-8x8B and Mixtral)
    moe_router: str = "topk_softmax"  # routing mode, see moe.py
    moe_aux_loss_coef: float = 0.01   # Switch Transformer's load-balancing loss weight (their alpha)
    moe_z_loss_coef: float = 0.0      # ST-MoE's router z-loss; Tanuki trained without it
    moe_capacity_factor: float = 0.0  # > 0: each expert takes at most this x its fair share, the rest is dropped
    moe_bias_update_rate: float = 0.0  # > 0: DeepSeek-V3's auxiliary-loss-free balancing (their gamma 0.001)

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("RoPE rotates pairs of dimensions: the head dimension must be even")
        if self.n_experts and not 0 < self.moe_top_k <= self.n_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")
        if self.n_experts and self.moe_router not in ROUTER_MODES:
            raise ValueError(f"unknown moe_router '{self.moe_router}': use one of {ROUTER_MODES}")

    @property
    def head_dim(self):
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 even under bf16: the mean of squares loses too much in 8 bits of mantissa.
        # On CUDA the fused kernel computes the same in one pass (kernels/rmsnorm.py)
        if kernels.use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # the same product in one call: a tenth of a small model's decoding time on CPU
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta, device=None):
    """cos and sin of every position x frequency pair: (max_len, head_dim // 2) each, in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def rope_factors(cos, sin, dtype):
    """The tables of rope_tables for the positions at hand, (T, head_dim // 2) or (B, T, head_dim // 2) when each
    row has positions of its own (packed documents), as the two factors apply_rope multiplies by: (B or 1, T, 1,
    head_dim) each, in the activations' dtype. Computed once per forward, not once per layer and tensor."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, T, heads, head_dim); cos, sin: rope_factors. Rotates the pair (x_i, x_{i + head_dim/2}), the "split
    # halves" layout of GPT-NeoX and Hugging Face Llama (Meta's original pairs neighbours instead):
    # (x1 cos - x2 sin, x2 cos + x1 sin) = x * [cos, cos] + [x2, x1] * [-sin, sin], the same products and sums
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


def document_mask(doc_ids):
    """The block-diagonal causal mask (B, 1, T, T) of packed documents: earlier keys of the same document only."""
    begin = kernels.document_starts(doc_ids)
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((begin[:, :, None] == begin[:, None, :]) & causal)[:, None]


class KVCache:
    """Keys and values of every layer for one batch being generated, preallocated for `max_len` positions. `pos`
    positions are filled; `key_valid` marks the real tokens of left-padded prompts (False on padding), so a batch can
    mix prompt lengths. Eager decoding attends to the filled part only. A compiled step (Transformer.decode_step)
    needs the same shapes at every call: it writes at the positions held in the tensor `step_pos` and attends to the
    whole buffer, the positions not yet written hidden by its mask."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False  # some key_valid is False: every step needs the mask
        self.pos = 0
        self.step_pos = None  # (T,) positions of a compiled step's tokens, set by its caller

    def store(self, layer, k, v):
        """Write `layer`'s keys and values of the new positions (B, n_kv_head, T, head_dim); returns the keys and
        values attention reads."""
        if self.step_pos is not None:
            self.k[layer].index_copy_(2, self.step_pos, k)
            self.v[layer].index_copy_(2, self.step_pos, v)
            return self.k[layer], self.v[layer]
        T = k.size(2)
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def mask(self, T):
        """The attention mask of the next T positions, or None when plain attention computes the same: no padding,
        and either one new position (it sees every cached key) or a prompt from position 0 (causal). Building the
        mask every step cost a seventh of a small model's decoding time on CPU."""
        return self.attention_mask(T) if self.padded or (T > 1 and self.pos > 0) else None

    def attention_mask(self, T):
        # (B, 1, T, keys): causal with the cache's offset, padding keys hidden. Each position always sees itself,
        # so a query sitting on padding still has one key and its softmax stays finite (no NaN). A compiled step
        # sees every slot of the buffer; the ones after its positions are hidden as "in the future"
        if self.step_pos is not None:
            q_pos, n_keys = self.step_pos[:, None], self.k.size(3)
        else:
            q_pos, n_keys = torch.arange(self.pos, self.pos + T, device=self.k.device)[:, None], self.pos + T
        k_pos = torch.arange(n_keys, device=self.k.device)[None, :]
        return ((k_pos <= q_pos) & self.key_valid[:, None, None, :n_keys]) | (k_pos == q_pos)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, attn_mask=None, doc_ids=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.store(layer, k, v)
        # ---- the one place attention is computed. Training (causal, no mask) on CUDA: the flash kernel of
        # kernels/attention.py. Elsewhere, and for generation's masks, SDPA; enable_gqa lets each K/V head serve
        # n_head / n_kv_head query heads without materializing repeated copies of K and V (as the kernel does).
        # Decoding without padding needs no mask: one new query sees every cached key, and a prompt filled from
        # position 0 is plain causal attention (KVCache.mask). Packed documents (doc_ids): the kernel skips the key
        # blocks of other documents on CUDA; on the CPU SDPA runs a chunk of queries at a time over its documents'
        # keys, never a (T, T) mask per row, except under torch.compile, which cannot trace that path's host loop
        if attn_mask is None and cache is None and kernels.use_triton(q):
            y = kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        elif doc_ids is not None and not torch.compiler.is_compiling():
            y = kernels.document_attention(q, k, v, doc_ids)
        else:
            if doc_ids is not None:
                attn_mask = document_mask(doc_ids)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


class SwiGLU(nn.Module):
    # FFN(x) = W_down (silu(W_gate x) * W_up x)  (Shazeer 2020, "GLU Variants Improve Transformer"; Llama)
    def __init__(self, cfg):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    # pre-norm: the residual stream itself is never normalized, which keeps deep stacks trainable
    def __init__(self, cfg, layer=0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        is_moe = cfg.n_experts > 0 and (layer + 1) % cfg.moe_layer_interval == 0
        self.ffn = MoE(cfg) if is_moe else SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, attn_mask=None, doc_ids=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask, doc_ids)
        return x + self.ffn(self.ffn_norm(x))


def init_value(p, name, cfg, generator=None):
    """Fill `p` (the whole tensor of the parameter called `name`) with its initial values, in place. One rule for
    the model built whole (Transformer.init_weights) and for a sharded one (checkpoint.init_sharded, which draws each
    whole tensor from a generator seeded by its name and keeps its own slice)."""
    if name.endswith("norm.weight"):
        return p.fill_(1.0)
    if name.endswith("lora_b"):  # LoRA's B starts at 0: the adapted model starts as the base model
        return p.zero_()
    if name.endswith("lora_a"):  # nn.Linear's own (Kaiming uniform, a = sqrt(5)) bound, 1 / sqrt(fan_in)
        bound = 1 / math.sqrt(p.size(-1))
        return p.uniform_(-bound, bound, generator=generator)
    std = cfg.init_std
    if name.endswith(("attn.wo.weight", "ffn.w_down.weight", "ffn.w_down")):  # dense, or stacked experts
        # projections that write into the residual stream: std / sqrt(2 n_layer), so the stream's variance does not
        # grow with depth (GPT-2 paper; Megatron's scaled_init_method_normal, which Tanuki used)
        std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    return p.normal_(0.0, std, generator=generator)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE tables are derived, not learned: non-persistent buffers stay out of checkpoints
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialize every weight. Separate from __init__ so that a model built on the meta device and
        sharded by FSDP can be materialized with `to_empty()` and then initialized in place (torchtitan's way);
        a sharded model is filled rank by rank by checkpoint.init_sharded with the same rule (init_value)."""
        self.init_buffers()
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_bias.zero_()
        for name, p in self.named_parameters():
            init_value(p, name, self.cfg)

    @torch.no_grad()
    def init_buffers(self):
        """Reset the buffers a checkpoint does not hold (after `to_empty()`, which leaves them uninitialized): the
        RoPE tables and the MoE token counters. (The MoE selection bias is saved; fresh models zero it too.)"""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for m in self.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert.zero_()

    def forward(self, idx, targets=None, loss_mask=None, cache=None, doc_ids=None, per_row=False):
        """idx, targets: (B, T) token ids; targets == -1 are ignored. loss_mask: (B, T), 1 where the target
        counts (SFT trains only on assistant tokens). doc_ids: (B, T), for sequences packed from several documents
        (sft.py): each run of equal ids is a document of its own, with positions from 0 and attention only within
        itself, so it computes exactly what it would alone. Returns (logits, loss): logits (B, T, vocab), float32
        when a loss is computed. With a KV cache only the last position's logits are computed (B, 1, vocab).
        When the fused loss kernel takes the loss (CUDA, kernels/), logits is None: call without targets for them.
        per_row: (None, loss (B,)), each row's summed cross-entropy over the tokens that count (DPO's sequence
        log-probs, negated), computed chunk by chunk without the logits on every device; no router losses added."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        attn_mask = None if cache is None else cache.mask(T)
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) is for training and scoring, not for a KV cache")
            # a position's index within its document: t minus where that document began
            t = torch.arange(T, device=idx.device).expand(B, T)
            positions = t - kernels.document_starts(doc_ids)  # (B, T)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim // 2)
        x = self.embed(idx)  # (B, T, d_model)
        cos, sin = rope_factors(cos, sin, x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, attn_mask, doc_ids)
        x = self.norm(x)
        if cache is not None:
            cache.pos += T
            return self.lm_head(x[:, -1:]), None
        # ---- at 8B and seq 4096 the float32 (B, T, 65536) logits are the largest activation of the whole model.
        # On CUDA the loss is taken chunk by chunk without them (kernels/cross_entropy.py): no logits come back
        if per_row:
            return None, kernels.linear_cross_entropy_per_row(x, self.lm_head.weight, targets, loss_mask)
        if targets is not None and kernels.use_triton(x):
            logits, loss = None, kernels.linear_cross_entropy(x, self.lm_head.weight, targets, loss_mask)
        else:
            logits = self.lm_head(x)
            if targets is None:
                return logits, None
            logits = logits.float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction="none")
            weights = (targets.reshape(-1) != -1).float()
            if loss_mask is not None:
                weights = weights * loss_mask.reshape(-1).float()
            # mean over the tokens that count; clamp so that a batch with nothing to learn gives 0, not NaN
            loss = (loss * weights).sum() / weights.sum().clamp(min=1)
        moe_layers = [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]
        if moe_layers and self.training:
            # the routers' balance and z losses join the objective, averaged over layers so that the coefficients
            # do not depend on depth (as Hugging Face's Mixtral). In eval mode the loss is the cross-entropy alone.
            cfg = self.cfg
            loss = loss + sum(cfg.moe_aux_loss_coef * m.aux_loss + cfg.moe_z_loss_coef * m.z_loss
                              for m in moe_layers) / len(moe_layers)
        return logits, loss

    def decode_step(self, idx, cache):
        """Logits (B, 1, vocab) of one new token per row (idx (B, 1)) at position cache.step_pos, with fixed shapes
        (the whole cache buffer, a full mask) so that torch.compile captures it once for every step: the step then
        runs as a few fused kernels instead of some 300 small operations, each of which costs more than its
        arithmetic at batch 1. The caller sets step_pos and advances cache.pos. Computes what
        forward(idx, cache=cache) computes."""
        cos, sin = self.rope_cos[cache.step_pos], self.rope_sin[cache.step_pos]
        x = self.embed(idx)
        cos, sin = rope_factors(cos, sin, x.dtype)
        attn_mask = cache.attention_mask(1)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, attn_mask)
        return self.lm_head(self.norm(x))

    def compiled_step(self):
        """decode_step compiled, once per model. A second batch size or cache length makes torch.compile compile
        that dimension as dynamic, so a server's changing batches cost two or three compilations in all."""
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.decode_step, fullgraph=True)
        return self._compiled_step

    def num_params(self, active=False):
        """Total parameters, embeddings included (Tanuki-8B: 7.52B). `active` counts the parameters one token
        uses, which differs from the total only for a Mixture of Experts (moe.py)."""
        n = sum(p.numel() for p in self.parameters())
        if active:  # a token runs top_k of the n_experts experts of each MoE layer
            for m in self.modules():
                if isinstance(m, MoE):
                    experts = m.w_gate.numel() + m.w_up.numel() + m.w_down.numel()
                    n -= experts * (m.n_experts - m.top_k) // m.n_experts
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), for MFU: 6 per parameter that takes part in a matrix
        multiply (not the input embedding, which is a lookup; the lm_head is counted), plus attention's
        QK^T and AV: 12 * n_layer * d_model * seq_len. The attention term counts the full T x T matrix, the
        convention of PaLM's appendix B and Megatron, even though causal attention needs only half of it."""
        cfg = self.cfg
        matmul_params = self.num_params(active=True) - (0 if cfg.tie_embeddings else self.embed.weight.numel())
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    @torch.no_grad()
    def stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
               seed=None, pad_id=0, compile=False):
        """Generate for a batch of prompts (lists of token ids, any lengths) with a KV cache.
        Yields once per step a list with every row's new token id, or None for rows already finished. A row
        finishes after it samples one of `stop_tokens` (which is yielded) or after max_new_tokens tokens.
        temperature 0 is greedy; top_k keeps the k most likely tokens; top_p the smallest set whose probability
        reaches p (nucleus sampling). `seed` makes sampling reproducible. compile: the prompt is read eagerly, every
        later token by the compiled decode_step; the first call of each new shape pays a compilation."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
        device = self.embed.weight.device
        B, longest = len(prompts), max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"({self.cfg.max_seq_len})")
        # left-pad to one length: every row then writes the same cache slot at each step. RoPE depends only on
        # relative positions, so a row's absolute shift by its padding changes nothing it computes.
        cache_len = longest + max_new_tokens
        if compile:  # a power of two: a handful of cache shapes, so a handful of compilations, serve every request
            cache_len = min(self.cfg.max_seq_len, max(256, 1 << (cache_len - 1).bit_length()))
        cache = KVCache(self.cfg, B, cache_len, device, self.embed.weight.dtype)
        idx = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            idx[row, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            cache.key_valid[row, : longest - len(p)] = False
            cache.padded |= len(p) < longest
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if compile and step > 0:
                cache.step_pos = torch.tensor([cache.pos], device=device)
                logits, cache.pos = self.compiled_step()(idx, cache), cache.pos + 1
            else:
                logits, _ = self(idx, cache=cache)
            next_token = sample(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B,)
            yield [None if done else tok for tok, done in zip(next_token.tolist(), finished.tolist())]
            finished |= torch.isin(next_token, stop)
            if finished.all():
                return
            idx = next_token[:, None]

    def generate(self, prompts, max_new_tokens, stop_tokens=(), **sampling):
        """Like `stream`, collected: one list of new token ids per prompt, the stop token excluded."""
        out = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, stop_tokens=stop_tokens, **sampling):
            for row, tok in enumerate(step):
                if tok is not None and tok not in stop_tokens:
                    out[row].append(tok)
        return out


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # 0 means off, as in HF and vLLM
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p; the most likely token always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen weight W plus a trainable
# low-rank update, y = W x + (alpha / r) B A x. docs/recipe.md "SFT": LoRA instead of full fine-tuning to iterate
# faster. Shared by sft.py and dpo.py, which also runs with the adapters off as its reference model.

class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base
        # A random, B zero: B A = 0, so training starts from exactly the base model (Hu et al. section 4.1). A as
        # nn.Linear's own init (Kaiming uniform), as their reference code (loralib) does
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        # alpha / r: with Adam, changing r then needs no new learning rate (their section 4.1)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale
        return y


def add_lora(model, rank, alpha, dropout=0.0, targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")):
    """Wrap the nn.Linear layers named in `targets` in LoRALinear and freeze everything else: only the adapters
    require grad. (An MoE's experts are stacked weights, not nn.Linear, and are left alone.) Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"add_lora: no nn.Linear named any of {targets} in the model")
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight, W + (alpha / r) B A, and put the plain nn.Linear back: the model then has
    exactly the base model's names and shapes, which every checkpoint loader expects. Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = (child.lora_b.float() @ child.lora_a.float()) * child.scale
                child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextmanager
def lora_disabled(model):
    """Run the base model without its adapters (DPO's reference model: no second copy in memory)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
