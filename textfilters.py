"""
Text cleaning and quality filters: the functions prepare_data.py runs per document, kept apart because synth.py
filters generated text with the same code (docs/design.md "Layout"). Deduplication is in dedup.py.

    normalize(text)                               # NFKC, control characters out, ．，-> 。、 (Swallow)
    clean_lines(text, repeated=None)              # -> (text, lines dropped): boilerplate, ads, navigation
    line_hashes(text)                             # per-document unique line hashes, for cross-document counts
    detect_language(text) / is_code_line(line)    # "ja" / "en" / "code" / "other" from script statistics
    quality_signals(text, lang) / filter_reason(signals, lang, thresholds)   # a reason string, or None
    sentences(text) / sentence_stats(...)         # Swallow's sentence rules, headings and list items aside
    units(text) / ngram_hashes(unit_hashes, n)    # CJK characters (or script runs) and words; rolling n-gram hashes
    ngram_index(texts) / contaminated_spans(text, index) / cut_spans   # decontamination
    hashed_features(texts) / kmeans(X, k) / assign(X, centroids)        # cheap categories for balance
Every function is deterministic: no Python hash() (salted per process), numpy generators with explicit seeds.
"""

import hashlib
import json
import re
import unicodedata
import zlib

import numpy as np

# -----------------------------------------------------------------------------
# data: boilerplate and ad phrases (a line holding one, and short enough to be chrome rather than prose, goes)

BOILERPLATE_JA = [
    "送料無料", "お問い合わせ", "お問合せ", "会員登録", "ログインしてください", "利用規約", "プライバシーポリシー",
    "無断転載", "無断複製", "ページの先頭へ", "ページトップへ", "トップへ戻る", "カートに入れる", "今すぐ購入",
    "ご購入はこちら", "詳しくはこちら", "こちらをクリック", "クリックしてください", "人気記事", "関連記事",
    "この記事をシェア", "ツイートする", "ブックマークする", "ポイント還元", "期間限定", "メールマガジン",
    "メルマガ登録", "次のページへ", "前のページへ", "サイトマップ", "広告を非表示", "スポンサーリンク",
    "アフィリエイト", "在庫あり", "税込", "レビューを書く", "もっと見る", "続きを読む", "コメントする",
]
BOILERPLATE_EN = [
    "all rights reserved", "we use cookies", "this site uses cookies", "cookie policy", "accept cookies",
    "privacy policy", "terms of use", "terms of service", "sign up for", "subscribe to our", "newsletter",
    "click here", "read more", "share this", "follow us", "back to top", "skip to content", "add to cart",
    "free shipping", "enable javascript", "javascript is disabled", "powered by wordpress", "leave a comment",
    "posted by", "related posts", "you may also like", "buy now", "limited time offer",
]
BOILERPLATE = [p.lower() for p in BOILERPLATE_JA + BOILERPLATE_EN]

