"""Claims about textfilters.py: MinHash/LSH merges planted pairs as the S-curve 1-(1-s^r)^b predicts (recall >= 0.95
at Jaccard >= 0.85, <= 1% merged at <= 0.4, in Japanese and English); exact duplicates always collide; boilerplate,
ads and menus go while the body stays; ja / en / code are told apart on a labelled fixture; repetition, quality and
decontamination filters catch what they are for; union-find, k-means and the knowledge probe do what they say."""

import json
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dedup  # noqa: E402
import textfilters as tf  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
JA = open(os.path.join(DATA, "ja_sample.txt"), encoding="utf-8").read().split("\n\n")
EN = open(os.path.join(DATA, "en_sample.txt"), encoding="utf-8").read().split("\n\n")
KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 300)]


def random_unit(rng, lang):
    # English: a random 6-letter word; Japanese: a random kana or kanji (one unit = one character)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) if lang == "en" else rng.choice(KANA)


def planted_pair(rng, lang, n_units=300):
    """A document and a copy with a random share of its units replaced: Jaccard spread over [0, 1]."""
    units = [random_unit(rng, lang) for _ in range(n_units)]
    copy = list(units)
    p = rng.choice([rng.uniform(0, 0.015), rng.uniform(0.015, 0.06), rng.uniform(0.06, 0.5)])
    for i in range(n_units):
        if rng.random() < p:
            copy[i] = random_unit(rng, lang)
    sep = " " if lang == "en" else ""
    return sep.join(units), sep.join(copy)


def test_minhash_lsh_s_curve_on_planted_pairs():
    rng = random.Random(0)
    bands, rows = 14, 8  # FineWeb's defaults, the ones prepare_data.py uses
    docs, truth = [], []
    for lang in ("en", "ja"):
        for _ in range(600):
            a, b = planted_pair(rng, lang)
            sa, sb = dedup.shingles(a), dedup.shingles(b)
            truth.append((lang, len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))))
            docs += [sa, sb]
    labels = dedup.duplicate_clusters(dedup.lsh_band_hashes(dedup.minhash(docs, bands * rows), bands, rows))
    merged = labels[0::2] == labels[1::2]
    assert len(np.unique(labels)) >= len(truth)  # no pair was merged with another pair
    s = np.array([j for _, j in truth])
    print("\nJaccard bucket   pairs  merged  1-(1-s^r)^b at the bucket mean")
    for lo in np.arange(0, 1.0, 0.1):
        inside = (s >= lo) & (s < lo + 0.1 if lo < 0.9 else s <= 1.0)
        if inside.any():
            expected = 1 - (1 - s[inside] ** rows) ** bands
            print(f"  [{lo:.1f}, {lo + 0.1:.1f})  {inside.sum():6d}  {merged[inside].mean():6.3f}  "
                  f"{expected.mean():6.3f}")
    # with a Jaccard threshold on the candidates' signatures, the tail of the S-curve below it is cut
    sigs = dedup.minhash(docs, bands * rows)
    strict = dedup.duplicate_clusters(dedup.lsh_band_hashes(sigs, bands, rows), sigs, threshold=0.8)
    strict = strict[0::2] == strict[1::2]
    print(f"threshold 0.8: merged {strict[s < 0.7].mean():.3f} below Jaccard 0.7, {strict[s >= 0.9].mean():.3f} "
          f"at >= 0.9")
    assert strict[s < 0.7].mean() < 0.005 and strict[s >= 0.9].mean() >= 0.95
    for lang in ("en", "ja"):
        mine = np.array([t[0] == lang for t in truth])
        high, low = mine & (s >= 0.85), mine & (s <= 0.4)
        assert high.sum() >= 100 and low.sum() >= 100, (lang, high.sum(), low.sum())
        assert merged[high].mean() >= 0.95, f"{lang}: recall {merged[high].mean():.3f} at Jaccard >= 0.85"
        assert merged[low].mean() <= 0.01, f"{lang}: {merged[low].mean():.3f} merged at Jaccard <= 0.4"


def test_exact_duplicates_always_collide():
    text = "\n\n".join(EN[:3])
    variant = "  " + text.upper().replace(" ", "   ") + "\n"
    assert dedup.exact_hash(text) == dedup.exact_hash(variant)
    assert dedup.exact_hash(text) != dedup.exact_hash(text + " more")
    sigs = dedup.minhash([dedup.shingles(t) for t in [text, variant, "\n\n".join(JA[:2])]])
    labels = dedup.duplicate_clusters(dedup.lsh_band_hashes(sigs))
    assert labels.tolist() == [0, 0, 2]


