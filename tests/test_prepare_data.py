"""Claims about prepare_data.py, on a small corpus the test writes: the shards decode back to exactly the kept
documents, each framed <|bos|> ... <|eos|>; planted exact and near duplicates, boilerplate lines, a line repeated
across documents and an evaluation question are removed; bad input (invalid UTF-8, a broken JSON line, an empty file,
an over-long line) is counted and skipped while nothing else is lost; two runs (1 and 2 processes) give the same
bytes; meta.json follows the contract train.py reads."""

import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import textfilters as tf  # noqa: E402
from tokenizer import load_tokenizer, special_id, tokenizer_hash  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
JA = open(os.path.join(DATA, "ja_sample.txt"), encoding="utf-8").read().split("\n\n")
EN = open(os.path.join(DATA, "en_sample.txt"), encoding="utf-8").read().split("\n\n")
CODE = open(os.path.join(DATA, "code_sample.txt"), encoding="utf-8").read()
QUESTION = ("Which animal in Japanese folklore changes its shape using a leaf placed on its head before tricking "
            "travellers?")
REPEATED = "Tanuki Weekly issue archive"
ADS = ["送料無料！今すぐ購入 ▶ こちらをクリック", "ホーム > ニュース > 動物 > タヌキ", "Copyright 2024 All Rights Reserved."]


