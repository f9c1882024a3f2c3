"""
Stage 1: raw text -> clean, deduplicated, tokenized shards. Web cleaning steps remove ~90% of CommonCrawl
(docs/recipe.md "General guidance"); dirty Japanese web text fed late made Tanuki degenerate (docs/recipe.md "Data"),
so this stage decides what the model learns.

    python prepare_data.py                                   # the built-in corpus (nothing downloaded), vocab 4096
    python prepare_data.py --input=data/fineweb,data/llmjp --out_dir=out/web --vocab_size=65536
    python prepare_data.py configs/my_mix.py --tokenizer=out/web   # sources = {"name": "path,path"}; reuse a tokenizer

Flow, per source: read (jsonl, json, parquet, text; .gz, .zst; directories; bad input counted) -> clean lines
-> language + quality filters -> exact dedup -> fuzzy dedup (MinHash/LSH over all sources) -> decontaminate
-> category balance -> tokenizer (trained on a sample of the cleaned text, or given) -> tokenize in parallel
-> shards. Output:
    OUT_DIR/tokenizer.tiktoken, tokenizer_meta.json, stats.json
    OUT_DIR/<source>/meta.json, train_000000.bin ..., val_000000.bin ..., rejects.jsonl (with write_rejects)
Shards are raw little-endian token ids (uint16 when the vocab fits in 65,536), documents framed <|bos|> ... <|eos|>
and concatenated. Memory stays flat in corpus size except for the dedup index, about 200 bytes per document kept
by the filters: 14 LSH band hashes x 8 bytes (FineWeb's bands), its exact hash in a Python set (~70 bytes) and a
cluster label (8 bytes); plus the line counts, exact in at most repeated_line_memory_mb. Disk: the cleaned text
once more, in OUT_DIR/<source>/cleaned.jsonl, and 8 bytes per line while the lines are counted.
"""

import ast
import datetime
import itertools
import json
import multiprocessing as mp
import os
import random
import sys
import sysconfig
import time

import numpy as np
from tqdm import tqdm

import corpus
import dedup
import textfilters as tf
from common import load_config
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
max_docs = 0                  # per source, 0 = all (a quick look at a big corpus)
languages = ["ja", "en", "code"]   # what detect_language must answer to keep a document
# sources that skip line cleaning and the language and quality filters: synthetic data that synth.py already
# filtered, whose short Q&A documents the web thresholds (Swallow's 400 characters, Gopher's 50 words) would drop
# wholesale. Dedup and decontamination still apply. Tanuki fed 100-200B such tokens late in pretraining.
unfiltered_sources = []
thresholds = {}               # overrides of textfilters.THRESHOLDS by name, e.g. {"min_chars_ja": 200}
repeated_line_min_docs = 100  # a line found in this many documents of one source is boilerplate (0: off)
repeated_line_memory_mb = 256 # counting those lines exactly holds at most this much (spilled to disk, dedup.py)
minhash_ngram = 5             # FineWeb word 5-grams; Swallow character 5-grams
minhash_bands = 14            # FineWeb: 14 bands x 8 rows, 50% merge probability at Jaccard ~0.72
minhash_rows = 8
minhash_threshold = 0.0       # > 0: also require this estimated Jaccard of a candidate pair (0: the bands alone,
                              # as FineWeb); keeps the signatures on disk, 4 bytes x bands x rows per document
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
num_proc = max(1, (os.cpu_count() or 1))
batch_docs = 64
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
os.makedirs(out_dir, exist_ok=True)
# stats.json is written last: a data dir without it is incomplete, and train.py / eval.py refuse it (common.open_shards)
if os.path.exists(os.path.join(out_dir, "stats.json")):  # an earlier run's: this one is incomplete until it ends
    os.remove(os.path.join(out_dir, "stats.json"))
ctx = mp.get_context("fork")  # workers inherit the settings, sketch and indexes set below without pickling them
stats = {name: {"docs_in": 0, "chars_in": 0, **corpus.new_counts(), "lines_removed": 0,
                "removed": {}, "docs_cut": 0, "languages": {}, "docs_out": 0, "chars_out": 0} for name in sources}


def count(d, key, n=1):
    d[key] = d.get(key, 0) + n


