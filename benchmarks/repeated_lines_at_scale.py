"""
The boilerplate-line counter (dedup.repeated_hashes) at the size of a real source, without the text: 20M documents
x 30 never-repeated line hashes, plus 1,000 lines of site chrome found in 200 documents each, through prepare_data.py's
default budget of 256 MB. The count is exact (hash-partitioned spill to disk), so no never-repeated line may be
flagged; a count-min sketch of fixed size flagged 27% of them at 14M documents and 99.99% at 20M.

    python benchmarks/repeated_lines_at_scale.py [--docs=20000000] [--memory_mb=256]

Measured on 2 cores: 600,200,000 lines, 0 never-repeated lines flagged, all 1,000 chrome lines found, 112 s, peak RSS
452 MB (with torch imported by dedup.py), 4.8 GB of spill on disk while it runs.
"""

import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dedup  # noqa: E402

docs, memory_mb = 20_000_000, 256
for arg in sys.argv[1:]:
    key, _, value = arg.removeprefix("--").partition("=")
    if key not in ("docs", "memory_mb"):
        sys.exit(f"unknown option {arg}; valid: --docs, --memory_mb")
    globals()[key] = int(value)

chrome = np.random.default_rng(0).integers(0, 2**64, 1000, dtype=np.uint64)


def documents():  # in blocks of 10,000 documents; every 100th document also carries one chrome line
    rng = np.random.default_rng(1)
    for lo in range(0, docs, 10_000):
        yield rng.integers(0, 2**64, (10_000, 30), dtype=np.uint64).reshape(-1)
        yield chrome[np.arange(lo, lo + 10_000, 100) // 100 % len(chrome)]


t = time.time()
with tempfile.TemporaryDirectory() as spill:
    found, lines = dedup.repeated_hashes(documents(), 100, os.path.join(spill, "s"), memory_mb << 20)
wrong = len(np.setdiff1d(found, chrome))
print(f"{lines:,} lines; chrome lines found {len(np.intersect1d(found, chrome))} of {len(chrome)} (each in "
      f"{docs // 100 // len(chrome)} documents); never-repeated lines flagged {wrong} of {docs * 30:,}; "
      f"{time.time() - t:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MB")