def make_corpus(root):
    """Two sources; returns the documents expected in the shards, per source, in order."""
    web, code = os.path.join(root, "web"), os.path.join(root, "code")
    os.makedirs(web)
    os.makedirs(code)
    en = [EN[i] + " " + EN[(i + 4) % len(EN)] for i in range(len(EN))]  # pairs share at most one paragraph
    # three paragraphs at offsets {0, 1, 3}, whose differences mod 13 are all distinct: two documents share at most
    # one paragraph (Jaccard ~1/5, far below the LSH threshold)
    ja = ["\n".join(JA[(i + k) % len(JA)] for k in (0, 1, 3)) for i in range(len(JA))]
    kept = []
    lines = []
    for i, doc in enumerate(en):
        lines.append(json.dumps({"text": doc, "id": i}))
        kept.append(doc)
        if i == 0:  # an exact copy up to case and whitespace
            lines.append(json.dumps({"text": "  " + doc.upper().replace(" ", "  ")}))
        if i == 1:  # a near copy: one word changed
            near = doc.replace("raccoon", "badger", 1) if "raccoon" in doc else doc + " Yes."
            lines.append(json.dumps({"text": near}))
    lines.append(json.dumps({"text": en[2][:400] + " " + QUESTION + " " + en[3][:400] + "."}))  # contaminated
    with open(os.path.join(web, "a.jsonl"), "wb") as f:
        f.write("\n".join(lines[:5]).encode() + b"\n")
        f.write(b'{"text": "broken json line\n')
        f.write(b'{"text": "invalid utf-8 \xff\xfe here"}\n')
        f.write(json.dumps({"text": "x " * 5000}).encode() + b"\n")  # over max_line_bytes=5000
        f.write("\n".join(lines[5:]).encode() + b"\n")
    for i, doc in enumerate(ja):
        page = doc
        if i < 5:  # site chrome in 5 documents (each paragraph is in 3), cut by the line-count sketch
            page = REPEATED + "\n" + page
        if i == 6:
            page = ADS[0] + "\n" + ADS[1] + "\n" + page + "\n" + ADS[2]
        ja[i] = page
        kept.append(doc)
    with gzip.open(os.path.join(web, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in ja))
        f.write(json.dumps({"body": "a record without the text field"}) + "\n")
    open(os.path.join(web, "empty.jsonl"), "w").close()
    with open(os.path.join(web, "notes.txt"), "w", encoding="utf-8") as f:
        f.write(EN[5] + "\n" + EN[2])
    kept.append(EN[5] + "\n" + EN[2])
    modules = [CODE, "\n".join(f"def area_{shape}(a, b):\n    # the area of a {shape}\n    return {formula}\n"
                                for shape, formula in [("rectangle", "a * b"), ("triangle", "a * b / 2")]),
               "import math\n\n\nclass Circle:\n    def __init__(self, r):\n        self.r = r\n\n"
               "    def area(self):\n        return math.pi * self.r ** 2\n"]
    for i, module in enumerate(modules):
        with open(os.path.join(code, f"m{i}.py"), "w", encoding="utf-8") as f:
            f.write(module)
    code_kept = [tf.normalize(open(p, encoding="utf-8").read()) for p in sorted(glob.glob(os.path.join(code, "*.py")))]
    with open(os.path.join(root, "evals.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"question": QUESTION, "answer": "the tanuki"}) + "\n")
    return {"web": [tf.normalize(d) for d in kept], "code": code_kept}


def run(root, out, *extra):
    args = [sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={root}/web,{root}/code",
            f"--out_dir={out}", "--vocab_size=320", "--shard_tokens=3000", "--val_every=5", "--max_line_bytes=5000",
            f"--decontam_files={root}/evals.jsonl", "--repeated_line_min_docs=4", "--text_field=text",
            "--balance_clusters=2", "--write_rejects", *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_docs(out, source, split, enc, meta):
    ids = np.concatenate([np.fromfile(os.path.join(out, source, f), dtype=meta["dtype"]) for f in meta[split]["files"]])
    assert len(ids) == meta[split]["tokens"]
    bos, eos = special_id(enc, "<|bos|>"), special_id(enc, "<|eos|>")
    starts, ends = np.nonzero(ids == bos)[0], np.nonzero(ids == eos)[0]
    assert len(starts) == len(ends) == meta[split]["documents"] and starts[0] == 0 and ends[-1] == len(ids) - 1
    assert (starts[1:] == ends[:-1] + 1).all()  # documents back to back, nothing between them
    return [enc.decode(ids[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(str(root))
    out1, out2 = str(root / "out1"), str(root / "out2")
    stdout = run(str(root), out1, "--num_proc=2")
    run(str(root), out2, "--num_proc=1", "--batch_docs=3")
    return root, expected, out1, out2, stdout


def test_shards_decode_to_exactly_the_kept_documents(prepared):
    root, expected, out, _, stdout = prepared
    enc = load_tokenizer(out)
    print(stdout[-3000:])
    for source in ("web", "code"):
        with open(os.path.join(out, source, "meta.json")) as f:
            meta = json.load(f)
        assert meta["source"] == source and meta["dtype"] == "uint16" and meta["vocab_size"] == enc.n_vocab == 320
        assert meta["tokenizer_hash"] == tokenizer_hash(enc) and meta["shard_tokens"] == 3000
        train, val = read_docs(out, source, "train", enc, meta), read_docs(out, source, "val", enc, meta)
        assert val == expected[source][0::5]  # every 5th kept document, starting with the first
        assert train == [d for i, d in enumerate(expected[source]) if i % 5]
        sizes = [os.path.getsize(os.path.join(out, source, f)) for f in meta["train"]["files"]]
        assert all(s == 3000 * 2 for s in sizes[:-1]) and 0 < sizes[-1] <= 6000


def test_every_removal_is_counted_and_nothing_else_is_lost(prepared):
    _, expected, out, _, _ = prepared
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)["sources"]
    web = stats["web"]
    assert web["bad_input"] == {"broken_json": 1, "invalid_utf8": 1, "line_too_long": 1, "empty_file": 1,
                                "missing_field": 1}
    assert web["removed"] == {"exact_dedup": {"exact_duplicate": 1}, "fuzzy_dedup": {"near_duplicate": 1},
                              "decontaminate": {"eval_ngram": 1}}
    assert web["docs_out"] == len(expected["web"]) and web["lines_removed"] == 5 + len(ADS)
    assert stats["code"]["removed"] == {} and stats["code"]["docs_out"] == 3
    with open(os.path.join(out, "web", "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert sorted(r["reason"] for r in rejects) == ["eval_ngram", "exact_duplicate", "near_duplicate"]
    assert QUESTION in next(r["text"] for r in rejects if r["reason"] == "eval_ngram")


def test_two_runs_give_identical_bytes(prepared):
    _, _, out1, out2, _ = prepared  # 2 processes with batches of 64 vs 1 process with batches of 3
    files = sorted(os.path.relpath(p, out1) for p in glob.glob(os.path.join(out1, "**", "*"), recursive=True)
                   if os.path.isfile(p) and not p.endswith("stats.json"))  # stats.json records the settings
    assert files == sorted(os.path.relpath(p, out2) for p in glob.glob(os.path.join(out2, "**", "*"), recursive=True)
                           if os.path.isfile(p) and not p.endswith("stats.json"))
    assert any(f.endswith(".bin") for f in files)
    for f in files:
        with open(os.path.join(out1, f), "rb") as a, open(os.path.join(out2, f), "rb") as b:
            assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest(), f


def test_cut_mode_category_balance_and_probe(prepared):
    root, expected, out, _, _ = prepared
    out3 = str(root / "out3")
    run(str(root), out3, f"--tokenizer={out}", "--decontam_mode=cut", "--balance_max_share=0.3",
        "--probe_terms=[['タヌキ', 'ため糞']]", "--probe_window=100")
    with open(os.path.join(out3, "stats.json")) as f:
        stats = json.load(f)
    web = stats["sources"]["web"]
    probe = stats["probe"][0]  # the knowledge-frequency probe runs over the kept documents
    assert probe["terms"] == ["タヌキ", "ため糞"] and probe["documents"] >= probe["distinct"] >= 1
    assert web["docs_cut"] == 1 and "decontaminate" not in web["removed"]  # kept, with the question cut out
    balanced = sum(web["removed"]["balance"].values())
    assert balanced > 0 and web["docs_out"] == len(expected["web"]) + 1 - balanced
    with open(os.path.join(out3, "web", "meta.json")) as f:
        meta = json.load(f)
    enc = load_tokenizer(out)
    docs = read_docs(out3, "web", "train", enc, meta) + read_docs(out3, "web", "val", enc, meta)
    assert not any(QUESTION[:40] in d for d in docs) and any(EN[2][:100] in d for d in docs)


def test_builtin_corpus_needs_nothing_downloaded(tmp_path):
    out = str(tmp_path / "out")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--out_dir={out}", "--max_docs=40",
                             "--builtin_ja_docs=60", "--vocab_size=400"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for source in ("en_docs", "code", "ja_synthetic"):
        with open(os.path.join(out, source, "meta.json")) as f:
            meta = json.load(f)
        assert meta["train"]["tokens"] > 0 and meta["val"]["documents"] > 0, source


def test_unknown_threshold_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--out_dir={tmp_path}",
                             "--thresholds={'min_word': 3}"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "min_word" in result.stderr and "min_words" in result.stderr


def test_zstd_and_parquet_inputs(tmp_path):
    """Optional formats: run only where Python >= 3.14 (compression.zstd) or zstandard, and pyarrow, are installed."""
    docs = ["\n".join(EN[i:i + 3]) for i in range(0, 9, 3)]
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    written = []
    try:
        from compression import zstd
        with zstd.open(tmp_path / "a.jsonl.zst", "wb") as f:
            f.write(jsonl)
        written.append("a.jsonl.zst")
    except ImportError:
        try:
            import zstandard
            with open(tmp_path / "a.jsonl.zst", "wb") as f:
                f.write(zstandard.ZstdCompressor().compress(jsonl))
            written.append("a.jsonl.zst")
        except ImportError:
            pass
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet")
        written.append("b.parquet")
    except ImportError:
        pass
    if not written:
        pytest.skip("neither zstd (Python >= 3.14 or zstandard) nor pyarrow is installed")
    out = tmp_path / "out"
    for name in written:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={tmp_path / name}",
                                 f"--out_dir={out}", "--vocab_size=300", "--balance_clusters=0"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        with open(out / name.split(".")[0] / "meta.json") as f:
            meta = json.load(f)
        assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs), name


def test_unfiltered_sources_keep_short_synthetic_documents(prepared, tmp_path):
    # synth.py's pretraining form: short "user: ... assistant: ..." documents that the web filters drop wholesale
    root, _, out, _, _ = prepared
    synth = tmp_path / "synth.jsonl"
    docs = [f"user: {a} + {b} は？\nassistant: {a + b} です。" if i % 2 else
            f"user: What is {a} times {b}?\nassistant: {a * b}." for i, (a, b) in
            enumerate((a, b) for a in range(11, 31, 3) for b in range(7, 97, 11))]
    synth.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs + docs[:3]))
    for extra, kept in (([], 0), (["--unfiltered_sources=['synth']"], None)):
        target = tmp_path / f"out{len(extra)}"
        result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={synth}",
                                 f"--tokenizer={out}", f"--out_dir={target}", *extra],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        stats = json.loads((target / "stats.json").read_text())["sources"]["synth"]
        if kept == 0:
            assert stats["docs_out"] == 0 and set(stats["removed"]) <= {"filter", "language"}
        else:  # only the 3 exact copies go (dedup still applies); nothing is filtered
            assert "filter" not in stats["removed"] and stats["removed"]["exact_dedup"] == {"exact_duplicate": 3}
            assert stats["docs_out"] + sum(stats["removed"].get("fuzzy_dedup", {}).values()) == len(docs)
            assert stats["docs_out"] > len(docs) // 2
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={synth}",
                          f"--tokenizer={out}", f"--out_dir={tmp_path / 'bad'}", "--unfiltered_sources=['synt']"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "synt" in bad.stderr
