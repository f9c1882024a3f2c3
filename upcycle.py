"""
Stage 3: grow the dense model into a Mixture of Experts (docs/recipe.md "Upcycling 8B to 8x8B").

    python upcycle.py --init_from=out/train/model --out_dir=out/upcycle                     # tiny: 8 experts, top-2
    python upcycle.py --init_from=ckpt/8b --out_dir=ckpt/8x8b --n_experts=8 --moe_top_k=2 --noise_ratio=0.001

Tanuki upcycled its 8B after ~1T tokens, when the dense loss had flattened: the dense model stays a safe fallback
and a second deliverable, and the MoE starts from all the compute already spent. Every expert starts as a copy of
the dense FFN plus Gaussian noise of 0.1% of each weight's standard deviation (larger noise visibly broke the
outputs); embeddings, attention and norms are copied as they are; the router starts small and random. With
noise 0 the MoE computes exactly the dense function (tests/test_upcycle.py checks it), so MoE training
continues from the dense loss rather than from scratch.

Memory: the MoE is built in the dense checkpoint's dtype and filled one dense tensor at a time (safetensors reads
single tensors from the file), so the 8B -> 8x8B needs the MoE's weights plus one layer, never both models.
"""

import json
import math
import os
import time

import torch
from tqdm import tqdm

from checkpoint import save_checkpoint
from common import load_config, set_cpu_threads
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
init_from = "out/train/model"  # a dense checkpoint directory (config.json + model.safetensors + tokenizer)
out_dir = "out/upcycle"
n_experts = 8                # Tanuki-8x8B: 8 experts ...
moe_top_k = 2                # ... 2 active per token: 47B total, 13B active (docs/recipe.md "Models")
moe_layer_interval = 1       # every layer's FFN becomes an MoE (2: every second layer, as some GShard models)
moe_router = "topk_softmax"  # see moe.py; Mixtral's mode, which the Hugging Face export can express
moe_aux_loss_coef = 0.01     # Switch Transformer's alpha; Tanuki logged the balance loss at ~1.0 (balanced)
moe_z_loss_coef = 0.0        # Tanuki trained without router z-loss (it made the grad norm erratic)
moe_capacity_factor = 0.0    # 0: dropless
moe_bias_update_rate = 0.0   # > 0: DeepSeek-V3's auxiliary-loss-free balancing (their gamma: 0.001)
noise_ratio = 0.001          # Tanuki: 0.1% of each weight's std; larger noise visibly broke the outputs
# The router's weights: small enough that the gates start near uniform (at d_model 4096 the normalized hidden state
# has norm ~64, so logits have std ~0.06 and the softmax is within a few % of 1/E), but not zero: an all-zero router
# gives every token the same scores, so top-k ties break the same way and every token goes to the same k experts.
router_init_std = 0.001
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(globals())

from safetensors import safe_open  # noqa: E402  (after the config: a typo fails before any import cost)

set_cpu_threads()  # as every torch stage: one thread per core this process may use (common.py)
t0 = time.time()
with open(os.path.join(init_from, "config.json"), encoding="utf-8") as f:
    dense_meta = json.load(f)
dense_cfg = ModelConfig(**dense_meta["model"])
if dense_cfg.n_experts:
    raise SystemExit(f"{init_from} is already a Mixture of Experts ({dense_cfg.n_experts} experts)")
enc = load_tokenizer(init_from)
moe_cfg = ModelConfig(**{**dense_meta["model"], "n_experts": n_experts, "moe_top_k": moe_top_k,
                         "moe_layer_interval": moe_layer_interval, "moe_router": moe_router,
                         "moe_aux_loss_coef": moe_aux_loss_coef, "moe_z_loss_coef": moe_z_loss_coef,
                         "moe_capacity_factor": moe_capacity_factor, "moe_bias_update_rate": moe_bias_update_rate})

# For softmax-then-top-k without renormalization the k gates of a near-uniform router sum to about k/E, not 1:
# the experts' output would shrink E/k times. Scale it back up (Megatron's and NVIDIA's upcycling recipe, He et al.
# 2024), spread as sqrt(E/k) on each of w_up and w_down: SwiGLU is linear in both, and neither matrix ends up far
# from the scale the optimizer tuned it at.
output_scale = n_experts / moe_top_k if moe_router == "softmax_topk" else 1.0
spread = math.sqrt(output_scale)

path = os.path.join(init_from, "model.safetensors")
generator = torch.Generator().manual_seed(seed)
with safe_open(path, framework="pt") as dense:
    dtype = dense.get_tensor("embed.weight").dtype
    with torch.device("meta"):
        model = Transformer(moe_cfg)
    model.to_empty(device="cpu").to(dtype)
    model.init_buffers()
    state = model.state_dict()  # views of the MoE's tensors: filled in place below
    if moe_cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight

    def copy(name):
        state[name].copy_(dense.get_tensor(name))

    for name in ("embed.weight", "norm.weight") + (() if moe_cfg.tie_embeddings else ("lm_head.weight",)):
        copy(name)
    n_moe = 0
    for i in tqdm(range(moe_cfg.n_layer), desc="upcycling layers"):
        prefix = f"blocks.{i}."
        for name in [k for k in state if k.startswith(prefix) and ".ffn." not in k]:
            copy(name)  # attention and both norms, unchanged
        if f"{prefix}ffn.router.weight" not in state:  # this layer stays dense
            for w in ("w_gate", "w_up", "w_down"):
                copy(f"{prefix}ffn.{w}.weight")
            continue
        n_moe += 1
        for w, scale in (("w_gate", 1.0), ("w_up", spread), ("w_down", spread)):
            weight = dense.get_tensor(f"{prefix}ffn.{w}.weight").float()
            noise_std = noise_ratio * weight.std().item()
            for e in range(n_experts):  # each expert its own noise: identical experts would get identical gradients
                noisy = weight + noise_std * torch.randn(weight.shape, generator=generator)
                state[f"{prefix}ffn.{w}"][e].copy_(noisy * scale)
        router = torch.randn(state[f"{prefix}ffn.router.weight"].shape, generator=generator) * router_init_std
        state[f"{prefix}ffn.router.weight"].copy_(router)
        state[f"{prefix}ffn.expert_bias"].zero_()

provenance = {"upcycled_from": os.path.abspath(init_from), "noise_ratio": noise_ratio, "seed": seed,
              "router_init_std": router_init_std, "output_scale": output_scale, "config": config}
save_checkpoint(out_dir, model, enc, stage="upcycle", extra=provenance)
print(f"upcycled {init_from} -> {out_dir}: {n_moe} of {moe_cfg.n_layer} layers with {n_experts} experts, "
      f"top-{moe_top_k} ({moe_router}); {model.num_params() / 1e6:,.2f}M parameters, "
      f"{model.num_params(active=True) / 1e6:,.2f}M active, in {time.time() - t0:.1f}s")