# Thresholds, each from a public pipeline (docs/recipe.md "Reference thresholds"); prepare_data.py's `thresholds`
# setting overrides any of them by name.
THRESHOLDS = {
    "max_chars": 1_000_000,            # longer documents are dumps or logs, not prose
    "boilerplate_max_line_chars": 150,  # a phrase in a longer line is prose that mentions it, not chrome
    # English (Gopher, Rae et al. 2021, App. A): 50-100,000 words, mean word length 3-10, symbol/word <= 0.1,
    # <= 90% bullet lines, <= 30% lines ending in an ellipsis, >= 80% words with a letter, >= 2 stop words
    "min_words": 50, "max_words": 100_000, "min_mean_word_len": 3.0, "max_mean_word_len": 10.0,
    "max_symbol_word_ratio": 0.1, "max_bullet_lines": 0.9, "max_ellipsis_lines": 0.3, "min_alpha_words": 0.8,
    "min_stop_words": 2,
    # FineWeb quality filter: >= 12% of lines end in punctuation, <= 67% of lines under 30 characters
    # (FineWeb-2 Japanese: line punctuation 0.096)
    "min_line_punct": 0.12, "min_line_punct_ja": 0.096, "max_short_lines": 0.67,
    # Gopher repetition (all languages but code): duplicate lines/paragraphs by count and by characters,
    # share of characters in the top 2/3/4-gram, and covered by repeated 5..10-grams
    "max_dup_line_frac": 0.30, "max_dup_line_chars": 0.20, "max_dup_para_frac": 0.30, "max_dup_para_chars": 0.20,
    "max_top_ngram_chars": {2: 0.20, 3: 0.18, 4: 0.16},
    "max_dup_ngram_chars": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
    # Japanese has no spaces: its n-grams are over script runs (units(text, script_runs=True): a kanji, hiragana or
    # katakana run is one unit), the closest thing to a word without a segmenter: トランスフォーマー is one unit as
    # "transformer" is one word. A hiragana run often joins 2-3 MeCab morphemes (することができる), so n runs span
    # at least n words and Gopher's n is used as is; the scale multiplies it. (Our earlier character n-grams at twice
    # Gopher's n, 10-20 characters, fired on technical text for repeating a katakana term with its particle.)
    "cjk_ngram_scale": 1,
    # Japanese (Swallow corpus, Okazaki et al. 2024, arXiv:2404.17733): >= 400 characters, hiragana >= 0.2,
    # katakana <= 0.5, Japanese letters >= 0.5, mean sentence length 20-90, <= 20% sentences ending in ・ or …
    "min_chars_ja": 400, "min_hiragana": 0.2, "max_katakana": 0.5, "min_japanese": 0.5,
    "min_mean_sentence": 20.0, "max_mean_sentence": 90.0, "max_ellipsis_sentences": 0.2,
    # Swallow also drops a document with any sentence over 200 characters. Ours: a share instead, <= 20% of the
    # characters past the 200th of their sentence (what cutting each long sentence at 200 would cut), so that one
    # long sentence, common in technical and legal prose, costs little while a document that is mostly a run-on
    # still goes; any-over-200 dropped tests/data/ja_technical.txt whole and 5 of its 7 600-character chunks.
    # A line's unpunctuated rest is a sentence only from 40 characters (ours): shorter, it is a heading, list item
    # or caption (30 list items of 12 characters put two paragraphs' mean at 19); longer, prose that lost its 。.
    "long_sentence": 200, "max_long_sentence_excess": 0.2, "min_bare_sentence": 40,
    # llm-jp-corpus v1: zlib compressed/raw size within 0.30-0.70 (below: repetitive; above: random)
    "min_compression": 0.30, "max_compression": 0.70,
    # code (StarCoder data filters, Li et al. 2023): mean line <= 100, longest line <= 1000, >= 25% alphanumeric
    "min_chars_code": 100, "max_mean_line_code": 100.0, "max_line_code": 1000, "min_alnum_code": 0.25,
}

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher's list
# common English words that are not words of other Latin-script languages (no "de", "la", "die", "und", "no")
_EN_COMMON = STOP_WORDS | {"a", "an", "is", "are", "was", "were", "been", "has", "had", "in", "on", "at", "for",
                           "from", "into", "it", "its", "this", "these", "as", "by", "or", "not", "but", "if",
                           "which", "what", "how", "when", "who", "can", "would", "should", "could", "more",
                           "than", "we", "you", "they", "he", "she", "his", "her", "their", "our", "your"}
_CJK = [(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F)]  # kana, kanji
# script classes for units(script_runs=True): kanji (with 々 〆), hiragana, katakana (with ー)
_SCRIPT_RANGES = [[(0x3005, 0x3006), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)],
                  [(0x3041, 0x309F)], [(0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)]]