def test_union_find_matches_a_reference():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (10, 0), (50, 30), (500, 400), (2000, 100)]:
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = list(range(n))  # the textbook version with path halving
        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = find(x), find(y)
            parent[max(rx, ry)] = min(rx, ry)
        expected = [min(i for i in range(n) if find(i) == find(j)) for j in range(n)] if n <= 500 else None
        labels = dedup.union_find(n, a, b)
        if expected is not None:
            assert labels.tolist() == expected
        assert all(labels[x] == labels[y] for x, y in zip(a, b))
    chain = dedup.union_find(10_000, np.arange(9_999, 0, -1), np.arange(9_998, -1, -1))  # a long chain, reversed
    assert (chain == 0).all()


def test_boilerplate_ads_and_menus_go_the_body_stays():
    body_ja, body_en = JA[0], EN[0]
    page = "\n".join(["ホーム > ニュース > 動物", body_ja, "送料無料！今すぐ購入 ▶ こちらをクリック", "Copyright 2024 All Rights Reserved.",
                      "Home | About | Contact | Blog", body_en, "We use cookies to improve your experience.",
                      "この記事をシェアする", "Tanuki Weekly issue archive"])
    boring = tf._line_hash("Tanuki Weekly issue archive")
    cleaned, dropped = tf.clean_lines(tf.normalize(page), repeated=lambda h: h == boring)
    assert cleaned == tf.normalize(body_ja + "\n" + body_en) and dropped == 7
    # a long line that merely mentions a phrase is prose, not chrome
    prose = "This essay explains why a cookie policy banner, which every site now shows, says little. " * 3
    assert tf.clean_lines(prose)[1] == 0


def test_normalize():
    assert tf.normalize("ＡＢＣ１２３ｶﾀｶﾅ") == "ABC123カタカナ"
    assert tf.normalize("これはペン．あれは本，です") == "これはペン。あれは本、です"  # Swallow's rule, before NFKC
    assert tf.normalize("a\x00b\u200bc\r\nd  \r\n") == "abc\nd"


def test_language_identification_on_a_labelled_fixture():
    labelled = [("ja", p) for p in JA] + [("en", p) for p in EN]
    with open(os.path.join(DATA, "code_sample.txt"), encoding="utf-8") as f:
        labelled += [("code", p) for p in f.read().split("\n\n\n")]
    with open(os.path.join(DATA, "langid_labelled.jsonl"), encoding="utf-8") as f:
        labelled += [(d["lang"], d["text"]) for d in map(json.loads, f)]
    wrong = [(lang, tf.detect_language(tf.normalize(text)), text[:40]) for lang, text in labelled
             if tf.detect_language(tf.normalize(text)) != lang]
    print(f"\nlanguage id: {len(labelled) - len(wrong)}/{len(labelled)} right; wrong: {wrong}")
    assert len(wrong) <= 0.05 * len(labelled)
    assert {lang for lang, _ in labelled} == {"ja", "en", "code", "other"}


