# SFT of the tiny model on the offline synthetic tasks (synth.py), LoRA, on a CPU in about a minute:
#   python sft.py configs/sft_tiny.py            (after train.py and synth.py of speedrun.sh)
init_from = "out/train/model"   # or out/train_moe/model: LoRA then adapts attention only (experts are stacked weights)
data = "out/synth/chat.jsonl"
out_dir = "out/sft"
seq_len = 256                   # the tiny model's max_seq_len
batch_size = 16
micro_batch_size = 8
epochs = 2
lora_rank = 8
lora_alpha = 16.0
learning_rate = 3e-3            # the tiny pretraining LR (configs/tiny.py): a 2-layer model is far more tolerant
warmup_iters = 5
dtype = "float32"               # CPU: no fast bf16 (configs/tiny.py)
log_interval = 5
eval_interval = 50
checkpoint_interval = 100