def reject(name, step, reason, text):
    """Every dropped document is counted by step and reason, and written out with write_rejects."""
    count(stats[name]["removed"].setdefault(step, {}), reason)
    if write_rejects:
        with open(os.path.join(out_dir, name, "rejects.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "reason": reason, "text": text}, ensure_ascii=False) + "\n")


def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)  # sorted in place: os.walk's order is the file system's
        yield from (os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))


def stdlib_docs(code):
    """The Python standard library on disk: each module's source (code) or its docstrings joined (English prose)."""
    for path in stdlib_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        if code:
            yield source
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        yield "\n\n".join(filter(None, (ast.get_docstring(n) for n in nodes)))


# A small Japanese source generated from templates, because a fresh machine has no Japanese text. It is honest
# about what it is: fluent, grammatical sentences whose facts are true (prefectural capitals, calendar dates,
# arithmetic) or plainly about made-up people; it teaches script and grammar, not the world.
PREFECTURES = ("北海道:札幌市 青森県:青森市 岩手県:盛岡市 宮城県:仙台市 秋田県:秋田市 山形県:山形市 福島県:福島市 "
               "茨城県:水戸市 栃木県:宇都宮市 群馬県:前橋市 埼玉県:さいたま市 千葉県:千葉市 東京都:新宿区 "
               "神奈川県:横浜市 新潟県:新潟市 富山県:富山市 石川県:金沢市 福井県:福井市 山梨県:甲府市 長野県:長野市 "
               "岐阜県:岐阜市 静岡県:静岡市 愛知県:名古屋市 三重県:津市 滋賀県:大津市 京都府:京都市 大阪府:大阪市 "
               "兵庫県:神戸市 奈良県:奈良市 和歌山県:和歌山市 鳥取県:鳥取市 島根県:松江市 岡山県:岡山市 広島県:広島市 "
               "山口県:山口市 徳島県:徳島市 香川県:高松市 愛媛県:松山市 高知県:高知市 福岡県:福岡市 佐賀県:佐賀市 "
               "長崎県:長崎市 熊本県:熊本市 大分県:大分市 宮崎県:宮崎市 鹿児島県:鹿児島市 沖縄県:那覇市").split()
NAMES = "佐藤 鈴木 高橋 田中 伊藤 渡辺 山本 中村 小林 加藤 吉田 山田 佐々木 松本 井上 木村".split()
FOODS = "カレーライス ラーメン おにぎり 焼き魚 うどん そば 天ぷら 味噌汁 寿司 肉じゃが".split()
THINGS = "りんご みかん 鉛筆 ノート 切手 ビー玉 クッキー 折り紙".split()
WEEKDAYS = "月火水木金土日"
TEMPLATES = [
    lambda r, p, c: f"{p}の{p[-1]}庁所在地は{c}です。",
    lambda r, p, c: f"{r.choice(NAMES)}さんは{p}に住んでいて、毎朝{r.randint(10, 59)}分かけて{c}の職場まで通っています。",
    lambda r, p, c: f"{r.choice(NAMES)}さんは{r.choice(FOODS)}が好きで、週に{r.randint(2, 5)}回は食べるそうです。",
    lambda r, p, c: (lambda a, b, t: f"{r.choice(NAMES)}さんは{t}を{a}個持っていました。友だちから{b}個もらったので、"
                     f"全部で{a + b}個になりました。")(r.randint(2, 40), r.randint(2, 40), r.choice(THINGS)),
    lambda r, p, c: (lambda a, b: f"{a}に{b}を足すと{a + b}になり、{a}から{b}を引くと{a - b}になります。")(
        r.randint(50, 999), r.randint(1, 49)),
    lambda r, p, c: (lambda a, b: f"{a}かける{b}は{a * b}なので、{a * b}を{b}で割ると{a}に戻ります。")(
        r.randint(2, 99), r.randint(2, 19)),
    lambda r, p, c: (lambda d: f"{d.year}年{d.month}月{d.day}日は{WEEKDAYS[d.weekday()]}曜日でした。")(
        datetime.date(1990, 1, 1) + datetime.timedelta(days=r.randint(0, 12000))),
    lambda r, p, c: (lambda y: f"{y}年は" + ("うるう年で、二月は二十九日まであります。" if y % 4 == 0 and
                     (y % 100 or y % 400 == 0) else "うるう年ではないので、二月は二十八日で終わります。"))(r.randint(1900, 2100)),
    lambda r, p, c: (lambda n, k: f"{n}人で{n * k}個のお菓子を同じ数ずつ分けると、一人あたり{k}個ずつになります。")(
        r.randint(2, 9), r.randint(2, 12)),
    lambda r, p, c: (lambda w: f"一週間は七日なので、{w}週間はちょうど{7 * w}日になります。")(r.randint(2, 52)),
    lambda r, p, c: f"{r.choice(NAMES)}さんは休みの日に{c}の図書館へ行き、{r.randint(2, 6)}冊の本を借りてきました。",
    lambda r, p, c: f"{r.choice(NAMES)}さんと{r.choice(NAMES)}さんは、{r.randint(3, 11)}時に{c}の駅で待ち合わせをしました。",
    lambda r, p, c: (lambda h, m: f"会議は{h}時{m}分に始まり、九十分後の{h + (m + 90) // 60}時{(m + 90) % 60}分に終わった。")(
        r.randint(8, 16), r.choice([0, 15, 30, 45])),
    lambda r, p, c: (lambda k: f"子どもたちが{k}列に七人ずつ並ぶと、校庭には全部で{7 * k}人がいることになる。")(r.randint(2, 9)),
    lambda r, p, c: f"旅行の計画を立てるとき、{r.choice(NAMES)}さんはまず{p}の地図を広げて、行きたい場所に印をつけていった。",
    lambda r, p, c: (lambda t: f"この店では{t}が一つ{r.randint(1, 9) * 10}円で売られていて、昼過ぎにはいつも売り切れてしまう。")(
        r.choice(THINGS)),
    lambda r, p, c: (lambda a: f"正方形の一辺が{a}センチメートルなら、その面積は{a * a}平方センチメートルになる。")(r.randint(2, 30)),
    lambda r, p, c: f"雨の日が続いたので、{r.choice(NAMES)}さんは家で{r.choice(FOODS)}を作りながら、ゆっくり音楽を聞いて過ごした。",
]


