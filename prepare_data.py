"""
Stage 1: raw text -> clean, deduplicated, tokenized shards. Web cleaning steps remove ~90% of CommonCrawl
(docs/recipe.md "General guidance"); dirty Japanese web text fed late made Tanuki degenerate (docs/recipe.md "Data"),
so this stage decides what the model learns.

    python prepare_data.py                                   # the built-in corpus (nothing downloaded), vocab 4096
    python prepare_data.py --input=data/fineweb,data/llmjp --out_dir=out/web --vocab_size=65536
    python prepare_data.py configs/my_mix.py --tokenizer=out/web   # sources = {"name": "path,path"}; reuse a tokenizer
    torchrun --nnodes=16 --nproc_per_node=8 ... prepare_data.py --input=...   # many machines, the same output

Flow, per source: read (jsonl, json, parquet, text; .gz, .zst; directories; bad input counted) -> count lines
across documents -> clean lines -> language + quality filters -> [all sources] exact dedup -> fuzzy dedup (MinHash/
LSH) -> tokenizer (trained on a sample of the kept text, or given) -> per source: decontaminate -> category balance
-> tokenize in parallel -> shards. Output:
    OUT_DIR/tokenizer.tiktoken, tokenizer_meta.json, stats.json
    OUT_DIR/<source>/meta.json, train_000000.bin ..., val_000000.bin ..., rejects.jsonl (with write_rejects)
Shards are raw little-endian token ids (uint16 when the vocab fits in 65,536), documents framed <|bos|> ... <|eos|>
and concatenated.

Ranks (torchrun; gloo over TCP): each rank takes a contiguous share of every source's files (by bytes) and cleans and
filters it with num_proc processes. Counting lines, exact dedup and LSH buckets are global: the keys are routed to
the rank that owns their hash (all-to-all), each rank groups its share on disk past index_memory_mb (dedup.py), and
the decisions go back to the documents' ranks. A document's global order is (source, file, record); the first of
each duplicate group in that order is kept, so the kept documents and the shards' bytes are the same for any number
of ranks. OUT_DIR must be one file system that every rank sees (each rank writes its part of the shards in place).
Memory per rank: a partition of the index, and the pools' batches. Disk: the cleaned text, 8 bytes per line and
~130 bytes per document in OUT_DIR/.work while the run lasts.

Nothing half-done is ever read: a source is written to <source>.tmp and renamed into place when complete (its
meta.json records this run's fingerprint); stats.json is written last, and train.py / eval.py refuse a data dir
without it. A run that was killed continues where it stopped when started again with the same settings and inputs
(steps done are recorded in OUT_DIR/.work/state.json), and gives the same bytes as a run that never stopped.
"""

import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

import corpus
import dedup
import textfilters as tf
from common import cleanup_distributed, load_config, setup_distributed
from tokenizer import encode_batch, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

# -----------------------------------------------------------------------------
# defaults: the tiny pipeline; a real corpus overrides input/sources, vocab_size and shard_tokens
input = ""                    # noqa: A001  comma-separated files/directories, one source each, named after the path
sources = {"en_docs": "builtin:stdlib_docs", "code": "builtin:stdlib_code", "ja_synthetic": "builtin:ja_templates"}
out_dir = "out/data"
tokenizer = ""                # a directory holding tokenizer.tiktoken: use it instead of training one
vocab_size = 4096             # configs/tiny.py; Tanuki-8B: 65,536 (docs/recipe.md "Tokenizer")
tokenizer_sample_chars = 20_000_000  # the BPE sample, spread over the sources
text_field = "text"           # the JSONL / parquet field holding the document
max_line_bytes = 10_000_000   # a longer input line is bad input: reported, skipped
text_doc_chars = 200_000      # a plain-text file is one document, cut at blank lines into pieces of at most this
max_json_bytes = 100_000_000  # a .json file is parsed whole: a bigger one is a bad file (make it JSONL)
max_docs = 0                  # per source, 0 = all (a quick look at a big corpus; one rank only)
languages = ["ja", "en", "code"]   # what detect_language must answer to keep a document
# sources that skip line cleaning and the language and quality filters: synthetic data that synth.py already
# filtered, whose short Q&A documents the web thresholds (Swallow's 400 characters, Gopher's 50 words) would drop
# wholesale. Dedup and decontamination still apply. Tanuki fed 100-200B such tokens late in pretraining.
unfiltered_sources = []
thresholds = {}               # overrides of textfilters.THRESHOLDS by name, e.g. {"min_chars_ja": 200}
repeated_line_min_docs = 100  # a line found in this many documents of one source is boilerplate (0: off)
index_memory_mb = 256         # per rank: line counts and dedup keys held in memory; the rest waits on disk (exact)
minhash_ngram = 5             # FineWeb word 5-grams; Swallow character 5-grams
minhash_bands = 14            # FineWeb: 14 bands x 8 rows, 50% merge probability at Jaccard ~0.72
minhash_rows = 8
minhash_threshold = 0.0       # > 0: also require this estimated Jaccard between a bucket's first document and each
                              # other one (0: the bands alone, as FineWeb); keeps 4 bytes x bands x rows per document
