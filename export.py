"""
Export to Hugging Face: a dense model as a Llama checkpoint, a Mixture of Experts as a Mixtral one, for transformers
and vLLM (`python serve.py --init_from=DIR --export_hf=OUT`). model.py follows Hugging Face's conventions, so the
export is a renaming of the weights, not a conversion; tests/test_export.py and tests/test_upcycle.py load the result
in transformers and compare logits. bench.py exports the same way to time transformers' generate on our weights.
"""

import json
import os

from checkpoint import write_safetensors
from tokenizer import save_hf_tokenizer, special_id


# Our weight name -> Hugging Face Llama's ({i}: the layer). A renaming only: model.py follows HF's conventions.
# RoPE rotates split halves (x_i, x_{i + head_dim/2}) as HF's rotate_half does, so q and k need no permutation
# (Meta's original checkpoints pair neighbours; that is the permutation HF's convert_llama_weights_to_hf.py applies).
# nn.Linear stores (out, in) on both sides, and RMSNorm's weight is a plain scale on both sides.
LLAMA_NAMES = {
    "embed.weight":                 "model.embed_tokens.weight",
    "blocks.{i}.attn_norm.weight":  "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.wq.weight":    "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight":    "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight":    "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight":    "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.ffn_norm.weight":   "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.ffn.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.ffn.w_up.weight":   "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.ffn.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight":                  "model.norm.weight",
    "lm_head.weight":               "lm_head.weight",
}
# Mixtral's names for the MoE FFN ({e}: the expert): our stacked (E, out, in) weights become one matrix per expert,
# the layout transformers (which fuses them on load) and vLLM read. w1 = gate, w3 = up, w2 = down.
MIXTRAL_NAMES = {
    "blocks.{i}.ffn.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blocks.{i}.ffn.w_gate":        "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "blocks.{i}.ffn.w_down":        "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "blocks.{i}.ffn.w_up":          "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}


def hf_tensors(model):
    """Our weights under Hugging Face's names, as views (no copies). A KeyError for a weight the tables do not
    know: an export must not drop a tensor silently."""
    tensors = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        layer = parts[1] if parts[0] == "blocks" else None
        key = f"blocks.{{i}}.{'.'.join(parts[2:])}" if layer is not None else name
        if key.endswith("ffn.expert_bias"):
            if t.any():
                raise ValueError("this MoE routes with an auxiliary-loss-free selection bias, which Mixtral cannot "
                                 "express: its exported router would pick other experts")
            continue
        if key in ("blocks.{i}.ffn.w_gate", "blocks.{i}.ffn.w_up", "blocks.{i}.ffn.w_down"):
            for e in range(t.size(0)):
                tensors[MIXTRAL_NAMES[key].format(i=layer, e=e)] = t[e]
        else:
            tensors[{**LLAMA_NAMES, **MIXTRAL_NAMES}[key].format(i=layer)] = t
    if model.cfg.tie_embeddings:
        del tensors["lm_head.weight"]  # HF re-ties it to embed_tokens from tie_word_embeddings
    return tensors


def hf_config(model, dtype=None, bos=None, eos=None, pad=None):
    """The config.json of the export (a dict): transformers' Llama, or Mixtral for an MoE. The special token ids are
    the tokenizer's (save_hf); without them (bench.py's timing of transformers on our weights) they are null."""
    cfg = model.cfg
    if cfg.n_experts and (cfg.moe_router == "softmax_topk" or cfg.moe_layer_interval != 1 or cfg.moe_capacity_factor):
        # Mixtral: every layer an MoE, dropless, gates = softmax over the top-k logits (= renormalized top-k)
        raise ValueError(f"Mixtral cannot express this MoE (moe_router={cfg.moe_router}, moe_layer_interval="
                         f"{cfg.moe_layer_interval}, moe_capacity_factor={cfg.moe_capacity_factor})")
    dtype_name = str(dtype or model.embed.weight.dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        # transformers 5 reads rope_parameters; transformers 4 and older vLLM releases read rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "use_cache": True,
        "dtype": dtype_name, "torch_dtype": dtype_name,  # transformers 5's name, and the one before it
    }
    if cfg.n_experts:
        config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None,
                       "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.moe_top_k,
                       "router_aux_loss_coef": cfg.moe_aux_loss_coef, "output_router_logits": False})
    return config


def save_hf(model, enc, out_dir, dtype=None):
    """Write `model` and `enc` as a Hugging Face Llama (dense) or Mixtral (MoE) checkpoint in out_dir: config.json,
    model.safetensors, generation_config.json and the tokenizer. dtype None keeps the model's dtype."""
    bos, eos, pad, end = (special_id(enc, t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"))
    config = hf_config(model, dtype, bos, eos, pad)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_tensors(model), dtype)
    # a chat turn ends with <|end|>, a document with <|eos|>: generate() and vLLM stop at either, as serve.py does
    generation = {"bos_token_id": bos, "eos_token_id": [end, eos], "pad_token_id": pad}
    for filename, obj in [("config.json", config), ("generation_config.json", generation)]:
        with open(os.path.join(out_dir, filename), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    save_hf_tokenizer(enc, out_dir, model_max_length=model.cfg.max_seq_len)