def test_quality_filters_keep_good_text_and_name_what_is_wrong():
    ja, en = "\n".join(JA[:4]), "\n".join(EN[:3])
    assert tf.filter_reason(tf.quality_signals(ja, "ja"), "ja") is None
    assert tf.filter_reason(tf.quality_signals(en, "en"), "en") is None
    cases = [  # (text, lang, reason)
        ("短い文です。", "ja", "too_short"),
        ("カタカナバカリノブンショウデス。" * 40, "ja", "ja_hiragana"),
        ("Short text here.", "en", "too_short"),
        ("\n".join([EN[0]] * 4), "en", "dup_lines"),
        (" ".join(["buy the cheap tickets and"] * 60) + " go.", "en", "top_ngram"),
        (EN[0] + " " + EN[1] + " " + EN[0][:len(EN[0]) // 2] + ".", "en", "dup_ngrams"),  # a half-copied paragraph
        ("\n".join(f"- item {i} of the list of things to do with the tanuki." for i in range(30)) + "\nThe end.", "en",
         "bullets"),
        ("x" * 2000 + "\n" + "def f():\n    return 1\n", "code", "code_long_line"),
    ]
    for text, lang, reason in cases:
        assert tf.filter_reason(tf.quality_signals(text, lang), lang) == reason, (text[:30], reason)


def test_repetition_stats_are_gophers_definitions():
    h = np.array([1, 2, 3, 1, 2, 3, 4], np.uint64)  # "a b c a b c d", one character per unit
    lengths = np.ones(7, np.int64)
    top, dup = tf.repetition_stats(h, lengths, ns_top=(2,), ns_dup=(3,))
    assert np.isclose(top[2], 2 * 2 / 7)  # the most frequent 2-gram "a b" twice, 2 characters each
    assert np.isclose(dup[3], 6 / 7)      # "a b c" occurs twice and covers the first 6 characters


def test_decontamination_finds_a_planted_question_and_cuts_it():
    question_en = "Which planet in our solar system has the largest number of confirmed moons as of this year?"
    question_ja = "日本で一番高い山は富士山ですが、二番目に高い山は何という名前でしょうか。"
    index = tf.ngram_index([question_en, question_ja])
    doc_en = EN[0] + " " + question_en + " " + EN[1]
    doc_ja = JA[0] + question_ja + JA[1]
    for doc, q in [(doc_en, question_en), (doc_ja, question_ja)]:
        spans = tf.contaminated_spans(tf.normalize(doc), index)
        assert spans
        cut = tf.cut_spans(tf.normalize(doc), spans)
        assert q[:30].lower() not in cut.lower() and len(cut) > len(doc) - len(q) - 5
    assert tf.contaminated_spans(tf.normalize("\n".join(EN + JA)), index) == []


def test_kmeans_separates_languages():
    texts = JA + EN
    X = tf.hashed_features(texts)
    labels = tf.assign(X, tf.kmeans(X, 2, seed=0))
    assert len(set(labels[:len(JA)])) == 1 and len(set(labels[len(JA):])) == 1 and labels[0] != labels[-1]


def test_knowledge_frequency_counts_copies_once():
    fact = "タヌキはため糞と呼ばれる習性を持ち、決まった場所に糞をする。"
    copies = [JA[1] + fact + JA[2]] * 3 + [JA[1] + fact + JA[2] + "。"]
    others = [JA[5] + "タヌキの話。" + JA[6] + "ため糞" , JA[7] + "ため糞をするのはタヌキだけではない。" + JA[8]]
    result = dedup.knowledge_frequency(copies + others + EN, ["タヌキ", "ため糞"], window=50)
    assert result["documents"] == 5 and result["distinct"] == 2, result


def test_repeated_line_counts_are_exact_in_bounded_memory(tmp_path):
    """The boilerplate-line counter counts exactly, holding about its memory budget however many lines go through it
    (the spill to disk is what grows): 200,000 documents x 30 never-repeated lines plus 40 lines of site chrome, each
    in 1,250 documents, through a 1 MB budget. Every chrome line is found and no other line (a fixed-size count-min
    sketch flagged 27% of never-repeated lines at 14M documents and 99.99% at 20M)."""
    import tracemalloc
    chrome = np.random.default_rng(0).integers(0, 2**63, 40, dtype=np.uint64)

    def documents():
        rng = np.random.default_rng(1)
        for i in range(200_000):
            lines = rng.integers(0, 2**63, 30, dtype=np.uint64)
            yield np.unique(np.append(lines, chrome[i // 4 % 40]) if i % 4 == 0 else lines)

    tracemalloc.start()
    found, n_lines = dedup.repeated_hashes(documents(), 100, str(tmp_path / "spill"), 1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n_lines == 200_000 * 30 + 50_000
    assert np.array_equal(found, np.sort(chrome))
    assert peak < 8 << 20, peak  # the lines are 48 MB: a count held in memory would hold them all
    assert not os.path.exists(tmp_path / "spill")  # the spill files are gone


def test_repeated_line_counts_split_a_partition_too_large_for_memory(tmp_path):
    """A partition over the budget is split again by the next 8 bits, down to one hash per file; the counts stay
    exact: lines in exactly 99 and 100 documents, one line in 5,000 documents, through a 4 KB budget."""
    rng = np.random.default_rng(2)
    at_99, at_100, everywhere = rng.integers(0, 2**63, 3, dtype=np.uint64)
    docs = [np.unique(np.append(rng.integers(0, 2**63, 3, dtype=np.uint64), everywhere)) for _ in range(5000)]
    docs += [np.array([at_99])] * 99 + [np.array([at_100])] * 100
    stale = tmp_path / "spill" / "part_56_000.u64.d"  # a kill -9 mid-count left a split partition behind
    stale.mkdir(parents=True)
    (stale / "part_48_007.u64").write_bytes(np.array([at_99] * 500, np.uint64).tobytes())
    found, n_lines = dedup.repeated_hashes(iter(docs), 100, str(tmp_path / "spill"), 4096)
    assert found.tolist() == sorted([int(at_100), int(everywhere)]) and n_lines == 5000 * 4 + 199
