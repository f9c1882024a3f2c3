"""
Reading a corpus from files, for prepare_data.py (and any stage that reads raw text): documents from the formats
web-scale data comes in, each file read by its own extension after .gz / .zst: .jsonl / .ndjson a record per line,
.json one value (an array of records or strings, or one record), .parquet a column, anything else plain text (one
document per file, cut at blank lines past text_doc_chars). A directory is walked; its name never chooses a reader.

    list_files(paths)                      # the sorted files under comma-separated paths; a missing one is an error
    read_files(paths, counts, limits)      # their documents, in order; bad records and files counted in `counts`
    new_counts()                           # {"bad_records", "bad_files", "bad_examples"}: what read_files fills in
"""

import gzip
import importlib.util
import io
import json
import os
import re
import sys

# the settings the readers need, prepare_data.py's defaults (each a config key there)
LIMITS = {"text_field": "text", "max_line_bytes": 10_000_000, "text_doc_chars": 200_000, "max_json_bytes": 100_000_000}


def new_counts():
    return {"bad_records": {}, "bad_files": {}, "bad_examples": {}}


def list_files(spec, name="input"):
    """The files of comma-separated paths (directories walked), sorted, listed before any work starts: a missing
    path, or a format whose optional module is not installed, is an error now (later, in a pool's feeder thread, it
    would hang the run)."""
    paths = []
    for path in spec.split(","):
        if not os.path.exists(path):
            sys.exit(f"{name}: no such file or directory: {path}")
        paths += sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
    parquet, zst = (next((p for p in paths if p.endswith(ext)), None) for ext in (".parquet", ".zst"))
    if parquet and not importlib.util.find_spec("pyarrow"):
        sys.exit(f"{parquet}: reading parquet needs `pip install pyarrow`")
    if zst and sys.version_info < (3, 14) and not importlib.util.find_spec("zstandard"):
        sys.exit(f"{zst}: reading .zst needs Python >= 3.14 or `pip install zstandard`")
    return paths


# -----------------------------------------------------------------------------
# files -> documents. A bad record (a line, array item or row) or a bad file is counted by reason in `counts`
# (bad_records / bad_files, the first places as file:line in bad_examples) and skipped: never a crash,
# never a silent loss. Bytes that are not valid UTF-8 and JSON's lone surrogates ("\ud800") skip their record rather
# than become U+FFFD: such text comes from a broken converter or a wrong encoding (Shift_JIS read as UTF-8), and
# mojibake is worse training data than a lost document.
SURROGATE = re.compile("[\ud800-\udfff]")


def bad(s, reason, where, kind="bad_records"):
    s[kind][reason] = s[kind].get(reason, 0) + 1
    examples = s["bad_examples"].setdefault(reason, [])
    if len(examples) < 5:
        examples.append(where)


def open_binary(path):
    if path.endswith(".zst"):
        try:
            from compression import zstd  # the standard library from Python 3.14
            return zstd.open(path, "rb")
        except ImportError:
            import zstandard  # optional: older Pythons need the package (checked in list_files)
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_lines(f, path, s, at, max_line_bytes=LIMITS["max_line_bytes"]):
    """Yield the decoded lines of a binary stream, at[0] the line number; a line over max_line_bytes or not valid
    UTF-8 is counted and skipped (read in bounded pieces, so a 10 GB line never sits in memory)."""
    while raw := f.readline(max_line_bytes + 1):
        at[0] += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                raw = f.readline(max_line_bytes)
            bad(s, "line_too_long", f"{path}:{at[0]}")
            continue
        try:
            line = raw.decode("utf-8-sig" if at[0] == 1 else "utf-8")  # a byte-order mark is not text
        except UnicodeDecodeError:
            bad(s, "invalid_utf8", f"{path}:{at[0]}")
            continue
        yield line


def record_text(value, where, s, text_field="text", parse=True):
    """The document of one JSON record: its text_field, or the record itself if a string; None if bad (counted)."""
    try:
        value = json.loads(value) if parse else value
    except json.JSONDecodeError:
        return bad(s, "broken_json", where)
    except RecursionError:  # valid JSON nested too deep for the parser, e.g. "[" * 100000
        return bad(s, "nested_too_deep", where)
    text = value.get(text_field) if isinstance(value, dict) else value
    if not isinstance(text, str):
        return bad(s, "missing_field", where)
    if SURROGATE.search(text):  # valid JSON, not valid Unicode: every later step would fail on it
        return bad(s, "lone_surrogate", where)
    return text


