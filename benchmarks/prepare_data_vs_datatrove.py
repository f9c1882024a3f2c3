"""
The whole data stage, ours (prepare_data.py) against datatrove doing the same steps, on one input: wall time (MB/s
of input JSONL), CPU seconds and peak memory of each process tree, and the documents and tokens each keeps.

    python -m venv /tmp/dt_venv && /tmp/dt_venv/bin/pip install datatrove==0.10.1 "spacy[ja]" tokenizers xxhash orjson
    python benchmarks/prepare_data_vs_datatrove.py --datatrove_python=/tmp/dt_venv/bin/python [--docs=N --workers=N]

The input, all of it text found offline: English documents of random prose paragraphs of the Python standard
library's docstrings, Japanese ones of random sentences of tests/data/ja_sample.txt, and copies of earlier
documents, exact or with a few words (Japanese: characters) changed, so that both dedups have work. A BPE tokenizer
is trained on it first (not timed) and both sides get that vocab: ours as tokenizer.tiktoken, datatrove as
tokenizer.json (tokenizer.save_hf_tokenizer).
  ours: prepare_data.py --input=CORPUS --tokenizer=DIR --num_proc=workers, the rest default: repeated-line count,
        line cleaning, language, quality and repetition filters, exact dedup, MinHash 14 x 8 of 5-grams, (no eval
        sets to decontaminate), the k-means category report, tokenizing, shards.
  datatrove: JsonlReader -> language tag -> Gopher repetition, Gopher quality, FineWeb quality -> JsonlWriter per
        language; then per language (FineWeb-2 dedups each language apart) MinHash's 4 stages, 14 x 8 of 5-grams:
        signatures, buckets, clusters, and the filter feeding DocumentTokenizer. tasks = input files.
        Not in it: fasttext language id (its models come from a hub; the tag here is "has kana", costing nothing),
        the repeated-line pass, line cleaning, exact dedup (MinHash catches exact copies too), the k-means report.
        Japanese words come from spaCy + SudachiPy (datatrove's word tokenizer for "ja"); Gopher's English
        word-length and stop-word rules are off and the line-punctuation threshold is FineWeb-2's 0.096, as ours.
Both tokenize with one thread per worker (ours encodes so; TOKENIZERS_PARALLELISM=false for datatrove).
"""

import ast
import json
import os
import random
import re
import resource
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

# -----------------------------------------------------------------------------
# config: --key=value overrides any of these
docs = 25_000                 # documents in the input: 30 MB, ours ~30 s and datatrove ~3 min on 2 cores
shards = 8                    # input JSONL files: datatrove parallelizes over files, so several per worker
workers = 2                   # ours --num_proc, datatrove's workers
near_dup_share = 0.20         # documents that copy an earlier one with a few edits
exact_dup_share = 0.05        # documents that copy an earlier one verbatim
ja_share = 0.30               # Japanese documents among the fresh ones
vocab_size = 4096             # the shared tokenizer (prepare_data.py's default)
datatrove_python = ""         # a python with datatrove installed; empty: time ours only
work_dir = ""                 # empty: a temporary directory, removed at the end
result_json = "out/benchmarks/prepare_data_vs_datatrove.json"
seed = 0
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]
for arg in sys.argv[1:] if sys.argv[1:2] != ["--_measure"] else []:
    key, _, value = arg[2:].partition("=")
    if key not in config_keys:
        sys.exit(f"unknown option {arg}; valid: {', '.join('--' + k for k in config_keys)}")
    globals()[key] = value if isinstance(globals()[key], str) else type(globals()[key])(ast.literal_eval(value))
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(cmd, log_path):
    """Run cmd; return wall seconds, CPU seconds and memory of its whole process tree. Runs in a fresh process
    (--_measure) because ru_maxrss of RUSAGE_CHILDREN is a maximum over every child a process ever waited for. It
    makes itself a child subreaper, so workers orphaned by their parent (datatrove's forkserver) are reparented to
    it and reaped here: getrusage(RUSAGE_CHILDREN) then counts the CPU time of every process of the tree."""
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    peak, done = {"Rss": 0, "Pss": 0}, threading.Event()

    def sample():  # every 0.2 s: Rss and Pss (shared pages split between their processes) summed over descendants
        while not done.wait(0.2):
            parent = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        parent[int(pid)] = int(f.read().rpartition(")")[2].split()[1])
                except OSError:  # the process ended between listdir and open: it has no memory to count
                    continue
            mine = {os.getpid()}
            while new := {pid for pid, ppid in parent.items() if ppid in mine} - mine:  # a generation per pass
                mine |= new
            total = {"Rss": 0, "Pss": 0}
            for pid in mine - {os.getpid()}:
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        for line in f:
                            if line[:4] in ("Rss:", "Pss:"):
                                total[line[:3]] += int(line.split()[1]) << 10
                except OSError:  # ended since it was listed
                    continue
            peak.update({k: max(peak[k], total[k]) for k in peak})

    before, thread = resource.getrusage(resource.RUSAGE_CHILDREN), threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        thread.start()
        proc.wait()
    wall = time.perf_counter() - t0
    while True:  # reap the orphans, so that their CPU time is counted
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    done.set()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"returncode": proc.returncode, "wall_s": wall,
            "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
            "peak_tree_rss_mb": peak["Rss"] / 2**20, "peak_tree_pss_mb": peak["Pss"] / 2**20,
            "max_process_rss_mb": after.ru_maxrss / 1024}  # ru_maxrss is in kilobytes on Linux