_NON_WORD = re.compile(r"\W")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff]")
_NAV_SEP = re.compile(r"\s[|>»›/•·]\s|[｜＞»›]")
# a sentence: up to a run of 。!? with the closing brackets after it, or up to a "." that ends an English sentence
# inside Japanese text (after a lowercase letter, before a space: not 3.5, not "1. "), or the rest of the line
_SENTENCE = re.compile(r".*?(?:[。！？!?]+[」』）)\]\"'”’]*|(?<=[a-z])\.(?= )|$)")
_SENTENCE_CLOSERS, _SENTENCE_MARKS = "」』）)]\"'”’", ("。", "！", "？", "!", "?", ".", "…", "・")
# `#(?!#)`: a comment or #include, not a Markdown heading (## Results)
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|for .*:$|while .*:$|else:|try:|"
                        r"except\b|#(?!#)|//|/\*|public |private |function\b|var |let |const |[])}{]+[;,]?$|"
                        r".*[;{]$|@\w+|>>> |[\w.\[\]]+ *[-+*/|]?= *\S|[\w.]+\(.*\)$)")
_STRING_OR_COMMENT = re.compile(r"\"[^\"]*\"|'[^']*'|`[^`]*`|(#|//|/\*).*$")
_JA_CHAR = re.compile("[\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_JA_RUN = re.compile("[\u3041-\u309f]+|[\u30a0-\u30ff]+|[\u3005\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_OTHER_WORD = re.compile("[^\\W\\d_\u3005\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


# -----------------------------------------------------------------------------
# normalization and line cleaning

def normalize(text):
    """NFKC (full-width ASCII to ASCII, half-width katakana to full width), Swallow's ．，-> 。、 first (NFKC would
    turn them into ASCII . and ,), \\r\\n -> \\n, control and zero-width characters out, trailing spaces trimmed."""
    text = text.replace("．", "。").replace("，", "、").replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _line_hash(line):
    return int.from_bytes(hashlib.blake2b(line.strip().encode(), digest_size=8).digest(), "little")


def line_hashes(text):
    """The unique 64-bit hashes of a document's non-empty lines, sorted (for counting lines across documents)."""
    return np.unique(np.array([_line_hash(line) for line in text.split("\n") if line.strip()], dtype=np.uint64))


def is_navigation(line):
    """A menu or breadcrumb: items joined by | > » / etc., short on average, no sentence punctuation at the end."""
    parts = _NAV_SEP.split(line)
    return len(parts) >= 3 and len(line) / len(parts) < 20 and not line.rstrip().endswith(("。", ".", "!", "?"))


def clean_lines(text, repeated=None, max_line_chars=THRESHOLDS["boilerplate_max_line_chars"]):
    """Drop boilerplate/ad lines (phrase lists above), navigation lines, and lines for which repeated(hash) is true
    (seen in many documents of the same source). Returns (text, number of lines dropped)."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        s = line.strip()
        low = s.lower()
        if s and ((len(s) <= max_line_chars and any(p in low for p in BOILERPLATE)) or is_navigation(s)
                  or (repeated is not None and repeated(_line_hash(s)))):
            dropped += 1
            continue
        kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n"), dropped


# -----------------------------------------------------------------------------
# language identification from script statistics (no model): ja / en / code / other

_SCRIPTS = {"hiragana": re.compile("[\u3041-\u309f]"), "katakana": re.compile("[\u30a0-\u30ff]"),
            "kanji": re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"), "latin": re.compile("[A-Za-z]"),
            "letters": re.compile(r"[^\W\d_]"), "alnum": re.compile(r"[^\W_]")}


def script_counts(text):
    """Characters per script class. Counted as the length removed by re.sub, which runs in C: a loop over
    the characters in Python would dominate the filter's time on a large file."""
    return {name: len(text) - len(pattern.sub("", text)) for name, pattern in _SCRIPTS.items()}


def is_code_line(line):
    """Does the line look like code (keywords, comments, braces, semicolons, assignments, calls, decorators)? A line
    with Japanese in it is code only when the Japanese sits in its strings or comments and the rest is code
    (print("こんにちは"), x = 1  # 初期値): 事前学習(Pre-training) is a heading, not a call."""
    if not _CODE_LINE.match(line):
        return False
    if not _JA_CHAR.search(line):
        return True
    rest = _STRING_OR_COMMENT.sub(lambda m: "" if m.group(1) else m.group()[0] * 2, line)
    return bool(rest.strip()) and not _JA_CHAR.search(rest) and bool(_CODE_LINE.match(rest))


def detect_language(text):
    """code when at least 40% of non-empty lines are code lines (is_code_line);
    ja when kana is present (Chinese has none) and Japanese words are at least 30% of the words, a Japanese word
    counted as a run of one script (kanji, hiragana or katakana: 事前学習 は トランスフォーマー) as in units(): a
    Japanese paragraph with English terms, headings or quotes in it is ja, an English one with a Japanese word is
    not;
    en when Latin letters are at least 70% of the letters and common English words at least 8% of the words
    (25-30% in English prose; Spanish or German reach 8% only through a, in, on)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(map(is_code_line, lines)) >= 0.4 * len(lines):
        return "code"
    c = script_counts(text)
    ja_words = len(_JA_RUN.findall(text))
    if c["hiragana"] + c["katakana"] > 0 and ja_words >= 0.3 * (ja_words + len(_OTHER_WORD.findall(text))):
        return "ja"
    words = re.findall(r"[a-z']+", text.lower())
    english = sum(w in _EN_COMMON for w in words)
    if c["latin"] >= 0.7 * max(1, c["letters"]) and words and english >= 0.08 * len(words):
        return "en"
    return "other"


# -----------------------------------------------------------------------------
# units and n-gram hashes: a unit is one CJK character or one run of other word characters, so Japanese gets
# character n-grams (Swallow's MinHash, decontamination) and English word n-grams (FineWeb) from the same code;
# the repetition filters take Japanese by script runs instead (THRESHOLDS "cjk_ngram_scale")

_P = np.uint64(1_000_003)                   # the polynomial hashes' base: odd, so invertible mod 2^64
_P_INV = np.uint64(pow(1_000_003, -1, 2**64))


def _mix64(x):
    # splitmix64's finalizer: spreads the bits of a polynomial hash so that every output bit depends on all inputs
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _in_ranges(cp, ranges):
    return np.logical_or.reduce([(cp >= lo) & (cp <= hi) for lo, hi in ranges])


def units(text, script_runs=False):
    """(hashes, lengths, spans) of the text's units: a uint64 hash per unit (ASCII case folded), its length in
    characters and its (start, end) offsets (for cutting contaminated spans out). A unit is a run of word
    characters, each CJK character on its own; with script_runs, a run of one script instead (kanji, hiragana,
    katakana, other), Japanese's closest thing to words without a segmenter (the repetition filters).
    Vectorized over the code points: one C-level re.sub marks the word characters, numpy finds the units and hashes
    each as the polynomial sum(c_i * P^(end-1-i)), computed for all units at once from one prefix sum (P is odd, so
    it has an inverse mod 2^64). A Python loop over the units cost 3-5x more (measured on ja_sample.txt and the
    stdlib)."""
    n = len(text)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.uint64)
    word = np.frombuffer(_NON_WORD.sub("\0", text).encode("utf-32-le", "surrogatepass"), np.uint32) != 0
    if script_runs:  # 0 not a word character, 1 kanji, 2 hiragana, 3 katakana, 4 any other: a unit per run
        script = np.select([~word] + [_in_ranges(cp, r) for r in _SCRIPT_RANGES], [0, 1, 2, 3], 4)
        starts = np.nonzero((script > 0) & (script != np.concatenate([[0], script[:-1]])))[0]
        ends = np.nonzero((script > 0) & (script != np.concatenate([script[1:], [0]])))[0] + 1
    else:
        cjk = word & _in_ranges(cp, _CJK)
        run = word & ~cjk  # letters, digits and _ outside CJK: runs of them are words
        starts = np.nonzero(cjk | (run & ~np.concatenate([[False], run[:-1]])))[0]
        ends = np.nonzero(cjk | (run & ~np.concatenate([run[1:], [False]])))[0] + 1
    cp = np.where((cp >= 65) & (cp <= 90), cp + np.uint64(32), cp)  # A-Z -> a-z, lengths unchanged
    p_pow = np.multiply.accumulate(np.full(n, _P, np.uint64))        # P^(i+1), wrapping mod 2^64
    prefix = np.concatenate([[np.uint64(0)], np.cumsum(cp * np.multiply.accumulate(np.full(n, _P_INV, np.uint64)))])
    hashes = _mix64((prefix[ends] - prefix[starts]) * p_pow[ends - 1])
    return hashes, ends - starts, np.stack([starts, ends], axis=1)


def ngram_hashes(unit_hashes, n):
    """64-bit hashes of every window of n consecutive units (all of them when the text is shorter than n)."""
    n = min(n, len(unit_hashes))
    if n == 0:
        return np.zeros(0, np.uint64)
    m = len(unit_hashes) - n + 1
    h = np.zeros(m, np.uint64)
    for k in range(n):  # polynomial rolling hash, wrapping mod 2^64 (numpy does not warn on array overflow)
        h = h * _P + unit_hashes[k:k + m]
    return _mix64(h + np.uint64(n))  # n in the hash: a 12-gram never equals a 20-gram


# -----------------------------------------------------------------------------
# quality signals and filters

def _dup_fraction(items):
    """(fraction of items that repeat an earlier one, fraction of their characters): Gopher's duplicate lines."""
    seen, dup, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup, dup_chars = dup + 1, dup_chars + len(item)
        seen.add(item)
    return dup / max(1, len(items)), dup_chars / max(1, sum(map(len, items)))


def repetition_stats(unit_hashes, unit_lengths, ns_top=(2, 3, 4), ns_dup=(5, 6, 7, 8, 9, 10), scale=1):
    """Gopher's n-gram repetition (Rae et al. 2021, App. A) over units, vectorized: for n in ns_top the share of
    characters in the most frequent n-gram; for n in ns_dup the share of characters covered by n-grams that occur
    more than once. Keys are the unscaled n; the n-gram used is n * scale (cjk_ngram_scale for Japanese)."""
    total = max(1, int(unit_lengths.sum()))
    top, dup = {}, {}
    for n in (*ns_top, *ns_dup):
        k = n * scale
        if len(unit_hashes) < k + 1:  # a single window repeats nothing
            (top if n in ns_top else dup)[n] = 0.0
            continue
        _, first, inverse, counts = np.unique(ngram_hashes(unit_hashes, k), return_index=True,
                                              return_inverse=True, return_counts=True)
        if n in ns_top:
            best = np.argmax(counts)
            chars = int(unit_lengths[first[best]:first[best] + k].sum())
            top[n] = float(counts[best] * chars / total) if counts[best] > 1 else 0.0
        else:
            starts = np.nonzero(counts[inverse] > 1)[0]
            cover = np.zeros(len(unit_hashes) + 1, np.int64)  # +1 at each repeated window's start, -1 past its end
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + k, -1)
            dup[n] = float(unit_lengths[np.cumsum(cover[:-1]) > 0].sum()) / total
    return top, dup


def sentences(text):
    """The text's sentences: each line cut after a run of 。!? (with the closing brackets after it) or after the "."
    of an English sentence. A piece that does not end in sentence punctuation or an ellipsis (... ・) is a line's
    unpunctuated rest: a heading, list item, caption, or prose without 。."""
    return [x for line in text.split("\n") for x in (m.group().strip() for m in _SENTENCE.finditer(line)) if x]


def sentence_stats(lengths, ended, t=THRESHOLDS):
    """(mean sentence length, share of the characters past the t["long_sentence"]th of their sentence) for Swallow's
    rules, from the lengths of sentences() and whether each ends in punctuation. An unpunctuated piece is a sentence
    only from t["min_bare_sentence"] characters (shorter: a heading or list item). The mean is over the sentences up
    to t["long_sentence"]: Swallow keeps no document with a longer one, so this is its mean on what it keeps, and the
    long ones are judged once, by the second number: the share of the text that cutting each at the limit would cut."""
    counted = lengths[ended | (lengths >= t["min_bare_sentence"])]
    normal, long = counted[counted <= t["long_sentence"]], counted[counted > t["long_sentence"]]
    mean = float(normal.mean()) if len(normal) else 0.0
    return mean, int((long - t["long_sentence"]).sum()) / max(1, int(lengths.sum()))


def quality_signals(text, lang, cjk_ngram_scale=THRESHOLDS["cjk_ngram_scale"], u=None):
    """Every statistic the filters look at, as a dict. `u`: units(text), when the caller has it already (Japanese
    uses units(text, script_runs=True), made here)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    words = text.split()
    s = {"chars": len(text), "words": len(words), "lines": len(lines)}
    if lang == "code":
        lengths = [len(line) for line in text.split("\n")]
        s.update(mean_line=sum(lengths) / max(1, len(lengths)), max_line=max(lengths, default=0),
                 alnum=script_counts(text)["alnum"] / max(1, len(text)))
        return s
    s["dup_line_frac"], s["dup_line_chars"] = _dup_fraction(lines)
    s["dup_para_frac"], s["dup_para_chars"] = _dup_fraction(paras)
    if lang == "ja":
        hashes, lengths, _ = units(text, script_runs=True)
        s["top_ngram_chars"], s["dup_ngram_chars"] = repetition_stats(hashes, lengths, scale=cjk_ngram_scale)
    else:
        hashes, lengths, _ = u or units(text)
        s["top_ngram_chars"], s["dup_ngram_chars"] = repetition_stats(hashes, lengths)
    s["line_punct"] = sum(line.endswith(tuple(".!?\"'。！？」』)")) for line in lines) / max(1, len(lines))
    s["short_lines"] = sum(len(line) < 30 for line in lines) / max(1, len(lines))
    if lang == "ja":
        c = script_counts(text)
        letters = max(1, c["letters"])
        sents = sentences(text)
        s["sentence_lengths"] = np.array([len(x) for x in sents], np.int64)
        s["sentence_ended"] = np.array([x.rstrip(_SENTENCE_CLOSERS).endswith(_SENTENCE_MARKS) for x in sents], bool)
        s.update(hiragana=c["hiragana"] / letters, katakana=c["katakana"] / letters,
                 japanese=(c["hiragana"] + c["katakana"] + c["kanji"]) / max(1, len(text.replace("\n", ""))),
                 ellipsis_sentences=sum(x.endswith(("・", "…", "...")) for x in sents) / max(1, len(sents)),
                 compression=len(zlib.compress(text.encode())) / max(1, len(text.encode())))
    else:
        s.update(mean_word_len=sum(map(len, words)) / max(1, len(words)),
                 symbol_word=(text.count("#") + text.count("...") + text.count("…")) / max(1, len(words)),
                 bullet_lines=sum(line.startswith(("•", "-", "*", "·", "・")) for line in lines) / max(1, len(lines)),
                 ellipsis_lines=sum(line.endswith(("...", "…")) for line in lines) / max(1, len(lines)),
                 alpha_words=sum(any(ch.isalpha() for ch in w) for w in words) / max(1, len(words)),
                 stop_words=sum(w.lower() in STOP_WORDS for w in words))
    return s


def filter_reason(s, lang, t=THRESHOLDS):
    """The first filter the signals `s` (from quality_signals) fail, as a short reason string, or None to keep."""
    if s["chars"] > t["max_chars"]:
        return "too_long"
    if lang == "code":
        checks = [("too_short", s["chars"] < t["min_chars_code"]),
                  ("code_long_line", s["max_line"] > t["max_line_code"]),
                  ("code_mean_line", s["mean_line"] > t["max_mean_line_code"]),
                  ("code_alnum", s["alnum"] < t["min_alnum_code"])]
    elif lang == "ja":
        mean_sentence, long_excess = sentence_stats(s["sentence_lengths"], s["sentence_ended"], t)
        checks = [("too_short", s["chars"] < t["min_chars_ja"]),
                  ("ja_hiragana", s["hiragana"] < t["min_hiragana"]),
                  ("ja_katakana", s["katakana"] > t["max_katakana"]),
                  ("ja_letters", s["japanese"] < t["min_japanese"]),
                  ("ja_long_sentences", long_excess > t["max_long_sentence_excess"]),
                  ("ja_sentence_mean", not t["min_mean_sentence"] <= mean_sentence <= t["max_mean_sentence"]),
                  ("ja_ellipsis", s["ellipsis_sentences"] > t["max_ellipsis_sentences"]),
                  ("compression", not t["min_compression"] <= s["compression"] <= t["max_compression"]),
                  ("line_punct", s["line_punct"] < t["min_line_punct_ja"])]
    else:
        checks = [("too_short", s["words"] < t["min_words"]), ("too_long", s["words"] > t["max_words"]),
                  ("word_length", not t["min_mean_word_len"] <= s["mean_word_len"] <= t["max_mean_word_len"]),
                  ("symbols", s["symbol_word"] > t["max_symbol_word_ratio"]),
                  ("bullets", s["bullet_lines"] > t["max_bullet_lines"]),
                  ("ellipsis", s["ellipsis_lines"] > t["max_ellipsis_lines"]),
                  ("alpha_words", s["alpha_words"] < t["min_alpha_words"]),
                  ("stop_words", s["stop_words"] < t["min_stop_words"]),
                  ("line_punct", s["line_punct"] < t["min_line_punct"])]
    if lang != "code":
        checks += [("short_lines", s["short_lines"] > t["max_short_lines"]),
                   ("dup_lines", s["dup_line_frac"] > t["max_dup_line_frac"]
                    or s["dup_line_chars"] > t["max_dup_line_chars"]),
                   ("dup_paragraphs", s["dup_para_frac"] > t["max_dup_para_frac"]
                    or s["dup_para_chars"] > t["max_dup_para_chars"]),
                   ("top_ngram", any(s["top_ngram_chars"][n] > v for n, v in t["max_top_ngram_chars"].items())),
                   ("dup_ngrams", any(s["dup_ngram_chars"][n] > v for n, v in t["max_dup_ngram_chars"].items()))]
    return next((reason for reason, failed in checks if failed), None)


# -----------------------------------------------------------------------------
# decontamination: n-grams shared with evaluation sets. FineWeb uses word 12-grams; a Japanese character is about
# half a word, so Japanese (CJK-majority) text uses 24-character n-grams.

def _decontam_n(unit_lengths, n_word, n_cjk):
    cjk = np.count_nonzero(unit_lengths == 1)  # single-character units are almost all CJK characters
    return n_cjk if cjk > len(unit_lengths) / 2 else n_word


def eval_items(paths):
    """The items of evaluation sets, to decontaminate against: a line of a .txt file, or every string value of a
    .jsonl line."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                if path.endswith(".jsonl"):
                    yield from (v for v in json.loads(line).values() if isinstance(v, str))
                else:
                    yield line


def ngram_index(texts, n_word=12, n_cjk=24):
    """Sorted unique hashes of every n-gram of the evaluation texts, at both sizes (a Japanese question inside an
    English document, or the other way round, is still found)."""
    parts = [np.zeros(0, np.uint64)]
    for text in texts:
        h = units(normalize(text))[0]
        parts += [ngram_hashes(h, n) for n in (n_word, n_cjk) if len(h) >= n]  # a short answer ("B") is no evidence
    return np.unique(np.concatenate(parts))


def contaminated_spans(text, index, n_word=12, n_cjk=24):
    """Merged (start, end) character spans of the text covered by n-grams found in the index (empty: clean)."""
    if len(index) == 0:
        return []
    hashes, lengths, spans = units(text)
    n = _decontam_n(lengths, n_word, n_cjk)
    if len(hashes) < n:
        return []
    hits = np.nonzero(np.isin(ngram_hashes(hashes, n), index))[0]
    merged = []
    for i in hits.tolist():
        start, end = int(spans[i, 0]), int(spans[i + n - 1, 1])
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(x) for x in merged]


def cut_spans(text, spans):
    """The text with the spans removed (the "cut" alternative to dropping a contaminated document)."""
    out, pos = [], 0
    for start, end in spans:
        out.append(text[pos:start])
        pos = end
    return "".join(out + [text[pos:]])


# -----------------------------------------------------------------------------
# categories for balance: hashed unit 1- and 2-gram features, spherical k-means (cosine similarity)

def hashed_features(texts, dim=1024):
    """(len(texts), dim) float32: log(1 + count) of hashed unit unigrams and bigrams, rows L2-normalized."""
    X = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        h = units(text)[0]  # unit hashes are mixed already: usable as unigram features as they are
        grams = np.concatenate([h, ngram_hashes(h, 2)]) if len(h) > 1 else h
        np.add.at(X[i], (grams % np.uint64(dim)).astype(np.int64), 1.0)
    X = np.log1p(X)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6)


