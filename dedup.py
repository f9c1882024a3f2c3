"""
Deduplication, in memory bounded by design: exact and near-duplicate documents (MinHash + LSH, joined by a vectorized
union-find), lines repeated across documents (counted exactly), and Tanuki's knowledge-frequency probe, which counts
near-duplicate copies once. Grouping rows by key spills to disk past a budget, and the same code runs over many ranks:
keys go to the rank that owns their hash (all-to-all over gloo) and components are found across ranks.
prepare_data.py runs it over the corpus and synth.py over generated samples (docs/design.md "Layout").

    exact_hash(text) / shingles(text)             # exact dedup key; the n-gram set MinHash works on
    minhash(shingle_sets) / lsh_band_hashes(sigs) / duplicate_clusters(bands)   # fuzzy dedup, in memory
    union_find(n, a, b)                           # connected components over numpy edge arrays
    spill_groups(chunks, cols, dir) / star_edges(groups)    # rows grouped by key in bounded memory
    repeated_hashes(hash_arrays, min_docs, dir)   # the line hashes in >= min_docs documents: exact, bounded memory
    exchanged / route / lookup / all_gather_rows / gather_json   # moving rows between ranks (identity on one)
    exact_copies(rows, owner) / near_copies(rows, owner) / components(a, b, owner)   # dedup across ranks
    terms_cooccur / knowledge_frequency(texts, terms, window)   # Tanuki's probe: documents and distinct copies
Every function is deterministic: no Python hash() (salted per process), numpy generators with explicit seeds.
"""

import hashlib
import json
import math
import os
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

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
# grouping rows by key in bounded memory: what counting repeated lines, exact dedup and LSH buckets all are