decontam_files = ""           # comma-separated eval sets (txt: one item per line; jsonl: every string value)
decontam_mode = "drop"        # or "cut": remove only the matching spans
decontam_ngram = 12           # FineWeb's 12-grams of words; Japanese text uses 24 characters (textfilters)
decontam_ngram_cjk = 24
balance_clusters = 8          # k of the category k-means (0: off)
balance_max_share = 1.0       # keep at most this share per cluster by down-sampling it (1.0: report only)
balance_sample = 10_000       # documents the k-means is fitted on
probe_terms = []              # e.g. [["タヌキ", "ため糞"]]: knowledge-frequency probe, reported in stats.json
probe_window = 200
val_every = 100               # every 100th kept document of a source (starting with the first) is validation
shard_tokens = 1_000_000      # tokens per shard file, the last one shorter (a real corpus: 100_000_000)
builtin_ja_docs = 3000        # documents of the built-in Japanese source
write_rejects = False
num_proc = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # per rank
batch_docs = 64
timeout_minutes = 24 * 60     # ranks wait for the slowest one's share at each global step
seed = 0
config = load_config(globals())
# -----------------------------------------------------------------------------
t_start = time.time()
unknown = set(thresholds) - set(tf.THRESHOLDS)
if unknown:
    sys.exit(f"unknown thresholds {sorted(unknown)}; valid: {sorted(tf.THRESHOLDS)}")
TH = {**tf.THRESHOLDS, **thresholds}
if input:
    names = [os.path.basename(os.path.normpath(p)).split(".")[0] or "input" for p in input.split(",")]
    if len(set(names)) < len(names):
        sys.exit(f"--input: two paths would make sources of the same name {names}; use `sources` in a config file")
    sources = dict(zip(names, input.split(",")))
if set(unfiltered_sources) - set(sources):
    sys.exit(f"unfiltered_sources {sorted(set(unfiltered_sources) - set(sources))} are not sources: {sorted(sources)}")
if max_docs and int(os.environ.get("WORLD_SIZE", 1)) > 1:
    sys.exit("max_docs takes the first documents of a source, which only one rank knows: run it on one rank")
# every source's files listed, and every input checked, before any work (corpus.py: readers by extension, bad
# records and files counted by reason with their place in stats.json and skipped)
limits = {"text_field": text_field, "max_line_bytes": max_line_bytes, "text_doc_chars": text_doc_chars,
          "max_json_bytes": max_json_bytes}
file_lists = {name: [] if spec.startswith("builtin:") else corpus.list_files(spec, f"source {name}")
              for name, spec in sources.items()}
decontam_paths = list(filter(None, decontam_files.split(",")))
for path in decontam_paths:
    if not os.path.isfile(path):
        sys.exit(f"decontam_files: no such file: {path}")
enc = load_tokenizer(tokenizer) if tokenizer else None
index = tf.ngram_index(tf.eval_items(decontam_paths), decontam_ngram, decontam_ngram_cjk)  # for decontamination

# -----------------------------------------------------------------------------
# the work on each document, done by num_proc processes forked here, before this process starts any thread: a fork
# while another thread creates or ends one can deadlock the child in CPython's thread-state lock (seen here when a
# pool was forked right after the previous pool's threads were joined). What the workers need that is made later
# (the repeated lines, the tokenizer, the categories) they read from the files the main process writes for them.
_loaded = {}


def loaded(kind, path, load):
    """In a worker: the file the main process wrote for this step, read once (kept until another path comes)."""
    if _loaded.get(kind, (None,))[0] != path:
        _loaded[kind] = (path, load(path) if path and os.path.exists(path) else None)
    return _loaded[kind][1]


