"""Claims about textfilters.py: boilerplate, ads and menus go while the body stays; ja / en / code are told apart on a labelled fixture and on Japanese with English
in it; repetition, quality and decontamination filters catch what they are for, and keep Japanese technical prose
(long sentences, headings, repeated katakana terms) whole and in page-size chunks; k-means separates languages.
dedup.py's claims are in tests/test_dedup.py."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import textfilters as tf  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
JA = open(os.path.join(DATA, "ja_sample.txt"), encoding="utf-8").read().split("\n\n")
EN = open(os.path.join(DATA, "en_sample.txt"), encoding="utf-8").read().split("\n\n")
TECH = open(os.path.join(DATA, "ja_technical.txt"), encoding="utf-8").read()        # LLM pretraining, with headings
NOTES = open(os.path.join(DATA, "ja_technical_notes.txt"), encoding="utf-8").read()  # 40% heading lines


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


def page_chunks(text, size):
    """The text cut at blank lines into chunks of at least `size` characters; a tail under size/2 joins the last."""
    chunks, cur = [], []
    for para in text.split("\n\n"):
        cur.append(para)
        if sum(map(len, cur)) >= size:
            chunks, cur = chunks + ["\n\n".join(cur)], []
    if cur and chunks and sum(map(len, cur)) < size // 2:
        chunks[-1] += "\n\n" + "\n\n".join(cur)
    elif cur:
        chunks.append("\n\n".join(cur))
    return chunks


def test_japanese_technical_prose_is_kept_whole_and_in_page_size_chunks():
    """ja_technical.txt (4,565 characters on LLM pretraining: 5 sentences of 211-260 characters, headings such as
    ## 事前学習(Pre-training), English terms in parentheses, a paragraph repeating アテンションヘッド 6 times, list
    items) and ja_technical_notes.txt (40% of its lines headings like データ並列(Data Parallel)) are Japanese and
    pass every filter, whole and cut into 600- and 1,000-character chunks. Before: Swallow's any-sentence-over-200
    dropped the whole text and 5 of 7 600-character chunks, the code pattern took 2 chunks and the notes for code,
    and character 10-20-grams flagged 1 chunk (4 of 29 overlapping windows) for its katakana terms."""
    lengths = tf.quality_signals(tf.normalize(TECH), "ja")["sentence_lengths"]
    assert (lengths > 200).sum() >= 5  # the fixture still holds what the test is about
    notes_lines = [line for line in NOTES.split("\n") if line.strip()]
    headings = [line for line in notes_lines if not line.endswith("。") and not line.startswith("- ")]
    assert len(headings) >= 0.4 * len(notes_lines)
    assert sum(bool(tf._CODE_LINE.match(h)) for h in headings) >= 6  # the lines that made the notes "code"
    assert not any(tf.is_code_line(line) for line in TECH.split("\n") + notes_lines)
    for name, text in [("ja_technical", TECH), ("ja_technical_notes", NOTES)]:
        docs = [text] + page_chunks(text, 600) + page_chunks(text, 1000)
        for i, doc in enumerate(docs):
            doc = tf.normalize(doc)
            s = tf.quality_signals(doc, "ja")
            assert tf.detect_language(doc) == "ja", (name, i, doc[:40])
            assert tf.filter_reason(s, "ja") is None, (name, i, tf.filter_reason(s, "ja"), doc[:40])


def test_japanese_repetition_is_over_script_runs():
    """A Japanese n-gram unit is a run of one script: トランスフォーマー is one unit, as "transformer" is one word, so
    repeating a term is not a repeated 5-gram; copied text and spam still are. Spam (the same sentence, a ranked
    list, a katakana keyword list) is rejected, and with the compression rule off, by the n-gram rules alone."""
    h, lengths, _ = tf.units("事前学習(Pre-training)では、トランスフォーマーを使う。", script_runs=True)
    assert lengths.tolist() == [4, 3, 8, 2, 9, 1, 1, 1]  # 事前学習 Pre training では トランスフォーマー を 使 う
    assert len(tf.units("事前学習")[0]) == 4  # the default stays one unit per character (MinHash, decontamination)
    mha = tf.normalize(next(p for p in TECH.split("\n\n") if p.count("アテンションヘッド") >= 4))
    assert max(tf.quality_signals(mha, "ja")["dup_ngram_chars"].values()) < 0.05
    spam = [
        "このサプリを飲むだけで、誰でも簡単に一か月で五キロ痩せられると大評判です。" * 30,
        "\n".join(["このサプリを飲むだけで、誰でも簡単に一か月で五キロ痩せられると大評判です。"] * 30),
        "\n".join(f"第{i}位のダイエットサプリは、飲むだけで簡単に痩せられると口コミで話題のおすすめ商品です。"
                  for i in range(1, 21)),
        "\n".join(f"{city}のダイエットサプリ激安通販ランキング、口コミで人気のおすすめはこちらです。"
                  for city in ["東京", "大阪", "名古屋", "福岡", "札幌", "仙台", "広島", "京都", "神戸", "横浜"]),
        "ダイエット、サプリ、激安、通販、ランキング、口コミ、おすすめ、人気、送料、ポイント。" * 12 + "\n" + JA[0],
    ]
    no_compression = {**tf.THRESHOLDS, "min_compression": 0.0}
    for text in spam:
        s = tf.quality_signals(tf.normalize(text), "ja")
        assert tf.filter_reason(s, "ja") is not None, text[:30]
        assert tf.filter_reason(s, "ja", no_compression) in {"dup_lines", "top_ngram", "dup_ngrams"}, text[:30]
    half_copied = JA[0] + JA[1] + JA[0][:len(JA[0]) // 2] + "。"
    assert tf.filter_reason(tf.quality_signals(tf.normalize(half_copied), "ja"), "ja") == "dup_ngrams"


def test_japanese_sentence_rules_take_a_share_of_long_sentences():
    """One long sentence among normal ones is kept (Swallow drops any over 200 characters); a document that is
    mostly one 2,000-character run-on is not, with or without its final 。; headings and list items are not
    sentences (30 short list items do not pull the mean under 20); sentences ending in … (... after NFKC) count."""
    prose = [p.replace("\n", "") for p in TECH.split("\n\n") if not p.startswith(("#", "-"))]
    normal = "\n".join(JA[:6])
    long_one = "".join(JA[6:9]).replace("。", "、")[:400] + "。"
    s = tf.quality_signals(tf.normalize(normal + "\n" + long_one), "ja")
    assert s["sentence_lengths"].max() == 401 and tf.filter_reason(s, "ja") is None
    run_on = "".join(prose).replace("。", "、")[:2000]
    assert len(run_on) == 2000 and "。" not in run_on
    for end in ("。", ""):
        s = tf.quality_signals(tf.normalize(JA[0] + "\n" + run_on + end), "ja")
        assert tf.filter_reason(s, "ja") == "ja_long_sentences"
    listed = "\n".join(f"- 項目{i}: 設定値{i}" for i in range(30)) + "\n" + "\n".join(JA[:2])
    s = tf.quality_signals(tf.normalize(listed), "ja")
    counted_all = {**tf.THRESHOLDS, "min_bare_sentence": 0}
    assert tf.sentence_stats(s["sentence_lengths"], s["sentence_ended"], counted_all)[0] < 20
    assert tf.sentence_stats(s["sentence_lengths"], s["sentence_ended"])[0] > 20
    headed = "\n".join(f"## 第{i}節 見出し(Section {i})\n{p}" for i, p in enumerate(JA))
    assert tf.filter_reason(tf.quality_signals(tf.normalize(headed), "ja"), "ja") is None
    trailing = "\n".join(p + "\nそれから…\nまあ、いいか…" for p in JA[:6])
    assert tf.filter_reason(tf.quality_signals(tf.normalize(trailing), "ja"), "ja") == "ja_ellipsis"


def test_language_id_on_japanese_with_english_in_it():
    """English headings, terms and sentences inside Japanese text leave it ja; a Japanese word or two inside English
    leaves it en; plain English lines are en; Japanese inside code strings and comments leaves it code."""
    labelled = [
        ("ja", 'Transformerは Vaswani et al. (2017) の "Attention Is All You Need" で提案されたアーキテクチャで、'
               "self-attention と feed-forward network を積み重ねる。"),
        ("ja", "## Attention (注意機構)\nアテンションは、系列の各位置が他の位置を参照して情報を集める仕組みである。"),
        ("ja", "事前学習(Pre-training)\n大量のテキストで次のトークンを予測する。\nファインチューニング(Fine-tuning)\n"
               "指示データで追加学習する。"),
        ("ja", "We evaluated the model on JGLUE. 評価にはllm-jp-evalを使い、JCommonsenseQAとJNLIのスコアを報告する。"),
        ("en", "Training went smoothly after we lowered the learning rate."),
        ("en", "Our tokenizer splits Japanese text into fewer tokens than theirs."),
        ("en", "In Japanese, thank you is ありがとう and the word for cat is ねこ."),
        ("code", 'print("こんにちは")\nx = 1  # 初期値\nfor i in range(3):\n    print(i)'),
        ("code", '# データを読み込む\nimport json\nwith open("データ.json") as f:\n    rows = json.load(f)\nprint(len(rows))'),
    ]
    for lang, text in labelled:
        assert tf.detect_language(tf.normalize(text)) == lang, (lang, text[:40])
    for line in ["事前学習(Pre-training)", "## Attention (注意機構)", "## Results", "損失=0.5まで下がった", "@タヌキ さん、どうも"]:
        assert not tf.is_code_line(line), line
    for line in ['print("こんにちは")', "x = 1  # 初期値", 'System.out.println("合計");', "#include <stdio.h>"]:
        assert tf.is_code_line(line), line


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
