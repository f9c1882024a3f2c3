# Tanuki-8x8B: Tanuki-8B's shape with every FFN replaced by 8 SwiGLU experts of 14336, top-2:
# 47.0B parameters, 13.2B active (TANUKI.md "Models"). Continued training of an upcycled checkpoint:
#   python upcycle.py --init_from=ckpt/8b --out_dir=ckpt/8x8b_init
#   torchrun --nnodes=16 --nproc_per_node=8 ... train.py configs/8x8b.py --init_from=ckpt/8x8b_init
# model (upcycle.py writes the same values into the checkpoint it makes)
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
init_std = 0.008
n_experts = 8
moe_top_k = 2
moe_layer_interval = 1
moe_router = "topk_softmax"  # the gates sum to 1, so the upcycled MoE starts as the dense function
moe_aux_loss_coef = 0.01     # Switch Transformer's alpha; Tanuki's balance loss stayed ~1.0 (balanced)
moe_z_loss_coef = 0.0        # Tanuki: no router z-loss (with the normalization it made the grad norm erratic)
# optimization: the MoE continued-training values (TANUKI.md "Pretraining")
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 500
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.8
# the logged 8x8B run: global batch 3072 sequences of 4096 tokens
seq_len = 4096
tokens_per_step = 3072 * 4096
micro_batch_size = 1
dtype = "bfloat16"
