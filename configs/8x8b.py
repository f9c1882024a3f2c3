# Tanuki-8x8B, on top of configs/8b.py: every FFN becomes 8 SwiGLU experts of 14336, top-2: 46.98B parameters,
# 13.15B active (docs/recipe.md "Models"). Continued training of the upcycled 8B:
#   python upcycle.py --init_from=/ckpt/8b/model --out_dir=/ckpt/8x8b_init
#   torchrun --nnodes=16 --nproc_per_node=8 ... train.py configs/8b.py configs/8x8b.py --init_from=/ckpt/8x8b_init
# With init_from the model's shape comes from the checkpoint (upcycle.py wrote these same values into it); they
# matter here for a from-scratch MoE and for the planner.
n_experts = 8
moe_top_k = 2
moe_layer_interval = 1
moe_router = "topk_softmax"  # the gates sum to 1, so the upcycled MoE starts as the dense function
moe_aux_loss_coef = 0.01     # Switch Transformer's alpha; Tanuki's balance loss stayed ~1.0 (balanced)
moe_z_loss_coef = 0.0        # Tanuki: no router z-loss (with the normalization it made the grad norm erratic)
# optimization: the MoE continued-training values (docs/recipe.md "Upcycling 8B to 8x8B")
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 500
weight_decay = 0.1
# the logged 8x8B run: global batch 3072 sequences of 4096 tokens
tokens_per_step = 3072 * 4096
# ~0.6T tokens after upcycling at ~1T (1.6-1.7T cumulative): 0.6T / 12.6M tokens per step
max_iters = 48_000
# Parallelism, as `python simulate.py configs/8b.py configs/8x8b.py --gpus=128 --simulate_ep=1,2,4,8
# --simulate_micro=12,24` traced it (per GPU per step; routing assumed balanced; ceilings at 989 TFLOP/s, 450 GB/s
# NVLink, 50 GB/s InfiniBand): 47B parameters of float32 weights, gradients and AdamW state are 752 GB, so sharding
# within a node (94 GB per GPU) cannot fit; the 8x8B shards over all 128 GPUs. As plain FSDP every micro-batch
# all-gathers and reduce-scatters the whole model over InfiniBand: micro-batch 1 (as first written) moved 8.9 TB per
# GPU per step, a 4.7% MFU ceiling; 24 (the whole step in one micro-batch) 0.37 TB, 58.5 GiB, 75.4% with overlap /
# 45.0% without. Expert parallelism over a node's 8 GPUs gives each GPU one expert per layer, FSDP-sharded over the
# 16 GPUs that hold the same one: the experts' all-gather falls from 180 to 22.5 GB, InfiniBand from 373 to 57 GB,
# and the all-to-alls (309 GB) stay on NVLink:
#   EP           1      2      4      8     (micro-batch 24)
#   peak GiB     58.5   54.2   53.5   53.2
#   comm s       7.45   4.19   2.55   1.74  (compute 11.05 s)
#   MFU serial   45.0%  54.7%  61.2%  65.1% (overlapped: 75.4%, compute bound, at every EP)
# At micro-batch 12, EP 8 peaks at 30.7 GiB for 59.8%: the fallback if 24 runs out of memory (the trace counts
# tensors only, not the CUDA context, NCCL or the allocator's fragmentation). Tanuki's Megatron run logged ~25%.
hsdp_replicas = 0
grad_sync = "every"
expert_parallel = 8      # one node's GPUs split the 8 experts; tokens cross NVLink only
micro_batch_size = 24    # all 24 sequences per GPU per step in one forward: one gather and one reduce-scatter of
                         # the model per step
activation_checkpoint = "full"  # selective keeps every output of the expert custom op: no smaller than "none"
