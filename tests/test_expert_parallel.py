"""Claims about moe.expert_parallel_ffn (issue 18): with the experts split over 2 gloo ranks, each rank's output and
the gradients of its tokens, gates and local experts equal moe.expert_loop with all experts on both ranks' tokens as
one batch, with uneven token counts, a rank that sends its peer nothing, a rank that receives no rows, and a
capacity counted over the group (rows dropped on both ranks; every token on one expert). The comparisons run in
tests/ep_worker.py, one per rank."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expert_parallel_equals_expert_loop():
    # one thread per process: the test machine has 2 cores for everything
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "tests", "ep_worker.py")], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
