"""
Talk to a checkpoint in the terminal, or export it to Hugging Face format for transformers and vLLM.

    python serve.py --init_from=out/sft                             # chat in the terminal (the default mode)
    python serve.py --init_from=out/sft --system_prompt="あなたは親切なアシスタントです。"
    python serve.py --init_from=out/sft --temperature=0             # greedy
    printf 'こんにちは\\n/quit\\n' | python serve.py --init_from=out/sft  # scripted: one reply per input line
    python serve.py --init_from=out/sft --export_hf=out/hf          # Llama format, then exit
    python serve.py --init_from=out/sft --export_hf=out/hf --dtype=bfloat16

Chat: each line you type is a user message; the reply streams to stdout, everything else goes to stderr, so
`serve.py < questions.txt > answers.txt` keeps only the answers. `/reset` forgets the conversation (the system
prompt stays), `/quit` or end of input (Ctrl-D) exits, Ctrl-C stops a reply that runs on.
"""

import codecs
import json
import os
import sys

import torch

from common import load_checkpoint, load_config, setup_distributed, write_safetensors
from tokenizer import render_chat, save_hf_tokenizer, special_id

# -----------------------------------------------------------------------------
init_from = "out/sft"   # a checkpoint directory written by common.save_checkpoint (any stage)
export_hf = ""          # a directory: write the checkpoint there in Hugging Face Llama format and exit
device = "auto"         # cuda if available, else cpu
dtype = "auto"          # chat: bfloat16 on CUDA, float32 on CPU; export: "auto" keeps the checkpoint's dtype
seed = 1337
system_prompt = ""      # the first message of every conversation when not empty
max_new_tokens = 512
# common chat sampling settings, not the recipe's (TANUKI.md gives none for chat); temperature 0 is greedy
temperature = 0.7
top_k = 0               # 0: off
top_p = 0.9             # 1.0: off
# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # right after the defaults, while every name defined is a setting; a test that imports serve keeps its argv
    load_config(globals())

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# export to Hugging Face: Llama for a dense model, Mixtral for a Mixture of Experts

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


def save_hf(model, enc, out_dir, dtype=None):
    """Write `model` and `enc` as a Hugging Face Llama (dense) or Mixtral (MoE) checkpoint in out_dir: config.json,
    model.safetensors, generation_config.json and the tokenizer. dtype None keeps the model's dtype."""
    cfg = model.cfg
    if cfg.n_experts and (cfg.moe_router == "softmax_topk" or cfg.moe_layer_interval != 1 or cfg.moe_capacity_factor):
        # Mixtral: every layer an MoE, dropless, gates = softmax over the top-k logits (= renormalized top-k)
        raise ValueError(f"Mixtral cannot express this MoE (moe_router={cfg.moe_router}, moe_layer_interval="
                         f"{cfg.moe_layer_interval}, moe_capacity_factor={cfg.moe_capacity_factor})")
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_tensors(model), dtype)
    bos, eos, pad, end = (special_id(enc, t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"))
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
    # a chat turn ends with <|end|>, a document with <|eos|>: generate() and vLLM stop at either, as serve.py does
    generation = {"bos_token_id": bos, "eos_token_id": [end, eos], "pad_token_id": pad}
    for filename, obj in [("config.json", config), ("generation_config.json", generation)]:
        with open(os.path.join(out_dir, filename), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    save_hf_tokenizer(enc, out_dir, model_max_length=cfg.max_seq_len)


# -----------------------------------------------------------------------------
# chat

def fit_context(enc, messages, budget):
    """Render the conversation for generation, dropping the oldest user/assistant exchange (never the system
    prompt) until it fits in `budget` tokens. Returns (ids, messages kept); ids is None when even the last
    message alone does not fit."""
    first = int(messages[0]["role"] == "system")
    while True:
        ids, _ = render_chat(enc, messages, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, messages
        if len(messages) - first <= 1:
            return None, messages
        messages = messages[:first] + messages[first + 2:]


def stream_reply(model, enc, prompt, max_new_tokens, out=sys.stdout, **sampling):
    """Generate the assistant's reply to `prompt` (token ids), printing it to `out` as it comes. Returns its text."""
    stops = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
    # a token can end inside a character (a kanji is 3 bytes of UTF-8): the incremental decoder keeps the
    # incomplete tail and hands back only whole characters
    utf8, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        for (token,) in model.stream([prompt], max_new_tokens, stop_tokens=stops, **sampling):
            if token in stops:
                break
            piece = utf8.decode(enc.decode_single_token_bytes(token))
            out.write(piece)
            out.flush()
            text += piece
    except KeyboardInterrupt:  # Ctrl-C ends a reply that runs on, not the program; what was said stays
        pass
    tail = utf8.decode(b"", final=True)  # a character cut off by max_new_tokens shows as U+FFFD
    out.write(tail + "\n")
    out.flush()
    return text + tail


if __name__ == "__main__":
    if export_hf:
        # renaming and writing needs no accelerator: load on the CPU, where the host memory is
        model, enc, meta = load_checkpoint(init_from, device="cpu")
        save_hf(model, enc, export_hf, dtype=None if dtype == "auto" else DTYPES[dtype])
        print(f"exported {init_from} ({meta['stage']}, {model.num_params():,} parameters) to {export_hf}",
              file=sys.stderr)
        sys.exit(0)

    _, _, _, device = setup_distributed(device)  # one process; resolves device="auto" as every stage does
    if dtype == "auto":  # CPUs without bf16 matrix units run bf16 slower than float32
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch.manual_seed(seed)  # once: replies differ from each other, the whole session is reproducible
    model, enc, meta = load_checkpoint(init_from, device=device, dtype=DTYPES[dtype])
    model.eval()
    # model.stream refuses prompt + max_new_tokens > max_seq_len: the rendered conversation gets the rest
    budget = model.cfg.max_seq_len - max_new_tokens
    if budget < 8:
        sys.exit(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}")
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(system)
    print(f"{init_from}: {meta['stage']} checkpoint, {model.num_params():,} parameters, {device}, {dtype}. "
          f"/reset clears the conversation, /quit exits.", file=sys.stderr)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() then edits the line and keeps a history: arrow keys, Ctrl-R)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave without a traceback
            print(file=sys.stderr)
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        prompt, kept = fit_context(enc, messages + [{"role": "user", "content": line}], budget)
        if prompt is None:  # the history stays as it was
            print(f"(message too long: it does not fit in {budget} tokens with the system prompt)", file=sys.stderr)
            continue
        if len(kept) < len(messages) + 1:
            print(f"(context full: forgot the {(len(messages) + 1 - len(kept)) // 2} oldest exchange(s))",
                  file=sys.stderr)
        messages = kept
        reply = stream_reply(model, enc, prompt, max_new_tokens, **sampling)
        messages.append({"role": "assistant", "content": reply})
