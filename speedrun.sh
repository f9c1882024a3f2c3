#!/usr/bin/env bash
# The whole Tanuki recipe on the tiny CPU default, stage by stage (nanochat's speedrun.sh is the model).
#   bash speedrun.sh                 # writes everything under out/
# Each stage is a script you can also run alone with the same arguments. The script stops at the first failure
# and says which stage failed. Stages join this list as they land (README, "The recipe, file by file").
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}

stage() {  # stage NAME COMMAND...: run one stage, timed, with a clear message if it fails
    local name=$1; shift
    echo; echo "=== $name: $*"
    local t0=$SECONDS
    if ! "$@"; then
        echo "!!! stage '$name' failed (command: $*). Fix it and re-run speedrun.sh." >&2
        exit 1
    fi
    echo "=== $name done in $((SECONDS - t0))s"
}

# 0. install the requirements if any is missing (torch 2.13.0 is the CPU build on a machine without a GPU)
if ! $PYTHON -c "import torch, numpy, tiktoken, tqdm, rustbpe, safetensors" 2>/dev/null; then
    stage install $PYTHON -m pip install -r requirements.txt
fi

# a fresh run each time: the tiny run's stage outputs are cleared (metrics.jsonl would otherwise keep growing)
rm -rf "$OUT/data" "$OUT/train" "$OUT/upcycle" "$OUT/train_moe" "$OUT/synth" "$OUT/sft" "$OUT/synth_eval" "$OUT/eval"

# 1. data: the built-in corpus (stdlib docstrings + code, template Japanese) -> cleaned, deduplicated uint16 shards,
#    with a 4096-id BPE trained on a sample of the cleaned text (prepare_data.py's defaults are the tiny run)
stage data $PYTHON prepare_data.py --out_dir="$OUT/data"

# 2. dense pretraining of the tiny model (configs/tiny.py: 300 steps)
stage pretrain $PYTHON train.py configs/tiny.py --data_dir="$OUT/data" --out_dir="$OUT/train"

# 3. upcycling: every FFN becomes 8 experts (the dense FFN + 0.1% noise), top-2; then MoE training goes on
stage upcycle $PYTHON upcycle.py --init_from="$OUT/train/model" --out_dir="$OUT/upcycle"
stage moe_train $PYTHON train.py configs/tiny.py configs/tiny_moe.py --init_from="$OUT/upcycle" \
    --data_dir="$OUT/data" --out_dir="$OUT/train_moe"

# 4. synthetic data: the offline teacher (verifiable ja/en tasks with known answers) -> chat JSONL for SFT and DPO
stage synth $PYTHON synth.py --out_dir="$OUT/synth"

# 5. supervised fine-tuning: LoRA on the offline synthetic conversations, adapters merged into out/sft/model.
#    From the dense model: the tiny MoE runs ~8 s a step on 2 CPU cores, the dense one a fraction of that.
stage sft $PYTHON sft.py configs/sft_tiny.py --init_from="$OUT/train/model" --data="$OUT/synth/chat.jsonl" \
    --out_dir="$OUT/sft"

# 6. evaluation of the SFT model on held-out verifiable tasks (another seed of the offline teacher): val loss per
#    source, multiple choice strict vs lenient vs log-likelihood, pass rates per task kind -> out/eval/eval.json
stage heldout $PYTHON synth.py --seed=1 --num_samples=300 --out_dir="$OUT/synth_eval"
stage eval $PYTHON eval.py --init_from="$OUT/sft/model" --data_dir="$OUT/data" \
    --tasks_file="$OUT/synth_eval/chat.jsonl" --out_dir="$OUT/eval"

echo; echo "speedrun finished: outputs in $OUT/"
