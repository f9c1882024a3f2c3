"""
Deduplication, in memory bounded by design: exact and near-duplicate documents (MinHash + LSH, joined by a vectorized
union-find), lines repeated across documents (counted exactly, spilled to disk by hash partition), and Tanuki's
knowledge-frequency probe, which counts near-duplicate copies once. prepare_data.py runs it over the corpus and
synth.py over generated samples (docs/design.md "Layout").

    exact_hash(text) / shingles(text)             # exact dedup key; the n-gram set MinHash works on
    minhash(shingle_sets) / lsh_band_hashes(sigs) / duplicate_clusters(bands)   # fuzzy dedup: one per cluster
    union_find(n, a, b)                           # connected components over numpy edge arrays
    repeated_hashes(hash_arrays, min_docs, dir)   # the line hashes in >= min_docs documents: exact, bounded memory
    terms_cooccur / knowledge_frequency(texts, terms, window)   # Tanuki's probe: documents and distinct copies
Every function is deterministic: no Python hash() (salted per process), numpy generators with explicit seeds.
"""

import hashlib
import os
import re
import shutil

import numpy as np

from textfilters import _P, _mix64, ngram_hashes, units  # the same n-gram hashing as the repetition filters


# -----------------------------------------------------------------------------
# MinHash + LSH (Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3), numpy-vectorized.
# Defaults from FineWeb: 5-grams (word 5-grams there; Swallow uses character 5-grams for Japanese), 14 bands x 8
# rows = 112 permutations, a pair merged with probability 1-(1-s^8)^14: 50% at s ~0.72.

def exact_hash(text):
    """Hash of the text with case and whitespace runs normalized: exact duplicates up to formatting."""
    key = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def shingles(text, n=5, u=None):
    """The unique n-gram hashes of a text (character n-grams in Japanese, word n-grams elsewhere)."""
    return np.unique(ngram_hashes((u or units(text))[0], n))


def minhash(shingle_sets, num_perm=112, seed=0, chunk=1 << 14):
    """MinHash signatures, (len(shingle_sets), num_perm) uint32. Permutation i is the multiply-shift hash
    (a_i * x + b_i) >> 32 mod 2^64 with odd a_i, over already-mixed 64-bit shingle hashes; the minimum per document
    and permutation comes from np.minimum.reduceat over the concatenated shingles, `chunk` shingles at a time.
    Layout and chunk are measured: (num_perm, shingles) with 16k shingles (14 MB, cache-sized) runs ~20x faster than
    (shingles, num_perm) with 256k on the same data (benchmarks/minhash_vs_datasketch.py).
    A document without shingles gets all-ones (it matches only other empty documents)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    sigs = np.full((len(shingle_sets), num_perm), 0xFFFFFFFF, np.uint32)
    i = 0
    while i < len(shingle_sets):
        j, size = i, 0  # take documents while their shingles fit in the chunk (at least one document)
        while j < len(shingle_sets) and (j == i or size + len(shingle_sets[j]) <= chunk):
            size, j = size + len(shingle_sets[j]), j + 1
        sizes = np.array([len(x) for x in shingle_sets[i:j]])
        nonempty = np.nonzero(sizes)[0]
        if len(nonempty):
            x = np.concatenate([shingle_sets[i + k] for k in nonempty])
            values = np.multiply.outer(a, x)  # (num_perm, S), mod 2^64: x -> a*x + b is a bijection for odd a
            values += b[:, None]
            starts = np.concatenate([[0], np.cumsum(sizes[nonempty])[:-1]])
            # the minimum first, then the top 32 bits: v >> 32 is monotonic, so min(v >> 32) == min(v) >> 32,
            # and the shift runs over (num_perm, docs) instead of (num_perm, shingles)
            sigs[i + nonempty] = (np.minimum.reduceat(values, starts, axis=1) >> np.uint64(32)).T
        i = j
    return sigs


def lsh_band_hashes(sigs, bands=14, rows=8):
    """(n_docs, bands) uint64: one hash per band of `rows` signature values; equal band hash = candidate pair.
    This is all the fuzzy-dedup index keeps per document: 8 bytes x bands (112 bytes with FineWeb's 14 bands)."""
    assert sigs.shape[1] >= bands * rows, f"{sigs.shape[1]} permutations < {bands} bands x {rows} rows"
    s = sigs[:, :bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    h = np.zeros((len(sigs), bands), np.uint64)
    for r in range(rows):
        h = h * _P + s[:, :, r]
    return _mix64(h)


def union_find(n, a, b):
    """Connected components of n nodes and edges (a[i], b[i]) as numpy arrays: returns each node's label, the
    smallest node id of its component. Min-label hooking with pointer jumping (Shiloach-Vishkin style), vectorized:
    a handful of numpy rounds, not a Python loop per edge (the test checks it against the textbook version and on a
    10,000-node chain)."""
    label = np.arange(n)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while True:
        old = label.copy()
        m = np.minimum(label[a], label[b])
        for side in (a, b):
            np.minimum.at(label, old[side], m)  # hook the current root of each endpoint to the smaller label
            np.minimum.at(label, side, m)
        while True:  # pointer jumping: every node points at its root
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, old):
            return label


def duplicate_clusters(band_hashes, sigs=None, threshold=0.0):
    """Cluster label per document from LSH bands (documents sharing any band are joined; transitively, through
    union-find). Keep the documents whose label equals their own index: the first of each cluster.
    With `sigs` and a threshold > 0, a candidate pair is joined only when the share of equal MinHash values (the
    Jaccard estimate) reaches the threshold: the S-curve's tail below it is cut (`sigs` may be a np.memmap)."""
    a, b = [], []
    for band in band_hashes.T:
        order = np.argsort(band, kind="stable")
        same = band[order[1:]] == band[order[:-1]]
        a.append(order[:-1][same])
        b.append(order[1:][same])
    a, b = np.concatenate(a or [[]]).astype(np.int64), np.concatenate(b or [[]]).astype(np.int64)
    if threshold > 0 and len(a):
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)  # a pair sharing several bands is checked once
        a, b = pairs[:, 0], pairs[:, 1]
        close = np.concatenate([(sigs[a[i:i + 65536]] == sigs[b[i:i + 65536]]).mean(1) >= threshold
                                for i in range(0, len(a), 65536)])
        a, b = a[close], b[close]
    return union_find(len(band_hashes), a, b)


