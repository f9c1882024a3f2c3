# A 2-layer model that trains on a 2-core CPU in minutes: the default of speedrun.sh and of the tests.
# The shape keeps Tanuki-8B's proportions where they matter for the code paths: grouped-query attention
# (4 query heads per K/V head), SwiGLU at 3.5 x d_model, untied embeddings.
# model
vocab_size = 4096
d_model = 128
n_layer = 2
n_head = 4
n_kv_head = 1
ffn_hidden = 448         # 3.5 x d_model, as 14336 / 4096
max_seq_len = 256
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
init_std = 0.02
# optimization: a tiny model tolerates a far larger LR than the 8B's 1.5e-4
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
seq_len = 256
tokens_per_step = 16 * 256
micro_batch_size = 16
dtype = "float32"        # CPUs have no fast bf16 matmul worth the precision loss at this size
max_iters = 300          # 1.2M tokens: about two minutes on 2 CPU cores
# checkpoints, logs, validation
checkpoint_interval = 100
log_interval = 10
eval_interval = 100
eval_iters = 4
activation_checkpoint = "none"  # recomputation only pays when activations do not fit; they always do here
# stability: a shorter window for a 300-step run
spike_window = 50
