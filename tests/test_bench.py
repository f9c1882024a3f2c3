"""bench.py beyond the kernels: the planner's counts are model.py's and the measurement mode runs on a CPU (the
traced simulation of a training step: tests/test_simulate.py). (The kernel AOT table and the CPU kernel rows: tests/test_kernels.py.)"""

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # the defaults and functions only: the modes run under __main__
import common
from model import Transformer


def run_bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOTANUKI_KERNELS")}
    result = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def meta_model(*config_files):
    scope = dict(vars(bench))  # bench.py's defaults, overridden by the files as the command line would
    common.load_config(scope, [os.path.join(ROOT, name) for name in config_files])
    with torch.device("meta"):
        return Transformer(common.model_config_from(scope))


def test_the_planner_counts_what_model_py_counts_and_prints_tanukis_figures():
    for files, total, active, hybrid in ((["configs/8b.py"], "7.516", "7.516", ""),
                                         (["configs/8b.py", "configs/8x8b.py"], "46.98", "13.15", "16")):
        out = run_bench(*files, "--plan", "--gpus=128", *([f"--hsdp_replicas={hybrid}"] if hybrid else []))
        model = meta_model(*files)
        counts = re.search(r"([\d,]+) parameters \(([\d.]+)B\), ([\d,]+) active per token \(([\d.]+)B\)", out)
        assert int(counts[1].replace(",", "")) == model.num_params()
        assert int(counts[3].replace(",", "")) == model.num_params(active=True)
        assert (counts[2], counts[4]) == (total, active)  # docs/recipe.md "Models": 7.52B; 46.98B, 13.15B active
        assert "8B ~60B, 8x8B ~30B tokens/day on 128 H100" in out
        assert "Chinchilla-optimal: 20 tokens/parameter" in out and "tokens/day" in out and "days" in out
        # Tanuki's own throughput at our FLOPs per token: about the quarter of the peak their log shows
        implied = float(re.search(r"FLOPs per token is MFU ([\d.]+)%", out)[1])
        assert 20 < implied < 30
        assert "simulate.py" in out  # memory per GPU: the traced simulation (tests/test_simulate.py)


def test_measurement_on_cpu_reports_positive_throughput():
    # the compiled decode step is left out (a minute of compiling; tests/test_model.py checks it); transformers is
    # there (requirements-dev.txt): its generate on our exported weights must give our tokens
    out = run_bench("--measure", "--steps=1", "--seq_len=32", "--micro_batch_size=2", "--gen_tokens=4",
                    "--decode_compiled=False")
    assert out.startswith("measured on CPU")  # labelled: no GPU figure is claimed
    train = re.search(r"torch\s+([\d,]+)\s+([\d.]+)\s+-\s+([\d.]+) GiB max RSS", out)
    assert train and int(train[1].replace(",", "")) > 0 and float(train[3]) > 0
    for path in ("expert_loop", "expert_sorted"):
        assert int(re.search(path + r"\s+([\d,]+) tokens/s", out)[1].replace(",", "")) > 0
    for batch in (1, 8):
        row = re.search(rf"\n\s+{batch}\s+([\d,]+)\s+-\s+([\d,]+)\s+([\d.]+)x\s+-\n", out)
        assert row and int(row[1].replace(",", "")) > 0 and int(row[2].replace(",", "")) > 0, out[-800:]
