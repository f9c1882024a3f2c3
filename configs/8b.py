# Tanuki-8B: a Llama-3-8B shape with a 65,536 vocab, untied embeddings: 7.52B parameters
# (docs/recipe.md "Models" and docs/recipe.md "Released training scripts").
#   torchrun --nnodes=16 --nproc_per_node=8 ... train.py configs/8b.py
# model
vocab_size = 65536       # 2**16: token ids fit uint16 shards
d_model = 4096
n_layer = 32
n_head = 32
n_kv_head = 8
ffn_hidden = 14336
max_seq_len = 4096       # 4k context
rope_theta = 10000.0     # from scratch; 500k from the start was a suspect of the failed 38B run ("What failed")
norm_eps = 1e-5
tie_embeddings = False
init_std = 0.008         # Tanuki's Megatron script
# optimization
learning_rate = 1.5e-4   # the LR stress test found spikes at 3e-4 and settled on 1.5e-4 ("Pretraining")
min_lr = 1.5e-6          # decays 100x, as their public example's 1e-4 -> 1e-6
warmup_iters = 1000      # their public example
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.8          # their Megatron script
# batch: 1024 sequences of 4096 tokens = 4M tokens per step (the 8x8B log used 3072 x 4096; the dense run's
# batch is not in the write-ups, 4M is the Llama-2/3 figure at this size)
seq_len = 4096
tokens_per_step = 1024 * 4096
# sequences per GPU per forward; the rest comes from gradient accumulation. The three settings below are what
# `python simulate.py configs/8b.py --gpus=128` (train.py's step traced at 16 nodes x 8 H100) picked; the
# layout of the config as first written (micro-batch 1, plain FSDP over all 128, full recomputation) peaked at
# 4.7 GiB but moved 473 GB over InfiniBand per GPU per step: 9.5 s of communication for 2.1 s of compute, an MFU
# ceiling of 17.5% even with perfect overlap
micro_batch_size = 2     # 4 micro-batches per step: half the gathers of micro-batch 1 (4, with selective
                         # recomputation, peaks at 75.9 GiB: too close to 80)
hsdp_replicas = -1       # shard within each node over NVLink, replicate across nodes: the all-gathers and
                         # reduce-scatters never cross InfiniBand, only one float32 gradient all-reduce does
grad_sync = "last_all_reduce"  # ... and only after the last micro-batch: 0.60 s of communication per step
dtype = "bfloat16"       # bf16, no FP8: the failed 38B run used FP8 ("What failed")
max_iters = 300_000      # x 4M tokens = 1.26T: Tanuki-8B saw ~1.3T tokens in total ("Models")
# 16 nodes x 8 H100 at ~60B tokens/day ("Pretraining") is ~15k steps a day, ~6 s a step: a checkpoint every
# 500 steps is ~50 minutes of work at risk, and writes in the background (async) so the GPUs do not wait
checkpoint_interval = 500
async_checkpoint = True
keep_checkpoints = 3
log_interval = 10
eval_interval = 1000
eval_iters = 8
activation_checkpoint = "none"  # fits: 57.5 GiB traced peak (selective: 45.9 GiB, for recomputing the
                                # elementwise ops); compute 1.65 s at peak vs 0.60 s of communication: an MFU
                                # ceiling of 73% without overlap, compute bound with it
compile = True
pg_timeout_minutes = 30  # the 8x8B's checkpoint saves to slow storage needed 30, not 10 ("What failed")
