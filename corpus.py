"""
Reading a corpus from files, for prepare_data.py (and any stage that reads raw text): documents from the formats
web-scale data comes in, each file read by its own extension after .gz / .zst: .jsonl / .ndjson a record per line,
.json one value (an array of records or strings, or one record), .parquet a column, anything else plain text (one
document per file, cut at blank lines past text_doc_chars). A directory is walked; its name never chooses a reader.

    list_files(paths)                      # the sorted files under comma-separated paths; a missing one is an error
    read_files(paths, counts, limits)      # their documents, in order; bad records and files counted in `counts`
    new_counts()                           # {"bad_records", "bad_files", "bad_examples"}: what read_files fills in
    read_jsonl(path, counts) / append_jsonl(path)   # every stage's JSONL reader (bad lines counted); own outputs
    share(n, rank, world_size, sizes)      # a rank's contiguous share of the files (prepare_data.py under torchrun)
    builtin_docs(kind)                     # built-in sources (stdlib prose and code, Japanese templates): no download
"""

import ast
import datetime
import gzip
import importlib.util
import io
import json
import os
import random
import re
import sys
import sysconfig

import numpy as np

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


def share(n, rank, world_size, sizes=None):
    """A rank's contiguous range [lo, hi) of n items (a source's files, sorted): by the items' sizes (files by
    bytes), or by count. Contiguous ranges in rank order keep the corpus's order: rank 0's documents, then rank 1's."""
    sizes = np.ones(n) if sizes is None or not sum(sizes) else np.asarray(sizes, float)
    middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()  # an item goes to the rank its middle byte falls in
    owner = np.minimum((middle * world_size).astype(int), world_size - 1)
    return int(np.searchsorted(owner, rank)), int(np.searchsorted(owner, rank, side="right"))


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


ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_record(line, where, s):
    """One JSONL line as a dict, or None if it is bad (counted in `s` with `where`): broken or too deeply nested JSON,
    not a JSON object, or a lone surrogate in a string (valid JSON, not valid Unicode: it fails every later encode)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return bad(s, "broken_json", where)
    except RecursionError:  # valid JSON nested too deep for the parser, e.g. "[" * 100000
        return bad(s, "nested_too_deep", where)
    if not isinstance(value, dict):
        return bad(s, "not_an_object", where)
    if ESCAPED_SURROGATE.search(line):  # escaped surrogates: a pair is one character, a lone one cannot be encoded
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return bad(s, "lone_surrogate", where)
    return value


def read_jsonl(path, counts=None, complete_only=False, numbered=False, max_line_bytes=LIMITS["max_line_bytes"]):
    """The records (dicts) of a JSONL file, in order, or [(line number, record)] when numbered: the one reader of
    every stage (prepare_data, synth, sft, dpo, eval). A bad line (invalid UTF-8, over max_line_bytes, broken or too
    deep JSON, not an object, a lone surrogate) is counted by reason in `counts` (new_counts(): with its file:line)
    and skipped; without `counts`, what was skipped is printed. complete_only: for our own files that a kill may have
    cut, a last line without its newline is no record (its work is redone), not a bad one."""
    mine = new_counts() if counts is None else counts
    if not os.path.exists(path):
        return []
    records, at = [], [0]
    with open_binary(path) as f:
        for line in read_lines(f, path, mine, at, max_line_bytes):
            if complete_only and not line.endswith("\n"):
                break
            if line.strip() and (record := parse_record(line, f"{path}:{at[0]}", mine)) is not None:
                records.append((at[0], record) if numbered else record)
    if counts is None and mine["bad_records"]:
        print(f"{path}: {bad_lines(mine)}", file=sys.stderr)
    return records


def bad_lines(counts):
    """One line saying what read_jsonl skipped, or "" when nothing was."""
    reasons = [f"{reason} x{k} (first at {', '.join(counts['bad_examples'][reason][:3])})"
               for reason, k in counts["bad_records"].items()]
    return f"skipped {sum(counts['bad_records'].values())} bad line(s): {'; '.join(reasons)}" if reasons else ""


def append_jsonl(path):
    """A stage's own JSONL outputs (synth.py, dpo.py) are written a line per record and flushed, so a kill loses at
    most the line being written. Open one's own JSONL file for appending: a last line that a kill cut mid-write is removed first, so the next
    record starts on a line of its own."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


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


# -----------------------------------------------------------------------------
# built-in sources: text on every machine, for the tiny pipeline (nothing is downloaded)

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
        except SyntaxError:  # one document per file, always: ranks share the files by their place in the list
            yield ""
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


def ja_template_docs(n, seed=0):
    rng = random.Random(seed)  # a fixed seed: the same corpus on every machine
    for _ in range(n):
        # distinct templates per document: the same template twice would be caught by the repetition filters
        sentences = [t(rng, *rng.choice(PREFECTURES).split(":")) for t in rng.sample(TEMPLATES, rng.randint(12, 16))]
        cuts = sorted(rng.sample(range(1, len(sentences)), 3))  # four paragraphs
        yield "\n".join("".join(sentences[a:b]) for a, b in zip([0] + cuts, cuts + [len(sentences)]))


def builtin_docs(kind, ja_docs=3000, seed=0):
    """The documents of a built-in source: "stdlib_docs" (English prose), "stdlib_code" (Python), "ja_templates"."""
    if kind == "ja_templates":
        return ja_template_docs(ja_docs, seed)
    if kind in ("stdlib_docs", "stdlib_code"):
        return stdlib_docs(kind == "stdlib_code")
    sys.exit(f"unknown built-in source builtin:{kind}; there are builtin:stdlib_docs, builtin:stdlib_code and "
             "builtin:ja_templates")