if sys.argv[1:2] == ["--_measure"]:  # internal: --_measure RESULT_JSON LOG -- cmd ...
    with open(sys.argv[2], "w") as f:
        json.dump(measure(sys.argv[5:], sys.argv[3]), f)
    sys.exit(0)


# -----------------------------------------------------------------------------
# the input

def docstring_paragraphs():
    root, skip = sysconfig.get_paths()["stdlib"], {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                try:
                    tree = ast.parse(f.read())
                except SyntaxError:
                    continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield from (p.strip() for p in (ast.get_docstring(node) or "").split("\n\n") if p.strip())


def write_corpus(corpus_dir):
    rng = random.Random(seed)
    # prose paragraphs only (>= 90% plain words): code-like ones fail Gopher's 80%-alphabetic-words rule on
    # datatrove's side, whose spaCy words include punctuation and symbols, and pass ours (whitespace words)
    plain = re.compile(r"^[A-Za-z][a-z'-]*[.,;:]?$")
    paragraphs = [p for p in docstring_paragraphs() if ">>>" not in p and len(p.split()) >= 8
                  and sum(bool(plain.match(w)) for w in p.split()) >= 0.9 * len(p.split())]
    with open(os.path.join(ROOT, "tests", "data", "ja_sample.txt"), encoding="utf-8") as f:
        sentences = [s + "。" for s in f.read().replace("\n", "").split("。") if s.strip()]
    words = sorted({w for p in paragraphs for w in p.split() if w.isalpha()})
    chars = sorted({c for s in sentences for c in s if "\u3040" <= c <= "\u9fff"})

    def fresh():
        if rng.random() < ja_share:  # 12-20 distinct sentences (a repeated one is the repetition filters' to
            s = rng.sample(sentences, rng.randint(12, 20))  # find) in 3-4 paragraphs: 450-900 characters
            cuts = sorted(rng.sample(range(1, len(s)), rng.randint(2, 3)))
            return "\n".join("".join(s[a:b]) for a, b in zip([0] + cuts, cuts + [len(s)]))
        return "\n\n".join(rng.sample(paragraphs, rng.randint(4, 10)))

    def edited(text):  # one word in 60, or one Japanese character in 150: 5-gram Jaccard ~0.85-0.9 on both sides
        if re.search("[\u3040-\u30ff]", text):
            t = list(text)
            for i in rng.sample(range(len(t)), max(1, len(t) // 150)):
                t[i] = rng.choice(chars) if "\u3040" <= t[i] <= "\u9fff" else t[i]
            return "".join(t)
        t = text.split(" ")
        for i in rng.sample(range(len(t)), max(1, len(t) // 60)):
            t[i] = rng.choice(words)
        return " ".join(t)

    texts = [fresh()]
    for _ in range(docs - 1):
        r = rng.random()
        texts.append(rng.choice(texts) if r < exact_dup_share else edited(rng.choice(texts))
                     if r < exact_dup_share + near_dup_share else fresh())
    os.makedirs(corpus_dir, exist_ok=True)
    for s in range(shards):  # contiguous slices, so that both sides see the documents in the same order
        with open(os.path.join(corpus_dir, f"part_{s:03d}.jsonl"), "w", encoding="utf-8") as f:
            for j in range(s * docs // shards, (s + 1) * docs // shards):
                f.write(json.dumps({"id": str(j), "text": texts[j]}, ensure_ascii=False) + "\n")
    return texts


# -----------------------------------------------------------------------------
# datatrove's side: a script for the other venv (its forkserver workers import it, hence the __main__ guard)
DATATROVE_SCRIPT = r'''
import json, os, re, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter

corpus, out, workers, tokenizer_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tasks = len(os.listdir(corpus))


class ScriptLanguage(PipelineStep):  # stands in for fasttext language id, whose model a hub would supply
    type, name = "🏷 - TAGGER", "language: has kana"

    def run(self, data, rank=0, world_size=1):
        for doc in data:
            doc.metadata["language"] = "ja" if re.search("[\u3040-\u30ff]", doc.text) else "en"
            yield doc


class OnlyLanguage(BaseFilter):  # FineWeb-2 runs a pipeline per language; here one pass, each filter per language
    def __init__(self, language, inner):
        self.language, self.inner, self.name = language, inner, f"{inner.name} [{language}]"
        super().__init__()  # after the name: the stats are labelled with it

    def filter(self, doc):
        return doc.metadata["language"] != self.language or self.inner.filter(doc)


def run(name, pipeline, n_tasks):
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                          logging_dir=f"{out}/logs/{name}").run()
    seconds[name] = time.perf_counter() - t0


if __name__ == "__main__":
    seconds, ja = {}, dict(language="ja")
    filters = [OnlyLanguage("en", f) for f in (GopherRepetitionFilter(), GopherQualityFilter(), FineWebQualityFilter())]
    filters += [OnlyLanguage("ja", f) for f in (GopherRepetitionFilter(**ja), GopherQualityFilter(
        min_avg_word_length=None, max_avg_word_length=None, min_stop_words=None, **ja),
        FineWebQualityFilter(line_punct_thr=0.096, **ja))]
    run("filter", [JsonlReader(corpus), ScriptLanguage(), *filters, JsonlWriter(
        f"{out}/filtered", output_filename="${language}/${rank}.jsonl", compression=None)], tasks)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    for lang in sorted(os.listdir(f"{out}/filtered")):
        mh, filtered = f"{out}/minhash/{lang}", f"{out}/filtered/{lang}"
        run(f"{lang} signatures", [JsonlReader(filtered), MinhashDedupSignature(f"{mh}/sigs", config, language=lang)],
            tasks)
        run(f"{lang} buckets", [MinhashDedupBuckets(f"{mh}/sigs", f"{mh}/buckets", config=config)], config.num_buckets)
        run(f"{lang} clusters", [MinhashDedupCluster(f"{mh}/buckets", f"{mh}/remove_ids", config=config)], 1)
        run(f"{lang} filter + tokenize", [JsonlReader(filtered), MinhashDedupFilter(f"{mh}/remove_ids"),
            DocumentTokenizer(f"{out}/tokens/{lang}", tokenizer_json, eos_token="<|eos|>", shuffle_documents=False)],
            tasks)
    with open(f"{out}/stage_seconds.json", "w") as f:
        json.dump(seconds, f)
'''


def timed(name, cmd, env=None):
    """cmd through --_measure, in a fresh process; its output goes to WORK/<name>.log."""
    result, log = os.path.join(work, f"{name}.measure.json"), os.path.join(work, f"{name}.log")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", result, log, "--", *cmd], check=True,
                   env={**os.environ, **(env or {})})
    with open(result) as f:
        r = json.load(f)
    if r["returncode"]:
        sys.exit(f"{name} failed (exit {r['returncode']}): see {log}")
    return r


def datatrove_kept(tokens_dir):
    """{language: (documents, tokens)} of datatrove's output: a .ds holds uint16 ids, its .ds.index a uint64 each
    document."""
    size = os.path.getsize
    return {lang: (sum(size(os.path.join(d, f)) // 8 for d, _, fs in os.walk(os.path.join(tokens_dir, lang))
                       for f in fs if f.endswith(".ds.index")),
                   sum(size(os.path.join(d, f)) // 2 for d, _, fs in os.walk(os.path.join(tokens_dir, lang))
                       for f in fs if f.endswith(".ds"))) for lang in sorted(os.listdir(tokens_dir))}


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from tokenizer import save_hf_tokenizer, save_tokenizer, train_tokenizer

    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="bench_data_")
    work = work_dir or tmp.name
    corpus_dir, tok_dir = os.path.join(work, "corpus"), os.path.join(work, "tokenizer")
    texts = write_corpus(corpus_dir)
    mb = sum(os.path.getsize(os.path.join(corpus_dir, f)) for f in os.listdir(corpus_dir)) / 1e6
    print(f"input: {docs:,} documents, {mb:.1f} MB in {shards} files ({work}); {workers} workers")
    enc = train_tokenizer(texts[:5000], vocab_size)
    save_tokenizer(enc, tok_dir)
    save_hf_tokenizer(enc, tok_dir)
    del texts

    ours_out = os.path.join(work, "ours")
    results = {"ours": timed("ours", [sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={corpus_dir}",
                                      f"--out_dir={ours_out}", f"--tokenizer={tok_dir}", f"--num_proc={workers}"])}
    with open(os.path.join(ours_out, "stats.json"), encoding="utf-8") as f:
        s = json.load(f)["sources"]["corpus"]
    results["ours"].update(docs_kept=s["docs_out"], tokens=s["tokens_train"] + s["tokens_val"],
                           kept_by_language=s["languages"],
                           removed={step: sum(r.values()) for step, r in s["removed"].items()})
    if datatrove_python:
        script, dt_out = os.path.join(work, "datatrove_pipeline.py"), os.path.join(work, "datatrove")
        with open(script, "w", encoding="utf-8") as f:
            f.write(DATATROVE_SCRIPT)
        results["datatrove"] = r = timed("datatrove", [datatrove_python, script, corpus_dir, dt_out, str(workers),
                                                       os.path.join(tok_dir, "tokenizer.json")],
                                         env={"TOKENIZERS_PARALLELISM": "false"})
        kept = datatrove_kept(os.path.join(dt_out, "tokens"))
        with open(os.path.join(dt_out, "stage_seconds.json")) as f:
            r.update(docs_kept=sum(n for n, _ in kept.values()), tokens=sum(t for _, t in kept.values()),
                     kept_by_language={lang: n for lang, (n, _) in kept.items()}, stage_seconds=json.load(f))

    print(f"\n{'':10} {'wall s':>7} {'MB/s':>5} {'CPU s':>6} {'tree RSS MB':>11} {'tree PSS MB':>11} "
          f"{'max proc MB':>11} {'docs kept':>9} {'tokens':>10}  by language")
    for name, r in results.items():
        r["mb_per_s"] = mb / r["wall_s"]
        print(f"{name:10} {r['wall_s']:7.1f} {r['mb_per_s']:5.2f} {r['cpu_s']:6.1f} {r['peak_tree_rss_mb']:11.0f} "
              f"{r['peak_tree_pss_mb']:11.0f} {r['max_process_rss_mb']:11.0f} {r['docs_kept']:9,} {r['tokens']:10,}  "
              f"{r['kept_by_language']}")
    print("ours removed:", results["ours"]["removed"])
    if "datatrove" in results:
        print("datatrove stages (s):", ", ".join(f"{k} {v:.1f}" for k, v in
                                               results["datatrove"]["stage_seconds"].items()))
    os.makedirs(os.path.dirname(os.path.abspath(result_json)), exist_ok=True)
    with open(result_json, "w") as f:
        json.dump({"config": {k: globals()[k] for k in config_keys}, "input_mb": mb, "cpus": os.cpu_count(),
                   "results": results}, f, indent=2)
    print(f"wrote {result_json}")
    if tmp:
        tmp.cleanup()