def assign(X, centroids):
    return np.argmax(X @ centroids.T, axis=1) if len(X) else np.zeros(0, np.int64)


def kmeans(X, k=8, iters=20, seed=0):
    """Spherical k-means on L2-normalized rows: k centroids (k, dim). k-means++ start (Arthur & Vassilvitskii
    2007): each next centroid a row drawn with probability ~ its squared distance to the nearest one so far."""
    rng = np.random.default_rng(seed)
    k = min(k, len(X))
    centroids = X[[rng.integers(len(X))]]
    while len(centroids) < k:
        d2 = np.maximum(0.0, 2 - 2 * (X @ centroids.T).max(1)).astype(np.float64)  # |x-c|^2 of unit vectors
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centroids = np.vstack([centroids, X[rng.choice(len(X), p=p)]])
    for _ in range(iters):
        labels = assign(X, centroids)
        for c in range(k):
            members = X[labels == c]
            if len(members):  # an empty cluster keeps its centroid rather than vanish
                v = members.sum(0)
                centroids[c] = v / max(np.linalg.norm(v), 1e-6)
    return centroids


# -----------------------------------------------------------------------------
# answers with a known right one (synth.py's offline tasks): the DPO stage's offline judge and eval.py's check

def verify_answer(answer, reply, strict=True):
    """Is `reply` the right `answer`? strict: exactly the answer, surrounding whitespace aside ("2", not "2." nor
    "2. マザーボード" nor "答えは2です"), as llm-jp-eval's exact match (docs/recipe.md "Evaluation": most open models
    scored near zero on Jaster for answering "2. motherboard"). Lenient: the answer appears as a token of the
    NFKC-normalized reply (not inside a longer number): knowledge apart from format."""
    if strict:
        return reply.strip() == answer
    text = unicodedata.normalize("NFKC", reply)
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?!\d|\.\d)", text) is not None


