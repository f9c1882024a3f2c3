"""
Our numpy MinHash + LSH (textfilters.py) against datasketch on the same documents: speed and the pairs each merges.

    pip install datasketch        # for this benchmark only; the project never imports it
    python benchmarks/minhash_vs_datasketch.py [--pairs=2000] [--units=400]

The corpus is planted pairs (English words and Japanese characters, as in tests/test_textfilters.py): a document and
a copy with a random share of its units replaced, so the true shingle Jaccard of each pair is known. Both libraries
get the same shingles (our 64-bit 5-gram hashes; datasketch receives them as 8-byte strings) and the same LSH shape
(14 bands x 8 rows, FineWeb's). Reported: seconds for signatures and for LSH clustering, and per Jaccard bucket the
share of pairs each merged, against 1-(1-s^r)^b.
"""

import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dedup  # noqa: E402

try:
    from datasketch import MinHash, MinHashLSH
except ImportError:
    sys.exit("this benchmark compares against datasketch: pip install datasketch")

pairs, n_units, bands, rows = 2000, 400, 14, 8
for arg in sys.argv[1:]:  # --pairs=N --units=N
    key, _, value = arg[2:].partition("=")
    if key not in ("pairs", "units"):
        sys.exit(f"unknown option {arg}: use --pairs=N --units=N")
    pairs, n_units = (int(value), n_units) if key == "pairs" else (pairs, int(value))

rng = random.Random(0)
KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 300)]


def unit(lang):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) if lang == "en" else rng.choice(KANA)


texts, jaccard = [], []
for i in range(pairs):
    lang = "en" if i % 2 == 0 else "ja"
    a = [unit(lang) for _ in range(n_units)]
    p = rng.choice([rng.uniform(0, 0.015), rng.uniform(0.015, 0.06), rng.uniform(0.06, 0.5)])
    b = [unit(lang) if rng.random() < p else x for x in a]
    sep = " " if lang == "en" else ""
    texts += [sep.join(a), sep.join(b)]

t0 = time.perf_counter()
shingles = [dedup.shingles(t) for t in texts]
t_shingle = time.perf_counter() - t0
jaccard = np.array([len(np.intersect1d(x, y)) / len(np.union1d(x, y)) for x, y in zip(shingles[0::2], shingles[1::2])])

# ours: signatures for all documents at once, band hashes, union-find
t0 = time.perf_counter()
sigs = dedup.minhash(shingles, bands * rows)
t_ours_sig = time.perf_counter() - t0
t0 = time.perf_counter()
labels = dedup.duplicate_clusters(dedup.lsh_band_hashes(sigs, bands, rows))
t_ours_lsh = time.perf_counter() - t0
ours = labels[0::2] == labels[1::2]

# datasketch: one MinHash per document (update_batch is its fast path), MinHashLSH insert + query, union-find
t0 = time.perf_counter()
mhs = []
for s in shingles:
    m = MinHash(num_perm=bands * rows, seed=1)
    m.update_batch([x.tobytes() for x in s])
    mhs.append(m)
t_ds_sig = time.perf_counter() - t0
t0 = time.perf_counter()
lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
a, b = [], []
for i, m in enumerate(mhs):
    for j in lsh.query(m):
        a.append(i)
        b.append(j)
    lsh.insert(i, m)
ds_labels = dedup.union_find(len(mhs), np.array(a, np.int64), np.array(b, np.int64))
t_ds_lsh = time.perf_counter() - t0
theirs = ds_labels[0::2] == ds_labels[1::2]

print(f"{len(texts):,} documents of {n_units} units ({pairs} planted pairs, half English, half Japanese); "
      f"shingling (shared): {t_shingle:.2f}s")
print(f"signatures: ours {t_ours_sig:.2f}s, datasketch {t_ds_sig:.2f}s -> {t_ds_sig / t_ours_sig:.1f}x")
print(f"LSH + clusters: ours {t_ours_lsh:.3f}s, datasketch {t_ds_lsh:.3f}s -> {t_ds_lsh / t_ours_lsh:.1f}x")
total_ours, total_ds = t_ours_sig + t_ours_lsh, t_ds_sig + t_ds_lsh
print(f"total: ours {total_ours:.2f}s, datasketch {total_ds:.2f}s -> {total_ds / total_ours:.1f}x faster")
print("Jaccard bucket   pairs  ours   datasketch  1-(1-s^r)^b")
for lo in np.arange(0, 1.0, 0.1):
    inside = (jaccard >= lo) & ((jaccard < lo + 0.1) if lo < 0.85 else (jaccard <= 1))
    if inside.any():
        expected = (1 - (1 - jaccard[inside] ** rows) ** bands).mean()
        print(f"  [{lo:.1f}, {lo + 0.1:.1f})  {inside.sum():6d}  {ours[inside].mean():.3f}  "
              f"{theirs[inside].mean():.3f}       {expected:.3f}")
high, low = jaccard >= 0.85, jaccard <= 0.4
print(f"recall at Jaccard >= 0.85: ours {ours[high].mean():.3f}, datasketch {theirs[high].mean():.3f} "
      f"({high.sum()} pairs); merged at <= 0.4: ours {ours[low].mean():.4f}, datasketch {theirs[low].mean():.4f}")
print(f"same decision on {np.mean(ours == theirs):.1%} of pairs; documents merged across pairs: "
      f"ours {pairs * 2 - len(np.unique(labels)) - ours.sum()}, datasketch "
      f"{pairs * 2 - len(np.unique(ds_labels)) - theirs.sum()}")
