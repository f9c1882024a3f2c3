"""Fixtures and helpers several test files share."""

import contextlib
import os
import subprocess
import sys
import time

# before anything imports torch (its OpenMP reads this when it loads), and inherited by every stage a test starts:
# threads that wait passively, so the suite neither suffers from a busy neighbour nor makes one suffer (speedrun.sh)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def enc():
    """A 512-id tokenizer trained on the Japanese, English and code samples in tests/data: small enough for tiny
    models, real enough to tokenize the chat template, synth.py's tasks and Hugging Face round trips."""
    texts = [open(os.path.join(ROOT, "tests", "data", name), encoding="utf-8").read()
             for name in ("ja_sample.txt", "en_sample.txt", "code_sample.txt")]
    return train_tokenizer(iter(texts), vocab_size=512)


@contextlib.contextmanager
def running(args, **popen_kwargs):
    """A child process (cwd: the repo) that is stopped when the block ends, pass or fail: SIGTERM, then SIGKILL if it
    has not exited 30 s later. A test stops what it starts."""
    proc = subprocess.Popen(args, cwd=ROOT, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # not SIGINT: a process started in the background (CI) may inherit SIGINT ignored
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_text(path, text, proc):
    """The contents of the file `path` once `text` is in it: what a child writes when it is ready, however long a busy
    machine makes that take. Fails at once if the child exits first; only a child hung for 10 minutes fails on the
    clock."""
    deadline = time.monotonic() + 600
    while True:
        content = open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""
        if text in content:
            return content
        assert proc.poll() is None, f"exited with {proc.returncode} before writing {text!r}:\n{content[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after 10 minutes:\n{content[-3000:]}"
        time.sleep(0.05)


@contextlib.contextmanager
def serve_py(checkpoint, log_path, *args):
    """serve.py on a free port of 127.0.0.1, as a user starts it: yields (process, base url) once it is listening
    (it writes the address it bound to stderr), and stops it when the block ends."""
    with open(log_path, "w") as log, running([sys.executable, "serve.py", f"--init_from={checkpoint}", "--port=0",
                                              *args], stdout=subprocess.DEVNULL, stderr=log) as proc:
        address = wait_for_text(log_path, "http://", proc).split("http://")[1].split("/v1")[0]
        yield proc, f"http://{address}/v1"