def json_docs(f, path, s, text_field="text", max_json_bytes=LIMITS["max_json_bytes"]):
    """A .json file is one JSON value: an array of records (or strings), or one record. The standard library parses
    it whole, so it is held to max_json_bytes (3-5x that in memory while parsed); a larger one is a bad file."""
    raw = f.read(max_json_bytes + 1)
    if len(raw) > max_json_bytes:
        return bad(s, "json_too_large", f"{path} (over max_json_bytes={max_json_bytes:,}: make it JSONL)", "bad_files")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # broken JSON or invalid UTF-8 (both ValueErrors), or too deep
        return bad(s, "broken_json", f"{path} ({type(e).__name__}: {str(e)[:100]})", "bad_files")
    del raw
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        if (text := record_text(item, f"{path}[{i}]", s, text_field, parse=False)) is not None:
            yield text


def text_docs(lines, text_doc_chars=LIMITS["text_doc_chars"]):
    """Plain text, streamed: a file is one document (an article, a code file), but one longer than text_doc_chars
    is cut at its last blank line within that size (at a line end if a paragraph is longer), so a file of any size
    is read one bounded document at a time."""
    buf, size, cut = [], 0, 0  # cut: the number of lines up to and with the last blank one in buf
    for line in lines:
        if buf and size + len(line) > text_doc_chars:
            k = cut or len(buf)
            yield "".join(buf[:k])
            buf, cut = buf[k:], 0
            size = sum(map(len, buf))
        buf.append(line)
        size += len(line)
        cut = len(buf) if not line.strip() else cut
    if buf:
        yield "".join(buf)


def file_docs(path, s, at, limits=LIMITS):
    """Documents of one file, the reader chosen by the file's own extension (after .gz / .zst): .jsonl / .ndjson a
    JSON record per line, .json one JSON value, .parquet the text_field column, anything else plain text."""
    ext = os.path.splitext(path.removesuffix(".gz").removesuffix(".zst"))[1].lower()
    text_field = limits["text_field"]
    if ext == ".parquet":
        import pyarrow.parquet as pq  # optional: checked in list_files
        for at[0], text in enumerate((t for b in pq.ParquetFile(path).iter_batches(columns=[text_field])
                                      for t in b.column(0).to_pylist()), 1):
            if (text := record_text(text, f"{path}:{at[0]}", s, text_field, parse=False)) is not None:
                yield text
        return
    with open_binary(path) as f:
        if ext == ".json":
            yield from json_docs(f, path, s, text_field, limits["max_json_bytes"])
        elif ext in (".jsonl", ".ndjson"):
            for line in filter(str.strip, read_lines(f, path, s, at, limits["max_line_bytes"])):
                if (text := record_text(line, f"{path}:{at[0]}", s, text_field)) is not None:
                    yield text
        else:
            lines = read_lines(f, path, s, at, limits["max_line_bytes"])
            yield from (doc for doc in text_docs(lines, limits["text_doc_chars"]) if doc.strip())


def read_files(paths, counts, limits=LIMITS):
    """The documents of `paths` in order, file by file. A file that fails part way (a truncated .gz / .zst, a read
    error) is a bad file, and the documents read before the failure are kept."""
    for path in paths:
        at = [0]  # the line (parquet: row) reached
        try:
            if os.path.getsize(path) == 0:
                bad(counts, "empty_file", path, "bad_files")
                continue
            yield from file_docs(path, counts, at, limits)
        except EOFError:  # a truncated .gz / .zst
            bad(counts, "truncated", f"{path}:{at[0]}", "bad_files")
        except Exception as e:  # noqa: BLE001  permissions, corrupt data, ...: one file never ends the run
            bad(counts, "unreadable_file", f"{path}:{at[0]} ({type(e).__name__}: {str(e)[:100]})", "bad_files")