def guarded(step, on_error):
    """step() in a worker; if it raises (no step should), on_error(exception): one document never ends the run."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001
        return on_error(e)


def line_hash_batch(docs):  # pass 1
    return [guarded(lambda: tf.line_hashes(tf.normalize(d)), lambda e: np.zeros(0, np.uint64)) for d in docs]


def clean_doc(doc, unfiltered, repeated_lines):  # pass 2: normalize, clean, identify the language, filter, shingle
    def repeated(h):
        i = np.searchsorted(repeated_lines, np.uint64(h))
        return i < len(repeated_lines) and repeated_lines[i] == h
    text = tf.normalize(doc)
    lang = tf.detect_language(text)
    dropped = 0
    if lang != "code" and not unfiltered:  # a code line like `a | b | c` is not a menu
        text, dropped = tf.clean_lines(text, repeated if repeated_lines is not None else None,
                                       TH["boilerplate_max_line_chars"])
    if not text.strip():
        return "clean", "empty_after_cleaning", lang, text, dropped, None
    if unfiltered:
        return "filter", None, lang, text, dropped, dedup.shingles(text, minhash_ngram, tf.units(text))
    if lang not in languages:
        return "language", lang, lang, text, dropped, None
    u = tf.units(text)  # shared by the repetition filters and the shingles
    reason = tf.filter_reason(tf.quality_signals(text, lang, TH["cjk_ngram_scale"], u), lang, TH)
    return "filter", reason, lang, text, dropped, None if reason else dedup.shingles(text, minhash_ngram, u)


def clean_batch(unfiltered, repeated_path, docs):
    repeated_lines = loaded("repeated", repeated_path, np.load)
    out = [guarded(lambda: clean_doc(d, unfiltered, repeated_lines),
                   lambda e: ("clean", f"error_{type(e).__name__}", "unknown", d, 0, None)) for d in docs]
    shingle_sets = [o[5] for o in out if o[5] is not None]
    sigs = iter(dedup.minhash(shingle_sets, minhash_bands * minhash_rows, seed))  # MinHash in the workers too
    return [(step, reason, lang, text, dropped, next(sigs) if sh is not None else None)
            for step, reason, lang, text, dropped, sh in out]


def final_batch(tokenizer_dir, balance_path, docs):
    """Pass 3, per document: (the document, contaminated spans, its text after an optional cut, its cluster, its
    token ids)."""
    tok = loaded("tokenizer", tokenizer_dir, load_tokenizer)
    saved = loaded("balance", balance_path, lambda path: dict(np.load(path)))
    spans = [tf.contaminated_spans(d["text"], index, decontam_ngram, decontam_ngram_cjk) for d in docs]
    texts = [tf.cut_spans(d["text"], sp) if sp and decontam_mode == "cut" else d["text"] for d, sp in zip(docs, spans)]
    clusters = tf.assign(tf.hashed_features(texts), saved["centroids"]) if saved else [0] * len(docs)
    ids = encode_batch(tok, texts, num_threads=1)  # one thread per process: the processes are the parallelism
    dtype = np.uint16 if tok.n_vocab <= 65536 else np.uint32
    return [(d, sp, text, int(c), np.array(t, dtype)) for d, sp, text, c, t in zip(docs, spans, texts, clusters, ids)]


pool = mp.get_context("fork").Pool(num_proc)
rank, _, world_size, _ = setup_distributed("cpu", timeout_minutes=timeout_minutes)
master = rank == 0
say = print if master else (lambda *a, **k: None)

# the run's fingerprint: what decides the output bytes (settings, inputs, tokenizer), not how the work is spread
inputs = {n: [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in fs] for n, fs in file_lists.items()}
free = {"out_dir", "num_proc", "batch_docs", "write_rejects", "index_memory_mb", "timeout_minutes"}
run_id = hashlib.blake2b(json.dumps([{k: v for k, v in sorted(config.items()) if k not in free}, inputs,
                                     [(p, os.path.getsize(p)) for p in decontam_paths],
                                     tokenizer_hash(enc) if enc else None], default=str).encode(),
                         digest_size=12).hexdigest()
work = os.path.join(out_dir, ".work")
state_path = os.path.join(work, "state.json")
if master:
    os.makedirs(out_dir, exist_ok=True)
    # stats.json is written last: a data dir without it is incomplete (common.open_shards)
    if os.path.exists(os.path.join(out_dir, "stats.json")):
        os.remove(os.path.join(out_dir, "stats.json"))
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    if (state.get("run"), state.get("world_size")) != (run_id, world_size):  # another run's, or none: start over
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        with open(state_path, "w") as f:
            json.dump({"run": run_id, "world_size": world_size, "done": []}, f)
    for name in sources:  # a commit that was interrupted, or a source being written when the run was killed
        for leftover in (f"{name}.tmp", f"{name}.old"):
            shutil.rmtree(os.path.join(out_dir, leftover), ignore_errors=True)
dedup.barrier()
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
if state.get("run") != run_id:
    sys.exit(f"rank {rank} does not see this run's {state_path}: out_dir must be a file system every rank shares")
done = set(state["done"])


def mark_done(step):
    """Record a finished step (after every rank's part of it is on disk) so that a rerun skips it."""
    dedup.barrier()
    if master:
        done.add(step)
        with open(state_path + ".tmp", "w") as f:
            json.dump({"run": run_id, "world_size": world_size, "done": sorted(done)}, f)
        os.replace(state_path + ".tmp", state_path)


def merge(parts):
    """Per-rank stats into one: numbers and lists of numbers summed, dicts merged (keys sorted), example lists cut
    to the first 5 in rank order (a rank's files come after the previous rank's, so that is the order of one rank)."""
    first = parts[0]
    if isinstance(first, bool) or isinstance(first, str):
        return first
    if isinstance(first, (int, float)):
        return sum(parts)
    if isinstance(first, dict):
        return {k: merge([p[k] for p in parts if k in p]) for k in sorted(set().union(*parts))}
    if first and all(isinstance(x, (int, float)) for p in parts for x in p):
        return [sum(xs) for xs in zip(*parts)]
    joined = [x for p in parts for x in p]
    return joined[:5] if all(isinstance(x, str) for x in joined) else joined


stats = {name: {"docs_in": 0, "chars_in": 0, **corpus.new_counts(), "lines_removed": 0,
                "removed": {}, "docs_cut": 0, "languages": {}, "docs_out": 0, "chars_out": 0} for name in sources}


def count(d, key, n=1):
    d[key] = d.get(key, 0) + n


def reject(name, step, reason, text):
    """Every dropped document is counted by step and reason, and written out with write_rejects."""
    count(stats[name]["removed"].setdefault(step, {}), reason)
    if write_rejects:
        with open(part(name, rejects_kind), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "reason": reason, "text": text}, ensure_ascii=False) + "\n")


