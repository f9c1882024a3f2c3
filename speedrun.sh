#!/usr/bin/env bash
# The whole Tanuki recipe on the tiny CPU default, stage by stage (nanochat's speedrun.sh is the model).
#   bash speedrun.sh                          # writes everything under out/, ending with out/report.md
#   SMOKE=1 OUT=/tmp/smoke bash speedrun.sh   # the same pipeline at a far smaller setting (tests/test_report.py)
# Each stage is a script you can also run alone with the same arguments. The script stops at the first failure
# and says which stage failed.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
# torch's OpenMP (GNU libgomp) spins its threads at every barrier: on 2 cores beside a loop of another job's tests the
# tiny pretraining fell from 14k tok/s to 1.4-2.2k; passive waiting keeps 7.3-8.0k there, at 12-13k idle. libgomp
# reads this when torch loads, so it is set here, before any stage starts; a value of your own wins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

now() { $PYTHON -c "import time; print(time.time())"; }

stage() {  # stage NAME COMMAND...: run one stage, timed, with a clear message if it fails
    local name=$1; shift
    echo; echo "=== $name: $*"
    local t0; t0=$(now)  # not bash 5's EPOCHREALTIME: macOS ships bash 3.2
    if ! "$@"; then
        echo "!!! stage '$name' failed (command: $*). Fix it and re-run speedrun.sh." >&2
        exit 1
    fi
    local seconds; seconds=$($PYTHON -c "print(round($(now) - $t0, 1))")
    echo "{\"stage\": \"$name\", \"seconds\": $seconds}" >> "$OUT/timings.jsonl"  # report.py's time column
    echo "=== $name done in ${seconds}s"
}

# SMOKE=1: small overrides appended to each stage (each key is one the stage has: an unknown key is an error), so
# the whole pipeline, report included, runs in about a minute. Empty otherwise: the tiny run as configured.
# (plain strings, split into words where used: no value holds a space)
SMOKE_DATA="" SMOKE_TRAIN="" SMOKE_MOE="" SMOKE_SYNTH="" SMOKE_SFT="" SMOKE_DPO="" SMOKE_HELDOUT="" SMOKE_EVAL=""
if [ "$SMOKE" = 1 ]; then
    SMOKE_DATA="--max_docs=60 --builtin_ja_docs=300"
    SMOKE_TRAIN="--max_iters=10 --eval_interval=10 --checkpoint_interval=10 --log_interval=5"
    SMOKE_MOE="--max_iters=4 --eval_interval=4 --checkpoint_interval=4 --log_interval=2"
    SMOKE_SYNTH="--num_samples=200"
    # 20 steps: enough for some answers to end before max_new_tokens; DPO needs two answers to the same prompt that
    # score apart to make a pair (ties are dropped, a cut answer is never chosen): 50 pairs here, 111 after 40 steps.
    # Every 3rd prompt held out, so the held-out reward accuracy has pairs too
    SMOKE_SFT="--max_iters=20"
    SMOKE_DPO="--max_prompts=200 --val_every=3 --samples_per_prompt=4 --max_eval_prompts=8 --max_iters=2"
    SMOKE_HELDOUT="--num_samples=60"
    SMOKE_EVAL="--max_tasks=20 --val_windows=4"
fi

# a fresh run each time: the tiny run's stage outputs are cleared (metrics.jsonl would otherwise keep growing)
rm -rf "$OUT/data" "$OUT/train" "$OUT/upcycle" "$OUT/train_moe" "$OUT/synth" "$OUT/sft" "$OUT/dpo" "$OUT/synth_eval" \
    "$OUT/eval" "$OUT/plots" "$OUT/report.md" "$OUT/timings.jsonl"
mkdir -p "$OUT"

# 0. install the requirements if any is missing (torch 2.13.0 is the CPU build on a machine without a GPU), the
#    test suite's too, so that the README's second command (python -m pytest -q tests) runs right after this one
if ! $PYTHON -c "import torch, numpy, tiktoken, tqdm, rustbpe, safetensors, pytest, transformers, matplotlib" \
        2>/dev/null; then
    stage install $PYTHON -m pip install -r requirements.txt -r requirements-dev.txt
fi

# 1. data: the built-in corpus (stdlib docstrings + code, template Japanese) -> cleaned, deduplicated uint16 shards,
#    with a 4096-id BPE trained on a sample of the cleaned text (prepare_data.py's defaults are the tiny run)
stage data $PYTHON prepare_data.py --out_dir="$OUT/data" $SMOKE_DATA

# 2. dense pretraining of the tiny model (configs/tiny.py: 300 steps)
stage pretrain $PYTHON train.py configs/tiny.py --data_dir="$OUT/data" --out_dir="$OUT/train" $SMOKE_TRAIN

# 3. upcycling: every FFN becomes 8 experts (the dense FFN + 0.1% noise), top-2; then MoE training goes on
stage upcycle $PYTHON upcycle.py --init_from="$OUT/train/model" --out_dir="$OUT/upcycle"
stage moe_train $PYTHON train.py configs/tiny.py configs/tiny_moe.py --init_from="$OUT/upcycle" \
    --data_dir="$OUT/data" --out_dir="$OUT/train_moe" $SMOKE_MOE

# 4. synthetic data: the offline teacher (verifiable ja/en tasks with known answers) -> chat JSONL for SFT and DPO
stage synth $PYTHON synth.py --out_dir="$OUT/synth" $SMOKE_SYNTH

# 5. supervised fine-tuning on the offline synthetic conversations (configs/sft_tiny.py: full fine-tuning).
#    From the dense model: the tiny MoE runs ~8 s a step on 2 CPU cores, the dense one a fraction of that.
stage sft $PYTHON sft.py configs/sft_tiny.py --init_from="$OUT/train/model" --data="$OUT/synth/chat.jsonl" \
    --out_dir="$OUT/sft" $SMOKE_SFT

# 6. DPO: the SFT model answers the synthetic prompts, the offline verifier judges, pairs (right, wrong) train it
stage dpo $PYTHON dpo.py configs/dpo_tiny.py --init_from="$OUT/sft/model" --prompts="$OUT/synth/chat.jsonl" \
    --out_dir="$OUT/dpo" $SMOKE_DPO

# 7. evaluation of every model stage on the same held-out verifiable tasks (another seed of the offline teacher):
#    val loss per source, multiple choice strict vs lenient vs log-likelihood, pass rates -> out/eval/<stage>/
stage heldout $PYTHON synth.py --seed=1 --num_samples=300 --out_dir="$OUT/synth_eval" $SMOKE_HELDOUT
for pair in pretrain:train moe_train:train_moe sft:sft dpo:dpo; do
    stage "eval_${pair%%:*}" $PYTHON eval.py --init_from="$OUT/${pair#*:}/model" --data_dir="$OUT/data" \
        --tasks_file="$OUT/synth_eval/chat.jsonl" --out_dir="$OUT/eval/${pair%%:*}" $SMOKE_EVAL
done

# 8. the report: every stage's numbers side by side, and the loss curves (matplotlib, if installed)
stage report $PYTHON report.py --out="$OUT"

echo; echo "speedrun finished: the report is $OUT/report.md (outputs in $OUT/)"