def ja_template_docs(n):
    rng = random.Random(seed)  # a fixed seed: the same corpus on every machine
    for _ in range(n):
        # distinct templates per document: the same template twice would be caught by the repetition filters
        sentences = [t(rng, *rng.choice(PREFECTURES).split(":")) for t in rng.sample(TEMPLATES, rng.randint(12, 16))]
        cuts = sorted(rng.sample(range(1, len(sentences)), 3))  # four paragraphs
        yield "\n".join("".join(sentences[a:b]) for a, b in zip([0] + cuts, cuts + [len(sentences)]))


# every source's files listed, and every input checked, before any work (corpus.py: readers by extension, bad
# records and files counted by reason with their place in stats.json and skipped)
limits = {"text_field": text_field, "max_line_bytes": max_line_bytes, "text_doc_chars": text_doc_chars,
          "max_json_bytes": max_json_bytes}
file_lists = {name: [] if spec.startswith("builtin:") else corpus.list_files(spec, f"source {name}")
              for name, spec in sources.items()}
for path in filter(None, decontam_files.split(",")):
    if not os.path.isfile(path):
        sys.exit(f"decontam_files: no such file: {path}")


def read_source(name):
    """All documents of a source in a fixed order (files sorted), the first max_docs of them."""
    s, spec = stats[name], sources[name]
    if spec.startswith("builtin:"):
        kind = spec[len("builtin:"):]
        docs = {"stdlib_docs": lambda: stdlib_docs(False), "stdlib_code": lambda: stdlib_docs(True),
                "ja_templates": lambda: ja_template_docs(builtin_ja_docs)}[kind]()
    else:
        docs = corpus.read_files(file_lists[name], s, limits)
    for i, doc in enumerate(docs):
        if max_docs and i >= max_docs:
            return
        yield doc


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(itertools.islice(it, n)):
        yield batch


# -----------------------------------------------------------------------------
# pass 1 per source: count each line's documents exactly (dedup.repeated_hashes), so that lines repeated across many
# documents (site chrome) can be cut in pass 2: the sorted hashes found in repeated_line_min_docs documents or more
repeated_lines = np.zeros(0, np.uint64)


def repeated(h):
    i = np.searchsorted(repeated_lines, np.uint64(h))
    return i < len(repeated_lines) and repeated_lines[i] == h