# -----------------------------------------------------------------------------
# lines repeated across the documents of a source (site chrome), for textfilters.clean_lines

def repeated_hashes(hash_arrays, min_docs, spill_dir, memory_bytes=256 << 20, _shift=56):
    """The sorted unique hashes that occur at least min_docs times in `hash_arrays` (an iterable of uint64 arrays:
    each document's line_hashes, so a count is a number of documents), counted exactly in bounded memory. Hashes
    are spilled to 256 files by their top 8 bits as they come (buffered); then each file is counted alone with
    np.unique, and one larger than memory_bytes is split again by the next 8 bits. Memory: one partition, whatever the
    corpus; disk: 8 bytes per line of the corpus, freed as each partition is counted. A count-min sketch of fixed
    size saturated instead: 2 x 2^22 counters flagged 27% of never-repeated lines at 14M documents x 30 lines and
    99.99% at 20M. Returns (hashes, lines counted)."""
    shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed run left: ours alone, and stale
    os.makedirs(spill_dir)
    paths = [os.path.join(spill_dir, f"part_{_shift}_{p:03d}.u64") for p in range(256)]
    files = [open(p, "wb") for p in paths]
    buffer, buffered, total = [], 0, 0

    def flush():
        h = np.concatenate(buffer) if buffer else np.zeros(0, np.uint64)
        part = ((h >> np.uint64(_shift)) & np.uint64(255)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(257))
        for p in np.flatnonzero(np.diff(bounds)):
            h[order[bounds[p] : bounds[p + 1]]].tofile(files[p])
        buffer.clear()

    for h in hash_arrays:
        buffer.append(np.asarray(h, np.uint64))
        buffered += len(h)
        total += len(h)
        if buffered * 32 >= memory_bytes:  # the buffer, its sort order and the partition ids fit the budget
            flush()
            buffered = 0
    flush()
    for f in files:
        f.close()
    found, piece = [], max(8, memory_bytes // 32 * 8)  # bytes read at a time when a partition is split again
    for path in paths:
        size = os.path.getsize(path)
        if size and _shift == 0:  # every higher bit was split on: the file is one hash, size // 8 times
            found.append(np.fromfile(path, np.uint64, count=1)[: size // 8 >= min_docs])
        elif size > memory_bytes:  # too large to count in memory: split it by the next 8 bits
            pieces = (np.fromfile(path, np.uint64, count=piece // 8, offset=o) for o in range(0, size, piece))
            found.append(repeated_hashes(pieces, min_docs, path + ".d", memory_bytes, _shift - 8)[0])
        elif size:
            values, counts = np.unique(np.fromfile(path, np.uint64), return_counts=True)
            found.append(values[counts >= min_docs])
        os.remove(path)
    os.rmdir(spill_dir)
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.uint64), total


# -----------------------------------------------------------------------------
# knowledge-frequency probe (docs/recipe.md "Evaluation": a character's hobby appeared in 14-151 documents, most of
# them copies of one text, which explained the model's hallucinations about it)

def terms_cooccur(text, terms, window=200):
    """True when every term occurs within `window` characters of an occurrence of the first term."""
    low = text.lower()
    terms = [t.lower() for t in terms]
    for m in re.finditer(re.escape(terms[0]), low):
        lo, hi = max(0, m.start() - window), m.end() + window
        if all(t in low[lo:hi] for t in terms[1:]):
            return True
    return False


def knowledge_frequency(texts, terms, window=200, bands=14, rows=8):
    """How many of the texts mention all terms together, and how many distinct texts that is once near-duplicate
    copies (MinHash/LSH clusters, FineWeb's settings) count once."""
    hits = [t for t in texts if terms_cooccur(t, terms, window)]
    if not hits:
        return {"terms": list(terms), "documents": 0, "distinct": 0}
    labels = duplicate_clusters(lsh_band_hashes(minhash([shingles(t) for t in hits], bands * rows), bands, rows))
    return {"terms": list(terms), "documents": len(hits), "distinct": int(len(np.unique(labels)))}
