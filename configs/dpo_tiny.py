# DPO of the tiny SFT model on its own answers to the offline synthetic tasks, judged by the verifier, on a CPU in
# about a minute:   python dpo.py configs/dpo_tiny.py            (after sft.py of speedrun.sh)
init_from = "out/sft/model"
prompts = "out/synth/chat.jsonl"   # the SFT prompts again: Tanuki sampled DPO answers for in-domain prompts
out_dir = "out/dpo"
samples_per_prompt = 4             # docs/recipe.md "DPO": 4 answers per prompt at temperature 1.0
max_new_tokens = 16                # the answers are a number, a label or a day name
sample_batch_size = 160
seq_len = 256                      # the tiny model's max_seq_len
batch_size = 32
micro_batch_size = 16
epochs = 4
# LoRA against the policy with its adapters off as the reference (Tanuki's self-sampled loop: LoRA DPO against the
# starting model). beta 0.1 as their 8B; the LR is the tiny SFT's (configs/sft_tiny.py), not their 2e-7 for 8B
lora_rank = 8
lora_alpha = 16.0
reference = "adapters_off"
beta = 0.1
dpop_lambda = 50.0                 # DPO-Positive (Tanuki's 8x8B used the term; 50 is the DPOP paper's): without it the
                                   # tiny model lowers its chosen answers' likelihood too, and its greedy answers get worse
learning_rate = 3e-3
warmup_iters = 5
dtype = "float32"                  # CPU: no fast bf16 (configs/tiny.py)
log_interval = 5
eval_interval = 25
checkpoint_interval = 50