def guarded(step, on_error):
    """step() in a worker; if it raises (no step should), on_error(exception): one document never ends the run."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001
        return on_error(e)


def line_hash_batch(docs):
    return [guarded(lambda: tf.line_hashes(tf.normalize(d)), lambda e: np.zeros(0, np.uint64)) for d in docs]


# pass 2 per source: normalize, clean, identify the language, filter, shingle; exact dedup and the index in the parent
def clean_doc(doc):
    text = tf.normalize(doc)
    lang = tf.detect_language(text)
    dropped = 0
    if lang != "code" and not unfiltered:  # a code line like `a | b | c` is not a menu
        text, dropped = tf.clean_lines(text, repeated if repeated_line_min_docs else None,
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


def clean_batch(docs):
    out = [guarded(lambda: clean_doc(d), lambda e: ("clean", f"error_{type(e).__name__}", "unknown", d, 0, None))
           for d in docs]
    shingle_sets = [o[5] for o in out if o[5] is not None]
    sigs = iter(dedup.minhash(shingle_sets, minhash_bands * minhash_rows, seed))
    return [(step, reason, lang, text, dropped, next(sigs) if sh is not None else None)
            for step, reason, lang, text, dropped, sh in out]


seen_exact = set()
band_rows = []  # one (n, bands) array per batch, over all sources in order
n_cleaned = {}  # documents per source in cleaned.jsonl
sig_file = open(os.path.join(out_dir, "minhash.tmp"), "wb") if minhash_threshold > 0 else None
for name in sources:
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    if os.path.exists(os.path.join(out_dir, name, "rejects.jsonl")):  # rejects of an earlier run
        os.remove(os.path.join(out_dir, name, "rejects.jsonl"))
    s = stats[name]
    unfiltered = name in unfiltered_sources  # read by clean_batch in the workers forked below
    if repeated_line_min_docs:
        with ctx.Pool(num_proc) as pool:
            batches = tqdm(pool.imap(line_hash_batch, batched(read_source(name), batch_docs)),
                           desc=f"{name}: count lines", unit="batch")
            repeated_lines, n_lines = dedup.repeated_hashes((h for b in batches for h in b), repeated_line_min_docs,
                                                         os.path.join(out_dir, name, "line_counts.tmp"),
                                                         repeated_line_memory_mb << 20)
        s["line_counts"] = {"lines": n_lines, "repeated": len(repeated_lines), "exact": True}
    s.update(corpus.new_counts())  # pass 1 counted them; pass 2 reads the same bytes again
    with ctx.Pool(num_proc) as pool, open(os.path.join(out_dir, name, "cleaned.jsonl"), "w", encoding="utf-8") as f:
        docs = read_source(name)

        def counted(docs):
            for d in docs:
                s["docs_in"] += 1
                s["chars_in"] += len(d)
                yield d
        for results in tqdm(pool.imap(clean_batch, batched(counted(docs), batch_docs)),
                            desc=f"{name}: clean + filter", unit="batch"):
            rows = []
            for step, reason, lang, text, dropped, sig in results:
                s["lines_removed"] += dropped
                if reason is not None:
                    reject(name, step, reason, text)
                    continue
                h = dedup.exact_hash(text)
                if h in seen_exact:
                    reject(name, "exact_dedup", "exact_duplicate", text)
                    continue
                seen_exact.add(h)
                rows.append(sig)
                f.write(json.dumps({"text": text, "lang": lang, "hash": h}, ensure_ascii=False) + "\n")
            if rows:
                band_rows.append(dedup.lsh_band_hashes(np.stack(rows), minhash_bands, minhash_rows))
                if sig_file:
                    np.stack(rows).tofile(sig_file)
    n_cleaned[name] = sum(len(b) for b in band_rows) - sum(n_cleaned.values())

# fuzzy dedup over all sources at once: a copy in two sources is still a copy; the first one seen is kept
bands = np.concatenate(band_rows) if band_rows else np.zeros((0, minhash_bands), np.uint64)
sigs = None
if sig_file:
    sig_file.close()
if sig_file and len(bands):
    sigs = np.memmap(sig_file.name, np.uint32, "r", shape=(len(bands), minhash_bands * minhash_rows))
labels = dedup.duplicate_clusters(bands, sigs, minhash_threshold)
print(f"fuzzy dedup: {len(bands):,} documents, {int((labels != np.arange(len(bands))).sum()):,} near-duplicates "
      f"(bands x rows {minhash_bands} x {minhash_rows}: 50% merged at Jaccard "
      f"{(1 / minhash_bands) ** (1 / minhash_rows):.2f}; threshold {minhash_threshold or 'none'})")
if sig_file:
    del sigs
    os.remove(sig_file.name)
del seen_exact, band_rows, bands


def cleaned(name):
    with open(os.path.join(out_dir, name, "cleaned.jsonl"), encoding="utf-8") as f:
        yield from (json.loads(line) for line in f)


offsets = dict(zip(sources, np.cumsum([0] + [n_cleaned[name] for name in sources]).tolist()))  # into `labels`


def unique_docs(name):
    """The cleaned documents of a source that survive fuzzy dedup (label = own index)."""
    for i, doc in enumerate(cleaned(name), offsets[name]):
        if labels[i] == i:
            yield doc


# -----------------------------------------------------------------------------
# tokenizer: trained on a sample of the cleaned, deduplicated text (Tanuki: a random sample of the training corpus).
# Ours takes the sources' documents in turn, from the start of each, up to tokenizer_sample_chars: deterministic,
# and a big source cannot crowd the small ones out of the vocab. Or a given tokenizer is loaded.

if tokenizer:
    enc = load_tokenizer(tokenizer)
else:
    def sample():
        chars, streams = 0, [unique_docs(name) for name in sources]
        while streams and chars < tokenizer_sample_chars:
            for it in list(streams):
                doc = next(it, None)
                if doc is None:
                    streams.remove(it)
                    continue
                chars += len(doc["text"])
                yield doc["text"]
    enc = train_tokenizer(sample(), vocab_size)
save_tokenizer(enc, out_dir)
dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
tok_hash = tokenizer_hash(enc)

# -----------------------------------------------------------------------------
# categories: k-means on hashed n-gram features of a sample, fitted once for all sources; the clusters' shares in
# that sample set the keep probability of over-represented ones (Tanuki: "too many ads, too little reasoning")

centroids, keep_prob = None, None
if balance_clusters:
    fit = [d["text"] for name in sources for d, _ in zip(unique_docs(name), range(balance_sample // len(sources)))]
    if len(fit) >= balance_clusters:
        X = tf.hashed_features(fit)
        centroids = tf.kmeans(X, balance_clusters, seed=seed)
        fit_labels = tf.assign(X, centroids)
        share = np.bincount(fit_labels, minlength=len(centroids)) / len(X)
        keep_prob = np.minimum(1.0, balance_max_share / np.maximum(share, 1e-9))
        print("categories in the k-means sample (share, first document):")
        for c in np.unique(fit_labels):
            print(f"  {c}: {share[c]:6.1%}  {fit[int(np.argmax(fit_labels == c))][:70]!r}")



def eval_texts(paths):
    """The items of the evaluation sets: a line of a .txt file, or every string value of a .jsonl line."""
    for path in filter(None, paths.split(",")):
        with open(path, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                if path.endswith(".jsonl"):
                    yield from (v for v in json.loads(line).values() if isinstance(v, str))
                else:
                    yield line


index = tf.ngram_index(eval_texts(decontam_files), decontam_ngram, decontam_ngram_cjk)
print(f"decontamination: {len(index):,} n-grams from {decontam_files or 'no evaluation sets'}")


def final_batch(docs):
    """In a worker, per document: (the document, contaminated spans, its text after an optional cut, its cluster,
    its token ids)."""
    spans = [tf.contaminated_spans(d["text"], index, decontam_ngram, decontam_ngram_cjk) for d in docs]
    texts = [tf.cut_spans(d["text"], sp) if sp and decontam_mode == "cut" else d["text"] for d, sp in zip(docs, spans)]
    clusters = tf.assign(tf.hashed_features(texts), centroids) if centroids is not None else [0] * len(docs)
    ids = encode_batch(enc, texts, num_threads=1)  # one thread per process: the processes are the parallelism
    return [(d, sp, text, int(c), np.array(t, dtype)) for d, sp, text, c, t in zip(docs, spans, texts, clusters, ids)]


def new_writer(name, split):
    return {"dir": os.path.join(out_dir, name), "split": split, "parts": [], "size": 0, "files": [], "tokens": 0,
            "documents": 0}


def flush(w, final):
    data = np.concatenate(w["parts"]) if w["parts"] else np.zeros(0, dtype)
    while len(data) >= shard_tokens or (final and len(data)):
        filename = f"{w['split']}_{len(w['files']):06d}.bin"
        data[:shard_tokens].astype("<" + np.dtype(dtype).str[1:]).tofile(os.path.join(w["dir"], filename))
        w["files"].append(filename)
        data = data[shard_tokens:]
    w["parts"], w["size"] = [data], len(data)


def write(w, ids):
    w["parts"].append(ids)
    w["size"] += len(ids)
    w["tokens"] += len(ids)
    w["documents"] += 1
    if w["size"] >= shard_tokens:
        flush(w, final=False)


# -----------------------------------------------------------------------------
# pass 3 per source: decontaminate, balance, tokenize in parallel (imap keeps the order), write shards

probe_hits = {i: [] for i in range(len(probe_terms))}
for name in sources:
    s = stats[name]
    for old in os.listdir(os.path.join(out_dir, name)):  # shards of an earlier run must not linger
        if old.endswith(".bin"):
            os.remove(os.path.join(out_dir, name, old))
    for i, d in enumerate(cleaned(name), offsets[name]):
        if labels[i] != i:
            reject(name, "fuzzy_dedup", "near_duplicate", d["text"])
    writers = {"train": new_writer(name, "train"), "val": new_writer(name, "val")}
    clusters, kept = np.zeros(max(1, balance_clusters), np.int64), 0
    with ctx.Pool(num_proc) as pool:
        for results in tqdm(pool.imap(final_batch, batched(unique_docs(name), batch_docs)),
                            desc=f"{name}: decontaminate + tokenize", unit="batch"):
            for d, spans, text, cluster, ids in results:
                if spans and decontam_mode == "drop":
                    reject(name, "decontaminate", "eval_ngram", d["text"])
                    continue
                # a fixed pseudo-random number per document (its exact hash), so the same documents are kept on rerun
                if keep_prob is not None and (d["hash"] % 1_000_003) / 1_000_003 >= keep_prob[cluster]:
                    reject(name, "balance", f"cluster_{cluster}", text)
                    continue
                s["docs_cut"] += bool(spans)  # kept, with the evaluation text cut out (decontam_mode="cut")
                for i, terms in enumerate(probe_terms):
                    if dedup.terms_cooccur(text, terms, probe_window):
                        probe_hits[i].append(text)
                write(writers["val" if kept % val_every == 0 else "train"], ids)
                kept += 1
                clusters[cluster] += 1
                count(s["languages"], d["lang"])
                s["chars_out"] += len(text)
    for w in writers.values():
        flush(w, final=True)
    s.update(docs_out=kept, tokens_train=writers["train"]["tokens"], tokens_val=writers["val"]["tokens"],
             clusters=clusters.tolist())
    meta = {"source": name, "dtype": np.dtype(dtype).name, "vocab_size": enc.n_vocab, "tokenizer_hash": tok_hash,
            **{split: {k: w[k] for k in ("files", "tokens", "documents")} for split, w in writers.items()},
            "shard_tokens": shard_tokens}
    with open(os.path.join(out_dir, name, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    os.remove(os.path.join(out_dir, name, "cleaned.jsonl"))

# -----------------------------------------------------------------------------
# report: stats.json and a table of what each step removed, per source

probes = [dedup.knowledge_frequency(probe_hits[i], terms, probe_window) for i, terms in enumerate(probe_terms)]
stats_all = {"config": config, "tokenizer_hash": tok_hash, "sources": stats, "probe": probes}
with open(os.path.join(out_dir, "stats.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(stats_all, f, indent=2, ensure_ascii=False)
os.replace(os.path.join(out_dir, "stats.json.tmp"), os.path.join(out_dir, "stats.json"))  # the data dir is complete
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
          + f"\n  removed {reasons or 'nothing'}; "
          f"{s['lines_removed']:,} lines cut; {s['docs_cut']} documents cut by decontamination; kept {s['languages']}")
for p in stats_all["probe"]:
    print(f"probe {p['terms']}: {p['documents']} documents, {p['distinct']} distinct after near-duplicate clustering")
print(f"wrote {out_dir} in {time.time() - t_start:.0f}s: tokenizer {enc.n_vocab:,} ids ({tok_hash[:12]}), "
      f"shards of {np.dtype(dtype).name}")