def answer_shape(text):
    """The form of an answer with its content abstracted: runs of digits -> "0", of kanji -> "k", of hiragana ->
    "h", of katakana -> "t", of other letters -> "a". "13" and "7.2" -> "0" and "0.0"; "水曜日" -> "k" but "水曜日です" ->
    "kh"; "Friday" -> "a"; "答えは13です" -> "kh0h"; "2. マザーボード" -> "0. t"."""
    runs = r"(\d+)|([\u4e00-\u9fff\u3005]+)|([\u3041-\u309f]+)|([\u30a0-\u30ff]+)|([^\W\d_]+)"
    return re.sub(runs, lambda m: "0khta"[m.lastindex - 1], unicodedata.normalize("NFKC", text).strip())


def verifier_score(answer, reply):
    """The offline judge's grade of a reply to a task with a known answer, correctness first, then format:
    3 right in exactly the asked format, 2 right in another ("答えは13です"), 1 wrong but in the answer's form (a bare
    number for a number), 0 neither. Format counts even when wrong: a model that learns the form keeps it on the
    questions it cannot answer (docs/recipe.md "Evaluation": Jaster scores only exact answers)."""
    if verify_answer(answer, reply):
        return 3
    if verify_answer(answer, reply, strict=False):
        return 2
    return int(answer_shape(reply) == answer_shape(answer))