def spill_groups(chunks, cols, spill_dir, memory_bytes=256 << 20, _shift=56, _bits=8):
    """Group rows by key in bounded memory. chunks: (n, cols) uint64 arrays, the key in column 0. Rows are spilled to
    256 files by their key's top 8 bits as they come (buffered); then each file is read alone and yielded sorted by
    key, then by the other columns in order; a file too large to sort in the budget is split again by the next bits,
    as many as its size needs (up to 8: creating files is slow on many file systems). Yields (rows, head): head is None when the rows hold whole groups; a key with more rows than fit (every bit split on:
    one key copied millions of times) comes in pieces, each with head = the smallest row of the whole group.
    Memory: about memory_bytes, whatever the input; disk: the rows once, freed file by file. A count-min sketch of
    fixed size saturated instead: 2 x 2^22 counters flagged 27% of never-repeated lines at 14M documents x 30 lines
    and 99.99% at 20M."""
    shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed run left: ours alone, and stale
    os.makedirs(spill_dir)
    paths = [os.path.join(spill_dir, f"part_{_shift}_{p:03d}.u64") for p in range(1 << _bits)]
    files = [open(p, "wb") for p in paths]
    buffer, buffered = [], 0

    def flush():
        rows = np.concatenate(buffer) if buffer else np.zeros((0, cols), np.uint64)
        part = ((rows[:, 0] >> np.uint64(_shift)) & np.uint64((1 << _bits) - 1)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange((1 << _bits) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            rows[order[bounds[p] : bounds[p + 1]]].tofile(files[p])
        buffer.clear()

    for rows in chunks:
        rows = np.asarray(rows, np.uint64).reshape(-1, cols)
        for lo in range(0, len(rows), max(1, memory_bytes // 16 // (8 * cols))):
            buffer.append(rows[lo:lo + max(1, memory_bytes // 16 // (8 * cols))])
            buffered += buffer[-1].nbytes
            if buffered * 8 >= memory_bytes:  # the buffer, its copy, sort order and partition ids fit the budget
                flush()
                buffered = 0
    flush()
    for f in files:
        f.close()
    largest = memory_bytes // (2 + 2 * cols)  # sorting and grouping a file take ~2 + 2 x cols times its size
    row_bytes, piece = 8 * cols, max(8 * cols, largest // (8 * cols) * (8 * cols))
    for path in paths:
        size = os.path.getsize(path)
        pieces = (np.fromfile(path, np.uint64, count=piece // 8, offset=o).reshape(-1, cols)
                  for o in range(0, size, piece))
        if size and _shift == 0:  # every bit of the key split on: one key; its smallest row first, then the pieces
            head = _sorted(np.concatenate([_sorted(p)[:1] for p in pieces]))[0]
            yield from ((p, head) for p in (np.fromfile(path, np.uint64, count=piece // 8, offset=o).reshape(-1, cols)
                                            for o in range(0, size, piece)))
        elif size > largest:  # too large to sort and group in memory: split it by the next bits
            bits = min(_shift, 8, max(1, math.ceil(math.log2(size / largest)) + 1))
            yield from spill_groups(pieces, cols, path + ".d", memory_bytes, _shift - bits, bits)
        elif size:
            yield _sorted(np.fromfile(path, np.uint64).reshape(size // row_bytes, cols)), None
        os.remove(path)
    os.rmdir(spill_dir)


def _sorted(rows):
    return rows[np.lexsort(rows.T[::-1])] if rows.shape[1] > 1 else np.sort(rows, axis=0)


def star_edges(groups):
    """For (key, value) rows grouped by spill_groups: an edge from the smallest value of each key to every other
    value of that key, as (heads, others) arrays. Exact dedup drops the others; LSH joins the ends (a star connects a
    bucket as a chain would)."""
    heads, others = [], []
    for rows, head in groups:
        if head is not None:
            rest = rows[rows[:, 1] != head[1], 1]
            heads.append(np.full(len(rest), head[1], np.uint64))
            others.append(rest)
            continue
        first = np.concatenate([[True], rows[1:, 0] != rows[:-1, 0]])
        group_head = rows[np.flatnonzero(first)[np.cumsum(first) - 1], 1]
        heads.append(group_head[~first])
        others.append(rows[~first, 1])
    return (np.concatenate(heads) if heads else np.zeros(0, np.uint64),
            np.concatenate(others) if others else np.zeros(0, np.uint64))


def repeated_hashes(hash_arrays, min_docs, spill_dir, memory_bytes=256 << 20):
    """The sorted unique hashes that occur at least min_docs times in `hash_arrays` (an iterable of uint64 arrays:
    each document's line_hashes, so a count is a number of documents), counted exactly in bounded memory
    (spill_groups). Returns (hashes, lines counted)."""
    total, found, single = [0], [], {}

    def counted():
        for h in hash_arrays:
            total[0] += len(h)
            yield np.asarray(h, np.uint64).reshape(-1, 1)
    for rows, head in spill_groups(counted(), 1, spill_dir, memory_bytes):
        if head is not None:  # one hash, in pieces
            single[int(head[0])] = single.get(int(head[0]), 0) + len(rows)
            continue
        values, counts = np.unique(rows[:, 0], return_counts=True)
        found.append(values[counts >= min_docs])
    found.append(np.array([h for h, n in single.items() if n >= min_docs], np.uint64))
    return np.sort(np.concatenate(found)), total[0]


# -----------------------------------------------------------------------------
# across ranks (prepare_data.py under torchrun): rows are routed to the rank that owns their key by all-to-all over
# the process group (gloo), so each rank groups only its share of the keys. Without a process group every exchange
# is the identity and the same code runs on one process: 1 and N ranks compute the same thing.

def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def key_owner(keys):
    """The rank owning a hash key: its top 32 bits scaled to the world size (hashes are uniform, so are shares)."""
    return ((np.asarray(keys, np.uint64) >> np.uint64(32)) * np.uint64(world()[1]) >> np.uint64(32)).astype(np.int64)


def _all_to_all(rows, send_counts, recv_counts):
    if world()[1] == 1:
        return rows.copy()
    cols = rows.shape[1]
    out = torch.empty(int(recv_counts.sum()) * cols, dtype=torch.int64)
    dist.all_to_all_single(out, torch.from_numpy(np.ascontiguousarray(rows).view(np.int64).reshape(-1)),
                           (recv_counts * cols).tolist(), (send_counts * cols).tolist())
    return out.numpy().view(np.uint64).reshape(-1, cols)


def route(dest):
    """A fixed routing: row i of this rank goes to rank dest[i]. Returns (send, back): send(rows) delivers rows
    ((len(dest), c) uint64) and returns what this rank receives, grouped by sender in rank order, each sender's rows
    in their order; back(answers) returns rows aligned with what send received to their senders, aligned with dest.
    Collective: every rank calls route, and then send / back, the same number of times."""
    n_ranks = world()[1]
    dest = np.asarray(dest, np.int64)
    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=n_ranks).astype(np.int64)
    recv_counts = send_counts.copy()
    if n_ranks > 1:
        counts = torch.from_numpy(send_counts.copy())
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts)
        recv_counts = received.numpy()

    def send(rows):
        return _all_to_all(np.asarray(rows, np.uint64)[order], send_counts, recv_counts)

    def back(answers):
        answers = np.asarray(answers, np.uint64)
        out = np.empty((len(dest), answers.shape[1]), np.uint64)
        out[order] = _all_to_all(answers, recv_counts, send_counts)
        return out
    return send, back


def any_rank(flag):
    """True on every rank when `flag` is true on one."""
    if world()[1] == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def exchanged(arrays, cols, rows_per_round=1 << 22):
    """Round by round, each rank sends about rows_per_round of its rows (arrays of (n, cols) uint64 rows, the key in
    column 0, gathered into rounds; none once it has run out) to the owners of their keys (key_owner), and yields
    what it receives, until every rank has run out."""
    def rounds():
        buffer, n = [], 0
        for rows in arrays:
            buffer.append(np.asarray(rows, np.uint64).reshape(-1, cols))
            n += len(buffer[-1])
            if n >= rows_per_round:
                yield np.concatenate(buffer)
                buffer, n = [], 0
        if buffer:
            yield np.concatenate(buffer)
    chunks = rounds()
    while any_rank((rows := next(chunks, None)) is not None):
        rows = np.zeros((0, cols), np.uint64) if rows is None else rows
        yield route(key_owner(rows[:, 0]))[0](rows)


def all_gather_rows(rows):
    """Every rank's rows ((n, c) uint64), on every rank, in rank order."""
    rows = np.asarray(rows, np.uint64)
    n_ranks = world()[1]
    return route(np.repeat(np.arange(n_ranks), len(rows)))[0](np.tile(rows, (n_ranks, 1)))


def barrier():
    if world()[1] > 1:
        dist.barrier()


def gather_json(obj):
    """Every rank's JSON-able obj, in rank order, on every rank: the ranks exchange bytes, never pickles."""
    if world()[1] == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = all_gather_rows(np.array([[len(data)]], np.uint64))[:, 0].astype(int)
    padded = np.zeros((1, (max(sizes) + 7) // 8 * 8), np.uint8)
    padded[0, :len(data)] = data
    got = all_gather_rows(padded.view(np.uint64)).view(np.uint8)
    return [json.loads(got[r, :n].tobytes()) for r, n in enumerate(sizes)]


def lookup(keys, owner, answer):
    """Rows held by the ranks that own `keys`: owner(keys) -> their ranks; answer(keys) -> (len(keys), c) uint64
    rows, run on each owning rank for the keys it receives (it must answer an empty array too). Collective."""
    send, back = route(owner(keys))
    return back(answer(send(np.asarray(keys, np.uint64).reshape(-1, 1))[:, 0]))


def components(a, b, owner):
    """Connected components of a graph whose edges (a[i], b[i]) (uint64 node ids) are spread over the ranks, each
    node owned by the rank owner(ids) says. Returns (nodes, labels): the nodes this rank owns that are in some edge,
    sorted, and the smallest id in each one's component. Min-label propagation along the edges, with pointer jumping
    (a node takes its label's label): labels only fall and stay inside their component, and each round is one
    all-to-all of the edge ends, so memory is the edges a rank holds. Also returns the number of rounds."""
    ends = np.concatenate([a, b]).astype(np.uint64)
    send, back = route(owner(ends))
    asked = send(ends.reshape(-1, 1))[:, 0]  # the ends of every rank's edges that this rank owns
    nodes = np.unique(asked)
    at = np.searchsorted(nodes, asked)
    label, rounds = nodes.copy(), 0
    while True:
        rounds += 1
        end_labels = back(label[at].reshape(-1, 1))[:, 0]
        lowest = np.minimum(end_labels[: len(a)], end_labels[len(a):])
        new = label.copy()
        np.minimum.at(new, at, send(np.concatenate([lowest, lowest]).reshape(-1, 1))[:, 0])
        new = np.minimum(new, lookup(new, owner, lambda q: new[np.searchsorted(nodes, q)].reshape(-1, 1))[:, 0])
        if not any_rank((new != label).any()):
            return nodes, label, rounds
        label = new


def exact_copies(rows, owner, spill_dir, memory_bytes=256 << 20, rows_per_round=1 << 22):
    """Exact dedup across ranks. rows: (key, id) arrays of this rank's documents (the key an exact hash; ids sort in
    corpus order, and owner(ids) names their rank). Each key's rows meet at the key's rank, which keeps the smallest
    id; returns the ids of the other copies that this rank owns. Collective."""
    copies = star_edges(spill_groups(exchanged(rows, 2, rows_per_round), 2, spill_dir, memory_bytes))[1]
    return route(owner(copies))[0](copies.reshape(-1, 1))[:, 0]


def near_copies(rows, owner, spill_dir, memory_bytes=256 << 20, rows_per_round=1 << 22, similar=None):
    """Fuzzy dedup across ranks. rows: (band key, id) arrays, a row per LSH band of each document. Documents sharing
    a key are joined (with `similar(a, b)`, only the pairs it accepts), the connected components are found over all
    ranks, and all but the smallest id of each are near copies: returns those this rank owns, and the rounds the
    components took. Collective."""
    a, b = star_edges(spill_groups(exchanged(rows, 2, rows_per_round), 2, spill_dir, memory_bytes))
    if len(a):  # a pair sharing several bands is one edge
        a, b = np.unique(np.stack([a, b], axis=1), axis=0).T
    if similar is not None:
        keep = similar(a, b)
        a, b = a[keep], b[keep]
    nodes, labels, rounds = components(a, b, owner)
    return nodes[labels != nodes], rounds


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
