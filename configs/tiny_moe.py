# The tiny model upcycled to 8 experts, top-2: the MoE stage of speedrun.sh on a 2-core CPU.
#   python upcycle.py --init_from=out/train --out_dir=out/upcycle
#   python train.py configs/tiny_moe.py --init_from=out/upcycle
# model: configs/tiny.py's shape, each FFN now 8 experts
vocab_size = 4096
d_model = 128
n_layer = 2
n_head = 4
n_kv_head = 1
ffn_hidden = 448
max_seq_len = 256
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
init_std = 0.02
n_experts = 8
moe_top_k = 2
moe_layer_interval = 1
moe_router = "topk_softmax"
moe_aux_loss_coef = 0.01
moe_z_loss_coef = 0.0
# optimization: continued training at a third of the dense peak LR, as Tanuki's 5e-5 after the 8B's 1.5e-4
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
seq_len = 256
tokens_per_step = 16 * 256
micro_batch_size = 16
dtype = "float32"
