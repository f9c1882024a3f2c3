"""Run train.py with faults injected at exact points, for tests/test_train.py. Usage, like train.py's:
    FAULTS='{"nan": [3]}' python tests/faults.py configs/tiny.py --data_dir=...       (or under torchrun)
FAULTS is a JSON object; counts are 0-based training forward calls (one per micro-batch) of this process:
    nan:      [calls] whose loss is multiplied by NaN (a corrupt batch)
    spike:    [calls] whose loss is multiplied by 30 (a loss and grad-norm spike)
    kill:     call at which this process SIGKILLs itself before the forward (kill -9 mid-run)
    term:     call at which this process sends itself SIGTERM (a preemption notice) and goes on
    kill_when_committed: [call, directory]: at that call, wait until the checkpoint directory exists (an async save
              being committed in the background), then SIGKILL: kill -9 right after an async checkpoint landed
    kill_in_save: n, SIGKILL after the n-th (1-based) checkpoint's shards are written but before it is committed
    record:   a file that gets one line per training forward: a hash of its input token ids
    slow_rank: the rank whose optimizer steps take 250 ms longer (a GPU shared with a leftover process)
    nan_weights: n, the n-th (0-based) optimizer step leaves NaN in a weight (an update gone wrong)
"""

import hashlib
import json
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch
import torch.distributed.checkpoint as dcp

import model

faults = json.loads(os.environ.get("FAULTS", "{}"))
calls = {"forward": 0, "save": 0, "step": 0}
forward = model.Transformer.forward


def faulty_forward(self, idx, targets=None, *args, **kwargs):
    if not self.training or targets is None:
        return forward(self, idx, targets, *args, **kwargs)
    n = calls["forward"]
    calls["forward"] += 1
    if faults.get("kill") == n:
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.get("kill_when_committed", [None])[0] == n:
        # wait on the event itself, not on a clock: the commit needs no further step, save or exit to happen
        committed, deadline = faults["kill_when_committed"][1], time.monotonic() + 300
        while not os.path.isdir(committed):
            if time.monotonic() > deadline:
                sys.exit(f"faults.py: {committed} was never committed while training went on")
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.get("term") == n:
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM does before a preemption
    if "record" in faults:
        with open(faults["record"], "a") as f:
            f.write(hashlib.sha1(idx.cpu().numpy().tobytes()).hexdigest() + "\n")
    logits, loss = forward(self, idx, targets, *args, **kwargs)
    if n in faults.get("nan", []):
        loss = loss * float("nan")
    if n in faults.get("spike", []):
        loss = loss * 30
    return logits, loss


save = dcp.save


def faulty_save(*args, **kwargs):
    result = save(*args, **kwargs)
    calls["save"] += 1
    if faults.get("kill_in_save") == calls["save"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


adamw_step = torch.optim.AdamW.step


def slow_step(self, *args, **kwargs):
    if faults.get("slow_rank") == int(os.environ.get("RANK", "0")):
        time.sleep(0.25)  # far above any load-induced jitter of the other rank, so the test is not flaky
    result = adamw_step(self, *args, **kwargs)
    if faults.get("nan_weights") == calls["step"]:
        with torch.no_grad():  # this rank's shard of the first weight (an FSDP parameter is a DTensor)
            weight = self.param_groups[0]["params"][0]
            (weight.to_local() if hasattr(weight, "to_local") else weight).fill_(float("nan"))
    calls["step"] += 1
    return result


model.Transformer.forward = faulty_forward
torch.optim.AdamW.step = slow_step
dcp.save = faulty_save
sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