def read_source(name):
    """This rank's documents of a source, in order (files sorted; the first max_docs with one rank)."""
    s, spec = stats[name], sources[name]
    if spec.startswith("builtin:"):
        kind = spec[len("builtin:"):]
        n = builtin_ja_docs if kind == "ja_templates" else len(list(corpus.stdlib_files()))
        docs = itertools.islice(corpus.builtin_docs(kind, builtin_ja_docs, seed), *corpus.share(n, rank, world_size))
    else:
        files = file_lists[name]
        lo, hi = corpus.share(len(files), rank, world_size, [os.path.getsize(p) for p in files])
        docs = corpus.read_files(files[lo:hi], s, limits)
    yield from itertools.islice(docs, max_docs or None)


def part(name, kind, r=None):
    """This rank's (or rank r's) file of one kind for a source, in the work directory."""
    stem, ext = os.path.splitext(kind)
    return os.path.join(work, name, f"{stem}.{rank if r is None else r}{ext}")


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(itertools.islice(it, n)):
        yield batch


def bar(iterable, desc):
    return tqdm(iterable, desc=desc, unit="batch", disable=not master)


# -----------------------------------------------------------------------------
# passes 1 and 2 per source. Pass 1 counts each line's documents exactly (dedup.repeated_hashes, over the ranks that
# own the hashes): the lines in repeated_line_min_docs documents or more are site chrome, cut in pass 2. Pass 2 cleans
# and filters in the workers; this rank's kept documents go to its cleaned.jsonl, their exact hashes and LSH bands
# beside it for the dedup
index_bytes = index_memory_mb << 20
rows_per_round = max(1024, index_bytes // 64)  # keys a rank sends per all-to-all round

for name in sources:
    s = stats[name]
    if f"clean:{name}" in done:  # a rerun: this rank's part of the source was cleaned before
        with open(part(name, "stats.json")) as f:
            stats[name] = json.load(f)
        continue
    os.makedirs(os.path.join(work, name), exist_ok=True)
    rejects_kind = "rejects.jsonl"  # read by reject(); the final pass writes its own (it may run twice)
    if os.path.exists(part(name, rejects_kind)):
        os.remove(part(name, rejects_kind))
    repeated_path = part(name, "repeated.npy") if repeated_line_min_docs else None  # read by the workers
    if repeated_line_min_docs:
        local = (h for b in bar(pool.imap(line_hash_batch, batched(read_source(name), batch_docs)),
                                f"{name}: count lines") for h in b)
        mine, n_lines = dedup.repeated_hashes(dedup.exchanged(local, 1, rows_per_round), repeated_line_min_docs,
                                              part(name, "lines"), index_bytes)
        repeated_lines = np.sort(dedup.all_gather_rows(mine.reshape(-1, 1))[:, 0])
        np.save(repeated_path, repeated_lines)
        s["line_counts"] = {"lines": n_lines, "repeated": len(repeated_lines) if master else 0, "exact": True}
    s.update(corpus.new_counts())  # pass 1 counted them; pass 2 reads the same bytes again
    clean = functools.partial(clean_batch, name in unfiltered_sources, repeated_path)
    with open(part(name, "cleaned.jsonl"), "w", encoding="utf-8") as f, \
            open(part(name, "exact.u64"), "wb") as f_exact, open(part(name, "bands.u64"), "wb") as f_bands, \
            open(part(name, "sigs.u32"), "wb") as f_sigs:
        def counted(docs):
            for d in docs:
                s["docs_in"] += 1
                s["chars_in"] += len(d)
                yield d
        for results in bar(pool.imap(clean, batched(counted(read_source(name)), batch_docs)),
                           f"{name}: clean + filter"):
            rows = []
            for step, reason, lang, text, dropped, sig in results:
                s["lines_removed"] += dropped
                if reason is not None:
                    reject(name, step, reason, text)
                    continue
                h = dedup.exact_hash(text)
                rows.append(sig)
                f.write(json.dumps({"text": text, "lang": lang, "hash": h}, ensure_ascii=False) + "\n")
                np.array([h], np.uint64).tofile(f_exact)
            if rows:
                dedup.lsh_band_hashes(np.stack(rows), minhash_bands, minhash_rows).tofile(f_bands)
                if minhash_threshold > 0:
                    np.stack(rows).tofile(f_sigs)
    with open(part(name, "stats.json"), "w") as f:
        json.dump(s, f)
    mark_done(f"clean:{name}")

# -----------------------------------------------------------------------------
# exact and fuzzy dedup over all sources at once (a copy in two sources is still a copy). A document's global id is
# (source, rank, index on that rank), which sorts as the documents do in one rank's order, and names its rank.
# Exact: (hash, id) rows go to the owner of the hash, which drops all but the smallest id of each hash. Fuzzy: the
# survivors' (band key, id) rows go to the owner of the key; each bucket joins its documents; the connected
# components are found across ranks (dedup.components) and all but the smallest id of each are dropped.
# keep.<rank>: per document 0 = kept, 1 = exact duplicate, 2 = near-duplicate

n_local = {name: os.path.getsize(part(name, "exact.u64")) // 8 for name in sources}
base = {name: np.uint64((i << 48) | (rank << 32)) for i, name in enumerate(sources)}


def id_owner(ids):
    return ((np.asarray(ids, np.uint64) >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64)


def mark(verdict, ids, value):
    """Set verdict[source][index] = value for ids that this rank owns."""
    for i, name in enumerate(sources):
        mine = ids[(ids >> np.uint64(48)) == np.uint64(i)]
        verdict[name][(mine & np.uint64(0xFFFFFFFF)).astype(np.int64)] = value


def keyed_rows(keys_of, per_doc):
    """(key, id) rows of this rank's documents not dropped yet, all sources, read in pieces of about rows_per_round
    rows: keys_of(name, lo, hi) -> the keys of documents lo..hi-1, (hi - lo, per_doc) uint64."""
    step = max(1, rows_per_round // per_doc)
    for name in sources:
        for lo in range(0, n_local[name], step):
            hi = min(lo + step, n_local[name])
            live = verdict[name][lo:hi] == 0
            ids = (base[name] + np.arange(lo, hi, dtype=np.uint64))[live]
            yield np.stack([keys_of(name, lo, hi)[live].reshape(-1), np.repeat(ids, per_doc)], axis=1)


def exact_keys(name, lo, hi):
    return np.fromfile(part(name, "exact.u64"), np.uint64, hi - lo, offset=8 * lo).reshape(-1, 1)


def band_keys(name, lo, hi):  # a band's hash mixed with its index: equal keys = equal band of the same index
    bands = np.fromfile(part(name, "bands.u64"), np.uint64, (hi - lo) * minhash_bands, offset=8 * minhash_bands * lo)
    return tf._mix64(bands.reshape(-1, minhash_bands)
                     ^ (np.arange(minhash_bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def signatures(ids):
    """On the rank that owns them: the MinHash signatures of documents, as rows of uint64 pairs."""
    width = minhash_bands * minhash_rows
    out = np.zeros((len(ids), width // 2), np.uint64)
    for i, name in enumerate(sources):
        at = np.flatnonzero((ids >> np.uint64(48)) == np.uint64(i))
        if len(at):
            sigs = np.memmap(part(name, "sigs.u32"), np.uint32, "r").reshape(-1, width)
            out[at] = sigs[(ids[at] & np.uint64(0xFFFFFFFF)).astype(np.int64)].view(np.uint64)
    return out


if "dedup" in done:
    verdict = {name: np.load(part(name, "keep.npy")) for name in sources}
else:
    verdict = {name: np.zeros(n_local[name], np.uint8) for name in sources}
    spill = part("", "spill")
    mark(verdict, dedup.exact_copies(keyed_rows(exact_keys, 1), id_owner, spill, index_bytes, rows_per_round), 1)

    def similar(a, b):  # with a threshold: the pairs whose MinHash values agree often enough (the Jaccard estimate)
        return (dedup.lookup(a, id_owner, signatures).view(np.uint32)
                == dedup.lookup(b, id_owner, signatures).view(np.uint32)).mean(1) >= minhash_threshold
    near, rounds = dedup.near_copies(keyed_rows(band_keys, minhash_bands), id_owner, spill, index_bytes,
                                     rows_per_round, similar if minhash_threshold > 0 else None)
    mark(verdict, near, 2)
    for name in sources:
        np.save(part(name, "keep.npy"), verdict[name])
    found = np.sum(dedup.gather_json([int(sum((v == k).sum() for v in verdict.values())) for k in (0, 1, 2)]), 0)
    say(f"dedup: {sum(found):,} documents, {found[1]:,} exact copies, {found[2]:,} near-duplicates (components in "
        f"{rounds} rounds; bands x rows {minhash_bands} x {minhash_rows}: 50% merged at Jaccard "
        f"{(1 / minhash_bands) ** (1 / minhash_rows):.2f}; threshold {minhash_threshold or 'none'})")
    mark_done("dedup")


def kept_docs(name):
    """The cleaned documents of a source that survive dedup, over every rank's part in rank order (the order of one
    rank): the tokenizer sample and the category fit are the same for any number of ranks."""
    for r in range(world_size):
        keep = np.load(part(name, "keep.npy", r))
        with open(part(name, "cleaned.jsonl", r), encoding="utf-8") as f:
            yield from (json.loads(line) for line, v in zip(f, keep) if v == 0)

# -----------------------------------------------------------------------------
# tokenizer: trained on a sample of the cleaned, deduplicated text (Tanuki: a random sample of the training corpus).
# Ours takes the sources' documents in turn, from the start of each, up to tokenizer_sample_chars: deterministic,
# and a big source cannot crowd the small ones out of the vocab. Or a given tokenizer is loaded. Rank 0 trains it.

if enc is None and "tokenizer" not in done and master:
    def sample():
        chars, streams = 0, [kept_docs(name) for name in sources]
        while streams and chars < tokenizer_sample_chars:
            for it in list(streams):
                doc = next(it, None)
                if doc is None:
                    streams.remove(it)
                    continue
                chars += len(doc["text"])
                yield doc["text"]
    save_tokenizer(train_tokenizer(sample(), vocab_size), out_dir)
if enc is None:
    mark_done("tokenizer")
    enc = load_tokenizer(out_dir)
elif master:
    save_tokenizer(enc, out_dir)
dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
tok_hash = tokenizer_hash(enc)

# -----------------------------------------------------------------------------
# categories: k-means on hashed n-gram features of a sample, fitted once for all sources (by rank 0, on the same
# documents for any number of ranks); the clusters' shares in that sample set the keep probability of
# over-represented ones (Tanuki: "too many ads, too little reasoning")

keep_prob = None
balance_path = os.path.join(work, "balance.npz")  # the workers assign categories with its centroids
if balance_clusters and "balance" not in done and master:
    fit = [d["text"] for name in sources for d, _ in zip(kept_docs(name), range(balance_sample // len(sources)))]
    if len(fit) >= balance_clusters:
        X = tf.hashed_features(fit)
        centroids = tf.kmeans(X, balance_clusters, seed=seed)
        fit_labels = tf.assign(X, centroids)
        share = np.bincount(fit_labels, minlength=len(centroids)) / len(X)
        keep_prob = np.minimum(1.0, balance_max_share / np.maximum(share, 1e-9))
        np.savez(balance_path, centroids=centroids, keep_prob=keep_prob)
        print("categories in the k-means sample (share, first document):")
        for c in np.unique(fit_labels):
            print(f"  {c}: {share[c]:6.1%}  {fit[int(np.argmax(fit_labels == c))][:70]!r}")
if balance_clusters:
    mark_done("balance")
    if os.path.exists(balance_path):
        with np.load(balance_path) as saved:
            keep_prob = saved["keep_prob"]
say(f"decontamination: {len(index):,} n-grams from {decontam_files or 'no evaluation sets'}")


def write_tokens(directory, split, position, ids):
    """Token ids at `position` of a split's stream, which is cut into files of shard_tokens: each rank writes its
    own range of the stream in place, into files rank 0 has created at their final size."""
    ids = ids.astype("<" + np.dtype(dtype).str[1:])
    while len(ids):
        shard, at = divmod(position, shard_tokens)
        n = min(len(ids), shard_tokens - at)
        fd = os.open(os.path.join(directory, f"{split}_{shard:06d}.bin"), os.O_WRONLY)
        try:
            os.pwrite(fd, ids[:n].tobytes(), at * ids.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)
        ids, position = ids[n:], position + n


# -----------------------------------------------------------------------------
# pass 3 per source: decontaminate, balance, tokenize in parallel (imap keeps the order) into this rank's token file;
# then the ranks' counts place each rank's documents in the source's streams, the shards are written in place in
# <source>.tmp, and rank 0 commits the source by renaming it (a source of this run that is in place is skipped)

for name in sources:
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f"{name}.tmp")
    meta_path = os.path.join(final, "meta.json")
    if os.path.exists(meta_path) and json.load(open(meta_path)).get("run") == run_id:
        continue
    s, rejects_kind = stats[name], "rejects_final.jsonl"
    if os.path.exists(part(name, rejects_kind)):
        os.remove(part(name, rejects_kind))
    s.update(docs_out=0, tokens_train=0, tokens_val=0, clusters=[0] * max(1, balance_clusters))
    lengths, probe_hits = [], []
    work_on = functools.partial(final_batch, tokenizer or out_dir, balance_path)
    with open(part(name, "tokens.bin"), "wb") as f, \
            open(part(name, "cleaned.jsonl"), encoding="utf-8") as cleaned:
        def unique(lines):
            for line, v in zip(lines, verdict[name]):
                d = json.loads(line)
                if v == 0:
                    yield d
                else:
                    reject(name, *(("exact_dedup", "exact_duplicate") if v == 1 else ("fuzzy_dedup", "near_duplicate")),
                           d["text"])
        for results in bar(pool.imap(work_on, batched(unique(cleaned), batch_docs)),
                           f"{name}: decontaminate + tokenize"):
            for d, spans, text, cluster, ids in results:
                if spans and decontam_mode == "drop":
                    reject(name, "decontaminate", "eval_ngram", d["text"])
                    continue
                # a fixed pseudo-random number per document (its exact hash), so the same documents are kept on rerun
                if keep_prob is not None and (d["hash"] % 1_000_003) / 1_000_003 >= keep_prob[cluster]:
                    reject(name, "balance", f"cluster_{cluster}", text)
                    continue
                s["docs_cut"] += bool(spans)  # kept, with the evaluation text cut out (decontam_mode="cut")
                probe_hits += [{"terms": i, "text": text} for i, terms in enumerate(probe_terms)
                               if dedup.terms_cooccur(text, terms, probe_window)]
                ids.tofile(f)
                lengths.append(len(ids))
                s["clusters"][cluster] += 1
                count(s["languages"], d["lang"])
                s["chars_out"] += len(text)
    # the k-th kept document of the source (over all ranks, in order) is validation when k % val_every == 0
    first = sum(dedup.gather_json(len(lengths))[:rank])
    is_val = (first + np.arange(len(lengths))) % val_every == 0
    lengths = np.array(lengths, np.int64)
    mine = {"val": [int(lengths[is_val].sum()), int(is_val.sum())], "train": [int(lengths[~is_val].sum()),
                                                                               int((~is_val).sum())]}
    everyone = dedup.gather_json(mine)
    totals = {split: [sum(m[split][i] for m in everyone) for i in (0, 1)] for split in mine}
    if master:
        os.makedirs(tmp)
        for split, (tokens, _) in totals.items():
            for i in range(0, tokens, shard_tokens):
                with open(os.path.join(tmp, f"{split}_{i // shard_tokens:06d}.bin"), "wb") as f:
                    f.truncate(min(shard_tokens, tokens - i) * np.dtype(dtype).itemsize)
    dedup.barrier()
    position = {split: sum(m[split][0] for m in everyone[:rank]) for split in mine}
    ends = np.cumsum(lengths)
    tokens = np.memmap(part(name, "tokens.bin"), dtype, "r") if len(ends) and ends[-1] else np.zeros(0, dtype)
    j = 0
    while j < len(lengths):  # documents of up to 16M tokens at a time, cut into the two splits' ranges
        k = max(j + 1, int(np.searchsorted(ends, ends[j] - lengths[j] + (16 << 20), "right")))
        chunk, val = tokens[ends[j] - lengths[j]:ends[k - 1]], np.repeat(is_val[j:k], lengths[j:k])
        for split, where in (("val", val), ("train", ~val)):
            write_tokens(tmp, split, position[split], chunk[where])
            position[split] += int(where.sum())
        j = k
    del tokens
    os.remove(part(name, "tokens.bin"))
    if write_rejects:  # this rank's rejects, from both passes, go with the source
        with open(os.path.join(tmp, "rejects.jsonl" if world_size == 1 else f"rejects.{rank}.jsonl"), "wb") as out:
            for kind in ("rejects.jsonl", "rejects_final.jsonl"):
                if os.path.exists(part(name, kind)):
                    with open(part(name, kind), "rb") as f:
                        shutil.copyfileobj(f, out)
    s.update(docs_out=len(lengths), tokens_train=mine["train"][0], tokens_val=mine["val"][0])
    merged, probe_hits = merge(dedup.gather_json(s)), sum(dedup.gather_json(probe_hits), [])
    if master:
        if probe_terms:  # the documents that mention the probe's terms: the report counts their distinct copies
            with open(os.path.join(tmp, "probe.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(hit, ensure_ascii=False) + "\n" for hit in probe_hits)
        meta = {"source": name, "dtype": np.dtype(dtype).name, "vocab_size": enc.n_vocab, "tokenizer_hash": tok_hash,
                **{split: {"files": [f"{split}_{i:06d}.bin" for i in range(-(-totals[split][0] // shard_tokens))],
                           "tokens": totals[split][0], "documents": totals[split][1]} for split in ("train", "val")},
                "shard_tokens": shard_tokens, "run": run_id, "stats": merged}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        if os.path.exists(final):
            os.rename(final, os.path.join(out_dir, f"{name}.old"))
        os.rename(tmp, final)  # the commit point of the source
        shutil.rmtree(os.path.join(out_dir, f"{name}.old"), ignore_errors=True)
    dedup.barrier()

# -----------------------------------------------------------------------------
# report: stats.json (the committed sources' stats) and a table of what each step removed, per source

if master:
    stats = {name: json.load(open(os.path.join(out_dir, name, "meta.json")))["stats"] for name in sources}
    hits = [json.loads(line) for name in sources if probe_terms
            for line in open(os.path.join(out_dir, name, "probe.jsonl"), encoding="utf-8")]
    probes = [dedup.knowledge_frequency([h["text"] for h in hits if h["terms"] == k], terms, probe_window)
              for k, terms in enumerate(probe_terms)]
    stats_all = {"config": config, "world_size": world_size, "tokenizer_hash": tok_hash, "sources": stats,
                 "probe": probes}
    with open(os.path.join(out_dir, "stats.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(stats_all, f, indent=2, ensure_ascii=False)
    shutil.rmtree(work)
    os.replace(os.path.join(out_dir, "stats.json.tmp"), os.path.join(out_dir, "stats.json"))  # the dir is complete
    steps = ["clean", "language", "filter", "exact_dedup", "fuzzy_dedup", "decontaminate", "balance"]
    header = ["source", "docs in", "chars in", "bad input"] + steps + ["docs out", "tokens out"]
    rows = [[name, s["docs_in"], s["chars_in"], sum(s["bad_records"].values()) + sum(s["bad_files"].values())]
            + [sum(s["removed"].get(step, {}).values()) for step in steps]
            + [s["docs_out"], s["tokens_train"] + s["tokens_val"]] for name, s in stats.items()]
    widths = [max(len(f"{x:,}" if isinstance(x, int) else x) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join((f"{x:,}" if isinstance(x, int) else x).rjust(w) for x, w in zip(row, widths)))
    for name, s in stats.items():
        reasons = {step: r for step, r in s["removed"].items() if r}
        print(f"{name}: bad records {s['bad_records'] or 'none'}, bad files {s['bad_files'] or 'none'}"
              + "".join(f"\n  {reason} first at {', '.join(where)}" for reason, where in s["bad_examples"].items())
              + f"\n  removed {reasons or 'nothing'}; {s['lines_removed']:,} lines cut; {s['docs_cut']} documents "
              f"cut by decontamination; kept {s['languages']}")
    for p in probes:
        print(f"probe {p['terms']}: {p['documents']} documents, {p['distinct']} distinct near-duplicate clusters")
    print(f"wrote {out_dir} in {time.time() - t_start:.0f}s on {world_size} rank(s): tokenizer {enc.n_vocab:,} ids "
          f"({tok_hash[:12]}), shards of {np.dtype(dtype).name}")
pool.terminate()
dedup.barrier()
cleanup_distributed()
