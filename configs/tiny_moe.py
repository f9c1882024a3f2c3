# The tiny model upcycled to 8 experts, top-2, on top of configs/tiny.py: the MoE stage of speedrun.sh.
#   python upcycle.py --init_from=out/train/model --out_dir=out/upcycle
#   python train.py configs/tiny.py configs/tiny_moe.py --init_from=out/upcycle --out_dir=out/train_moe
# With init_from the model's shape comes from the checkpoint; these values matter for a from-scratch tiny MoE.
n_experts = 8
moe_top_k = 2
moe_router = "topk_softmax"
# continued training at a third of the dense peak LR, as Tanuki's 5e-5 after the 8B's 1.5e-4
# (docs/recipe.md "Upcycling 8B to 8x8B")
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
max_iters = 150
checkpoint_interval = 50
eval_interval = 50
