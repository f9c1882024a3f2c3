"""Claims about prepare_data.py, on a small corpus the test writes: the shards decode back to exactly the kept
documents, each framed <|bos|> ... <|eos|>; planted exact and near duplicates, boilerplate lines, a line repeated
across documents and an evaluation question are removed; bad input (invalid UTF-8, a broken JSON line, an empty file,
an over-long line; issue 15's lone surrogate, truncated .gz, deep nesting, unreadable file, .json values, directories
named *.json, large .txt files) is counted by reason with file:line and skipped while nothing else is lost; two runs
(1 and 2 processes) give the same bytes; meta.json follows the contract train.py reads."""

import glob
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import zlib

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
    assert web["bad_records"] == {"broken_json": 1, "invalid_utf8": 1, "line_too_long": 1, "missing_field": 1}
    assert web["bad_files"] == {"empty_file": 1}
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


WORDS = ("tanuki fox badger forest river mountain village leaf shape travel night moon rice field shrine road "
         "story winter spring autumn summer lantern bridge market").split()


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    """Issue 15: one source whose good files sit beside one bad file per case, read with the filters off
    (unfiltered_sources) so that every good document must reach the shards, in file order."""
    root = tmp_path_factory.mktemp("robust")
    src = root / "mixed"
    (src / "x.json").mkdir(parents=True)  # a directory named like a JSON file, holding JSONL
    rng = random.Random(0)

    def doc(n=60):
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    def rec(text):
        return json.dumps({"text": text})
    good = {}  # file -> its good documents

    def jsonl(name, *lines):
        (src / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        good[name] = [json.loads(line)["text"] for line in lines if line.startswith('{"text": "') and
                      "\\ud800" not in line and line.endswith('"}')]
    jsonl("good.jsonl", rec(doc()), "", rec(doc()))
    (src / "good.jsonl").write_bytes(b"\xef\xbb\xbf" + (src / "good.jsonl").read_bytes())  # a byte-order mark
    jsonl("surrogate.jsonl", rec(doc()), '{"text": "a lone \\ud800 surrogate"}', rec(doc()))  # valid JSON
    jsonl("deep.jsonl", rec(doc()), "[" * 100_000, rec(doc()))
    jsonl("broken.jsonl", rec(doc()), '{"text": "cut short', rec(doc()))
    jsonl("x.json/inner.jsonl", rec(doc()))
    records = [rec(doc(200)) for _ in range(40)]
    data = gzip.compress("".join(r + "\n" for r in records).encode())
    (src / "trunc.jsonl.gz").write_bytes(data[:len(data) // 2])
    complete = zlib.decompressobj(31).decompress(data[:len(data) // 2]).split(b"\n")[:-1]  # lines before the cut
    good["trunc.jsonl.gz"] = [json.loads(line)["text"] for line in complete]
    (src / "notgz.jsonl.gz").write_text(rec(doc()))  # not gzip at all
    array = [{"text": doc()}, doc(), {"title": "no text"}, {"text": doc()}]
    (src / "arr.json").write_text(json.dumps(array))
    good["arr.json"] = [array[0]["text"], array[1], array[3]["text"]]
    one = doc()
    (src / "one.json").write_text(json.dumps({"text": one}))
    good["one.json"] = [one]
    (src / "huge.json").write_text(json.dumps([doc() for _ in range(30)]))  # over --max_json_bytes=5000
    paragraphs = [doc(rng.randint(20, 80)) for _ in range(60)]
    (src / "big.txt").write_text("\n\n".join(paragraphs) + "\n")
    out = root / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={src}",
                             f"--out_dir={out}", "--vocab_size=300", "--unfiltered_sources=['mixed']",
                             "--balance_clusters=0", "--val_every=1000", "--text_doc_chars=2000",
                             "--max_json_bytes=5000"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((out / "stats.json").read_text())["sources"]["mixed"]
    enc = load_tokenizer(str(out))
    meta = json.loads((out / "mixed" / "meta.json").read_text())
    docs = read_docs(str(out), "mixed", "val", enc, meta) + read_docs(str(out), "mixed", "train", enc, meta)
    return src, good, paragraphs, complete, stats, docs, result.stdout, out


def test_bad_records_and_files_are_counted_with_their_place_and_good_documents_kept(robust):
    src, good, paragraphs, complete, stats, docs, stdout, _ = robust
    assert stats["bad_records"] == {"lone_surrogate": 1, "nested_too_deep": 1, "broken_json": 1, "missing_field": 1}
    assert stats["bad_files"] == {"truncated": 1, "unreadable_file": 1, "json_too_large": 1}
    examples = stats["bad_examples"]
    assert examples["lone_surrogate"] == [f"{src}/surrogate.jsonl:2"]
    assert examples["nested_too_deep"] == [f"{src}/deep.jsonl:2"]
    assert examples["broken_json"] == [f"{src}/broken.jsonl:2"]
    assert examples["missing_field"] == [f"{src}/arr.json[2]"]
    assert examples["truncated"] == [f"{src}/trunc.jsonl.gz:{len(complete)}"]  # the last whole line before the cut
    assert examples["unreadable_file"][0].startswith(f"{src}/notgz.jsonl.gz:0 (BadGzipFile")
    assert examples["json_too_large"][0].startswith(f"{src}/huge.json (over max_json_bytes=5,000")
    assert f"lone_surrogate first at {src}/surrogate.jsonl:2" in stdout
    assert 10 <= len(complete) < 40  # the truncated file kept its records before the cut
    # every good document, in file order (big.txt: its pieces, checked in the next test)
    n_big = len(docs) - sum(len(v) for v in good.values())
    before = [t for name in sorted(good) if name < "big.txt" for t in good[name]]
    after = [t for name in sorted(good) if name > "big.txt" for t in good[name]]
    assert docs[:len(before)] == [tf.normalize(t) for t in before]
    assert docs[len(before) + n_big:] == [tf.normalize(t) for t in after]
    assert stats["docs_in"] == stats["docs_out"] == len(docs)


def test_text_file_is_cut_at_blank_lines_into_bounded_documents(robust):
    _, good, paragraphs, _, _, docs, _, _ = robust
    before = sum(len(v) for name, v in good.items() if name < "big.txt")
    pieces = docs[before:before + len(docs) - sum(len(v) for v in good.values())]
    assert len(pieces) >= sum(map(len, paragraphs)) / 2000 and all(len(p) <= 2000 for p in pieces)
    assert "\n\n".join(pieces) == "\n\n".join(paragraphs)  # nothing lost, nothing repeated
    assert all(set(p.split("\n\n")) <= set(paragraphs) for p in pieces)  # cut between paragraphs only


def test_text_file_is_read_one_document_at_a_time(robust, tmp_path):
    """A reader that takes the whole file before its first document would meet the invalid line at the end of this
    5 MB file and count it; a streaming one stops after the --max_docs=2 documents, near the start."""
    _, _, _, _, _, _, _, out = robust
    with open(tmp_path / "big.txt", "wb") as f:
        for i in range(50_000):
            f.write(f"paragraph {i}: ".encode() + b"the tanuki walks along the river at night. " * 2 + b"\n\n")
        f.write(b"an invalid byte \xff at the end\n")
    assert os.path.getsize(tmp_path / "big.txt") > 5_000_000
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={tmp_path / 'big.txt'}",
                             f"--out_dir={tmp_path / 'out'}", f"--tokenizer={out}", "--max_docs=2",
                             "--unfiltered_sources=['big']", "--text_doc_chars=5000", "--balance_clusters=0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["big"]
    assert stats["docs_in"] == 2 and stats["bad_records"] == {} and 4000 < stats["chars_in"] <= 10_000


def test_a_source_of_only_a_lone_surrogate_finishes(robust, tmp_path):
    _, _, _, _, _, _, _, out = robust
    only = tmp_path / "only.jsonl"
    only.write_text('{"text": "a lone \\ud800 surrogate"}\n')
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={only}",
                             f"--out_dir={tmp_path / 'out'}", f"--tokenizer={out}", "--num_proc=2"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)  # the timeout: a hang guard only
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["only"]
    assert stats["bad_records"] == {"lone_surrogate": 1} and stats["docs_out"] == 0


def test_missing_input_is_an_error_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--input=/missing/path/x.jsonl",
                             f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)  # a hang guard
    assert result.returncode != 0 and "/missing/path/x.jsonl" in result.stderr


def test_a_document_that_makes_a_step_raise_is_counted_not_fatal(robust, tmp_path):
    """No step should raise on a valid string, but if one does in a worker, that document is dropped and counted
    (removed: clean: error_<type>) and the run goes on: a step that fails on "BOOM" is planted in textfilters."""
    src, good, _, _, _, _, _, out = robust
    (tmp_path / "boom.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                 good["good.jsonl"] + ["BOOM " + good["one.json"][0]]))
    plant = ("import runpy, sys, textfilters as tf\n"
             "language = tf.detect_language\n"
             "def detect(text):\n"
             "    if text.startswith('BOOM'):\n"
             "        raise ValueError('planted')\n"
             "    return language(text)\n"
             "tf.detect_language = detect\n"
             "sys.argv = ['prepare_data.py'] + sys.argv[1:]\n"
             "runpy.run_path('prepare_data.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", plant, f"--input={tmp_path / 'boom.jsonl'}",
                             f"--out_dir={tmp_path / 'out'}", f"--tokenizer={out}", "--unfiltered_sources=['boom']",
                             "--num_proc=2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["boom"]
    assert stats["removed"] == {"clean": {"error_ValueError": 1}} and stats["docs_out"] == len(good["good.jsonl"])


# -----------------------------------------------------------------------------
# many ranks and a killed run: the same bytes

def prose(rng, n=120):
    """English-like text of the words of the sample (their frequencies kept, so stop words come often): passes the
    quality filters, and two such documents share almost no 5-grams."""
    words = " ".join(EN).replace(".", "").replace(",", "").split()
    return " ".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n // 12))


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Two sources of 6 files each; copies across files and sources, placed after their originals: an exact copy
    (case and spaces changed), a near copy, a chain of near copies over three files (A ~ B ~ C), and a line of site
    chrome in 5 documents of each source. Returns the corpus and a one-rank run's output."""
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(1)
    files = [[prose(rng) for _ in range(10)] for _ in range(12)]
    files[7][3] = "  " + files[1][2].upper().replace(" ", "  ")  # exact copy, in the other source
    files[9][0] = files[2][5].replace(" ", " fox ", 1)  # near copy: one word more
    files[4][1] = files[3][1].replace(" ", " badger ", 1)  # a chain: 3 ~ 4 ~ 8
    files[8][6] = files[4][1].rsplit(" ", 3)[0] + " river village night."
    for i in (0, 1, 2, 3, 5, 6, 7, 8, 10, 11):  # a chrome line in 5 files of each source (repeated_line_min_docs=4)
        files[i][i % 10] = REPEATED + "\n" + files[i][i % 10]
    for i, docs in enumerate(files):
        (root / "ab"[i // 6]).mkdir(exist_ok=True)
        (root / "ab"[i // 6] / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "one"
    result = subprocess.run(many_args(root, out), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, out


def many_args(root, out, launcher=None):
    return (launcher or [sys.executable]) + [
        os.path.join(ROOT, "prepare_data.py"), f"--input={root}/a,{root}/b", f"--out_dir={out}", "--vocab_size=300",
        "--shard_tokens=1000", "--val_every=7", "--repeated_line_min_docs=4", "--balance_clusters=2",
        "--balance_max_share=0.6", "--minhash_threshold=0.7", "--num_proc=1"]


def same_output(one, other):
    """Every file of two data dirs is byte-identical, except that stats.json records the run's own settings."""
    def listing(d):
        return sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "**", "*"), recursive=True)
                      if os.path.isfile(p))
    assert listing(one) == listing(other) and any(f.endswith(".bin") for f in listing(one))
    for f in listing(one):
        a, b = open(os.path.join(one, f), "rb").read(), open(os.path.join(other, f), "rb").read()
        if f == "stats.json":
            a, b = json.loads(a), json.loads(b)
            for s in (a, b):
                del s["world_size"], s["config"]["out_dir"]
        assert a == b, f


def test_one_two_and_three_ranks_write_the_same_bytes(many):
    root, one = many
    stats = json.loads((one / "stats.json").read_text())
    a, b = stats["sources"]["a"], stats["sources"]["b"]
    assert b["removed"]["exact_dedup"] == {"exact_duplicate": 1}  # a copy of source a's document
    assert a["removed"]["fuzzy_dedup"] == {"near_duplicate": 1} and b["removed"]["fuzzy_dedup"] == {"near_duplicate": 2}
    assert a["lines_removed"] == b["lines_removed"] == 5 and sum(a["removed"]["balance"].values()) > 0
    for n in (2, 3):
        out = root / f"ranks{n}"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        result = subprocess.run(many_args(root, out, torchrun), capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.loads((out / "stats.json").read_text())["world_size"] == n
        same_output(one, out)


def test_a_run_killed_while_writing_the_second_source_resumes_to_the_same_bytes(many, tmp_path):
    """kill -9 at the first shard write of source b (source a committed, b's tokens on disk, b.tmp half made); the
    rerun skips what is done (cleaning, dedup, tokenizer, categories, source a) and gives the same bytes."""
    root, one = many
    out = tmp_path / "out"
    kill = ("import os, runpy, signal, sys\n"
            "real_open = os.open\n"
            "def open_or_die(path, flags, *args, **kwargs):\n"
            f"    if str(path).startswith({str(out / 'b.tmp')!r}) and flags & os.O_WRONLY:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real_open(path, flags, *args, **kwargs)\n"
            "os.open = open_or_die\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    killed = subprocess.run(many_args(root, out, [sys.executable, "-c", kill]), capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert (out / "a" / "meta.json").exists() and (out / "b.tmp").exists() and not (out / "stats.json").exists()
    a_shards = {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()}
    rerun = subprocess.run(many_args(root, out), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "clean + filter" not in rerun.stderr and "a: decontaminate" not in rerun.stderr
    assert "b: decontaminate + tokenize" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()} == a_shards  # source a untouched
    same_output(one, out)
