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

# 1. tokenizer: byte-level BPE with the Japanese-aware split, trained on text every machine has (the Python
#    standard library's sources: English prose in docstrings and code). prepare_data.py (issue 3) will train it
#    on a sample of the cleaned corpus instead.
STDLIB=$($PYTHON -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
stage tokenizer $PYTHON tokenizer.py --input="$STDLIB" --vocab_size=4096 --out_dir="$OUT/tokenizer"

echo; echo "speedrun finished: outputs in $OUT/"
