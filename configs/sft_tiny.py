# SFT of the tiny model on the offline synthetic tasks (synth.py), on a CPU in about a minute:
#   python sft.py configs/sft_tiny.py            (after train.py and synth.py of speedrun.sh)
#   python sft.py configs/sft_tiny.py --lora_rank=8 --learning_rate=3e-3   # LoRA instead
# Full fine-tuning: at this size LoRA's few adapter weights leave the answers nearly flat (held-out loss 4.07 after
# 2 epochs of LoRA rank 8 vs 1.62 after 4 epochs of full tuning), and DPO's samples at temperature 1 turn to noise.
init_from = "out/train/model"   # or out/train_moe/model (slower: the tiny MoE runs ~8 s a step on 2 CPU cores)
data = "out/synth/chat.jsonl"
out_dir = "out/sft"
seq_len = 256                   # the tiny model's max_seq_len
batch_size = 16
micro_batch_size = 8
epochs = 3
lora_rank = 0
learning_rate = 1e-3            # a third of the tiny pretraining LR (configs/tiny.py)
warmup_iters = 5
dtype = "float32"               # CPU: no fast bf16 (configs/tiny.py)
log_interval = 5
eval_interval = 50
checkpoint_interval = 100
