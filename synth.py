"""
Stage 4: synthetic data from a teacher (docs/recipe.md "Data": 100-200B teacher-written tokens turned flat
benchmark curves into a usable chat model). Three teachers, one output format:

    python synth.py                                          # offline: verifiable tasks, nothing needed (tiny run)
    python synth.py --backend=openai --model=Qwen/Qwen2.5-7B-Instruct --base_url=http://127.0.0.1:8000/v1 \\
        --num_samples=100000 --concurrency=64 --out_dir=out/synth_qwen   # any OpenAI-compatible server (vLLM)
    python synth.py --backend=local --init_from=out/sft --tasks="['multiturn']"   # our own checkpoint
    python synth.py --backend=openai --tasks="['arithmetic','date']"   # a teacher on verifiable tasks: checked

Sample i is always the same prompt (its random draws are seeded by (seed, i)), so a re-run skips the ids already
written and continues where the last run stopped. Output, in out_dir:
    chat.jsonl       {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task", "lang",
                      "teacher", "seed"} (+ "answer" for verifiable tasks): SFT data
                     (docs/design.md "Chat data and DPO pairs")
    pretrain.jsonl   {"text": "user: ...\\nassistant: ..."}: the same conversations without masks, as Tanuki fed
                     instruction data into pretraining; a source for `prepare_data.py --input=`
    rejected.jsonl   samples the filters dropped, with the reason;   failures.jsonl   errors (retried on re-run)
    summary.json     counts by outcome and reason
chat.jsonl of the offline backend is what later stages judge and evaluate with: each task carries its "answer", which
textfilters.verify_answer checks (the DPO stage's offline judge, eval.py's verifiable tasks). They read the file;
stages never import each other.
"""

import ast
import datetime
import json
import os
import random
import re
import sys
import sysconfig
import time
import concurrent.futures

import dedup
import textfilters as tf
from common import load_config, set_cpu_threads
from corpus import append_jsonl, read_jsonl
from llm_api import chat_completion

# -----------------------------------------------------------------------------
backend = "offline"      # offline (verifiable tasks, no model) | openai (any OpenAI-compatible server) | local
tasks = []               # task kinds to cycle through; [] = OFFLINE_KINDS for offline, TEACHER_KINDS otherwise
num_samples = 2000       # sample ids 0 .. num_samples-1; raise it and re-run to extend a dataset
out_dir = "out/synth"
seed = 0
passages = ""            # a .txt (paragraphs) or .jsonl ("text") corpus for grounded / rewrite / translate tasks;
                         # "" = module docstrings of the Python standard library (on every machine)
max_passages = 500
# openai backend: model, base_url, api_key from here or the environment (OPENAI_BASE_URL, OPENAI_API_KEY)
model = ""
base_url = ""
api_key = ""
concurrency = 8          # requests in flight; vLLM batches them (about 1 sample/s per GPU for a ~10B teacher)
timeout = 120.0          # seconds per request
max_retries = 4          # on 5xx / 429 / timeouts / connection errors / invalid JSON, with exponential backoff
backoff = 1.0            # seconds before the first retry, doubled each time
vllm_extras = True       # send vLLM's repetition_penalty (an OpenAI server rejects unknown parameters: set False)
# local backend
init_from = ""
device = "auto"
batch_size = 8
# sampling (common settings; docs/recipe.md "Synthetic data" gives only the rewrite task's 0.1 / 1.2)
temperature = 0.7
top_p = 0.95
max_tokens = 1024
# filters
min_ja_fraction = 0.3    # Japanese tasks: >= 30% of the letters in Japanese script (docs/recipe.md "Synthetic data")
max_repetition = 0.5     # share of characters covered by repeated 10-grams (20 characters in Japanese): a loop
near_dup = True          # MinHash/LSH near-duplicate filter for teacher tasks (FineWeb's 14 x 8 bands)
if __name__ == "__main__":
    config = load_config(globals())  # only as a script: the tests import its functions
# -----------------------------------------------------------------------------
# data: the random draws behind the prompts (docs/recipe.md "Synthetic data": random roles/personas and keywords)

ROLES = {
    "ja": ["高校の数学教師", "小学校の先生", "料理研究家", "ソフトウェアエンジニア", "歴史学者", "旅行ガイド", "医師",
           "弁護士", "農家", "編集者", "物理学者", "図書館司書", "カウンセラー", "経営コンサルタント", "気象予報士"],
    "en": ["high-school math teacher", "primary-school teacher", "chef", "software engineer", "historian",
           "travel guide", "physician", "lawyer", "farmer", "editor", "physicist", "librarian", "counsellor",
           "management consultant", "weather forecaster"],
}
KEYWORDS = {
    "ja": ["里山", "タヌキ", "俳句", "温泉", "地震", "稲作", "新幹線", "茶道", "台風", "祭り", "漢字", "発酵食品",
           "少子化", "再生可能エネルギー", "図書館", "将棋", "桜", "江戸時代", "ロボット", "給食"],
    "en": ["rainforests", "compound interest", "volcanoes", "the printing press", "vaccines", "chess", "bridges",
           "photosynthesis", "recycling", "the Silk Road", "jazz", "sleep", "bees", "satellites", "tea",
           "elections", "glaciers", "bread", "maps", "batteries"],
}
GENRES = {
    "ja": ["説明文", "手紙", "物語", "比較", "手順書", "要約", "議論", "クイズ", "アドバイス", "計画"],
    "en": ["explanation", "letter", "short story", "comparison", "how-to guide", "summary", "debate", "quiz",
           "advice", "plan"],
}
# docs/recipe.md "Synthetic data": aim at what small models get wrong: code, extraction, math, reasoning, formats
PROBLEM_AREAS = {
    "ja": ["割合と比", "連立方程式", "確率", "図形の面積", "Pythonの関数", "リストの並べ替え", "文字列処理",
           "論理パズル", "真偽の推論", "文章からの情報抽出"],
    "en": ["ratios", "simultaneous equations", "probability", "areas of shapes", "a Python function",
           "sorting a list", "string processing", "a logic puzzle", "truth-teller puzzles", "extracting facts from text"],
}
# docs/recipe.md "Synthetic data": multi-turn continuations with ~30 follow-up question styles
FOLLOWUPS = [
    ("前提を一つ変えると、結論はどう変わりますか。", "If one premise changed, how would the conclusion change?"),
    ("小学生にも分かるように言い換えてください。", "Explain it again so a ten-year-old understands."),
    ("具体例をもう一つ挙げてください。", "Give one more concrete example."),
    ("反対の立場から反論してください。", "Argue against it from the opposite side."),
    ("要点を三つの箇条書きにまとめてください。", "Summarize the key points in three bullets."),
    ("その説明に誤りがないか見直してください。", "Check your explanation for mistakes."),
    ("数字を使って説明し直してください。", "Explain it again using numbers."),
    ("歴史的な背景を補足してください。", "Add the historical background."),
    ("よくある誤解を一つ挙げて訂正してください。", "Name one common misconception and correct it."),
    ("百字以内で要約してください。", "Summarize it in under fifty words."),
    ("初心者が最初にすべきことは何ですか。", "What should a beginner do first?"),
    ("メリットとデメリットを比較してください。", "Compare the advantages and disadvantages."),
    ("表の形にまとめてください。", "Put it in a table."),
    ("専門家向けに詳しく説明してください。", "Explain it in depth for an expert."),
    ("十年後にはどうなっていると思いますか。", "What will it look like in ten years?"),
    ("身近な例えで説明してください。", "Explain it with an everyday analogy."),
    ("その結論の根拠は何ですか。", "What is the evidence for that conclusion?"),
    ("別の方法はありますか。", "Is there another way to do it?"),
    ("失敗しやすい点を教えてください。", "Where do people usually go wrong?"),
    ("質問を三つ作ってください。", "Write three quiz questions about it."),
    ("英語圏と日本ではどう違いますか。", "How does it differ between Japan and English-speaking countries?"),
    ("コストの面から考え直してください。", "Reconsider it in terms of cost."),
    ("安全面での注意点はありますか。", "Are there any safety concerns?"),
    ("一文で言うとどうなりますか。", "Say it in one sentence."),
    ("条件が二倍になったら答えはどうなりますか。", "What if the numbers were doubled?"),
    ("子ども向けの短い物語にしてください。", "Turn it into a short story for children."),
    ("その答えに自信がない部分はどこですか。", "Which part of your answer are you least sure about?"),
    ("手順を番号付きで書いてください。", "Write it as numbered steps."),
    ("反例はありますか。", "Is there a counterexample?"),
    ("最初の答えを改善してください。", "Improve your first answer."),
]
REWRITE_STYLES = {  # docs/recipe.md "Synthetic data": Phi-3 rewrote web text as textbook, Q&A and dialogue
    "ja": ["教科書の一節", "質問と回答の組", "先生と生徒の対話"],
    "en": ["a textbook section", "questions and answers", "a teacher-student dialogue"],
}
ASKS = {  # each teacher task's instruction; {role}, {keyword}, ... are the sample's random draws
    "free": {"ja": "あなたは{role}です。「{keyword}」をテーマにした{genre}の課題を一つ作り、模範的な回答を書いてください。"
                   "課題には{n1}や{n2}のような具体的な数や条件を含めてください。",
             "en": "You are a {role}. Write one {genre} task about {keyword} and a model answer to it. "
                   "Include concrete numbers or conditions such as {n1} or {n2}."},
    "grounded": {"ja": "次の文章の内容から答えられる質問を一つ日本語で作り、その答えを書いてください。質問は文章を見なくても"
                       "意味が通るようにしてください。\n\n{passage}\n",
                 "en": "Write one question that the following passage answers, and its answer. The question must "
                       "make sense without the passage.\n\n{passage}\n"},
    "problem": {"ja": "あなたは{role}です。{area}の問題を一つ作り、途中の考え方を示した解答を書いてください。"
                      "数値を使う場合は{n1}と{n2}を使ってください。",
                "en": "You are a {role}. Write one problem on {area} and a worked solution showing each step. "
                      "If it needs numbers, use {n1} and {n2}."},
    "multiturn": {"ja": "{keyword}について、{genre}の形で教えてください。",
                  "en": "Tell me about {keyword} (format: {genre})."},
    "rewrite": {"ja": "次の文章を{style}の形で日本語に書き直してください。ヘッダーやフッター、広告など本文でない部分は"
                      "除いてください。\n\n{passage}",
                "en": "Rewrite the following text as {style}. Leave out headers, footers and anything that is not "
                      "the main text.\n\n{passage}"},
    "translate": {"ja": "次の文章を自然な日本語に翻訳してください。\n\n{passage}",
                  "en": "Translate the following text into natural English.\n\n{passage}"},
}
LAYOUT = {"ja": ("#問題", "#回答"), "en": ("#Question", "#Answer")}  # Tanuki's fixed layout: one call, a Q and an A
REFUSALS = ["i'm sorry, but", "i am sorry, but", "i cannot help", "i can't help", "i can't assist", "i cannot assist",
            "as an ai language model", "i'm unable to", "i am unable to", "申し訳ありませんが", "お答えできません",
            "お手伝いできません", "aiアシスタントとして", "ai言語モデルとして", "対応いたしかねます"]

OFFLINE_KINDS = ["arithmetic", "comparison", "date", "unit", "choice"]
TEACHER_KINDS = ["free", "grounded", "multiturn", "rewrite", "translate", "problem"]
LANGS = ["ja", "en"]
NAMES = {"ja": ["佐藤", "鈴木", "高橋", "田中", "伊藤", "山本"], "en": ["Ken", "Mary", "Tom", "Aiko", "Ravi", "Lena"]}
ITEMS = {"ja": ["りんご", "鉛筆", "シール", "ビー玉", "クッキー"], "en": ["apples", "pencils", "stickers", "marbles", "cookies"]}
WEEKDAYS = {"ja": [d + "曜日" for d in "月火水木金土日"],
            "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
UNITS = [  # (from, to, factor, ja from, ja to)
    ("kilometers", "meters", 1000, "キロメートル", "メートル"), ("meters", "centimeters", 100, "メートル", "センチメートル"),
    ("kilograms", "grams", 1000, "キログラム", "グラム"), ("hours", "minutes", 60, "時間", "分"),
    ("minutes", "seconds", 60, "分", "秒"), ("liters", "milliliters", 1000, "リットル", "ミリリットル"),
    ("days", "hours", 24, "日", "時間"),
]
NUMBER_ONLY = {"ja": "数字のみで答えてください。", "en": "Answer with the number only."}
OPTION_ONLY = {"ja": "番号のみで答えてください。", "en": "Answer with the option number only."}

# -----------------------------------------------------------------------------
# the offline generator: verifiable tasks with known answers, in the strict formats small models fail
# (docs/recipe.md "Evaluation": Jaster answers like "2. motherboard" where "2" was required scored zero)


def _date_ja(d):
    return f"{d.year}年{d.month}月{d.day}日"


def _choice(rng, lang):
    """Four numbered options, exactly one right: a product, the one prime, or the next weekday."""
    sub = rng.choice(["product", "prime", "weekday"])
    if sub == "product":
        a, b = rng.randint(3, 19), rng.randint(3, 19)
        right = a * b
        wrong = rng.sample(sorted({right + a, right - a, right + b, right - b, right + 10, right - 1} - {right}), 3)
        q = {"ja": f"次のうち、{a}×{b}と等しいものはどれですか。", "en": f"Which of the following equals {a} × {b}?"}[lang]
        options = [str(x) for x in [right] + wrong]
    elif sub == "prime":
        primes = [p for p in range(11, 100) if all(p % k for k in range(2, p))]
        composites = [c for c in range(10, 100) if c not in primes and c % 2]  # odd, so not trivially even
        options = [str(rng.choice(primes))] + [str(c) for c in rng.sample(composites, 3)]
        q = {"ja": "次のうち、素数はどれですか。", "en": "Which of the following is a prime number?"}[lang]
    else:
        k = rng.randrange(7)
        day, nxt = WEEKDAYS[lang][k], WEEKDAYS[lang][(k + 1) % 7]
        options = [nxt] + rng.sample([d for d in WEEKDAYS[lang] if d not in (day, nxt)], 3)
        q = {"ja": f"{day}の次の曜日はどれですか。", "en": f"Which day comes right after {day}?"}[lang]
    right = options[0]
    rng.shuffle(options)
    lines = "\n".join(f"{n}. {o}" for n, o in enumerate(options, 1))
    return f"{q}\n{lines}\n{OPTION_ONLY[lang]}", str(options.index(right) + 1)


def offline_task(rng, kind, lang):
    """A verifiable task: {"messages": [user], "answer": the exact expected reply, "kind", "lang"}. `rng` is a
    random.Random; the same state gives the same task."""
    name, item = rng.choice(NAMES[lang]), rng.choice(ITEMS[lang])
    if kind == "arithmetic":
        form = rng.randrange(3)
        if form == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            c = rng.randint(1, a + b)
            answer = a + b - c
            q = {"ja": f"{name}さんは{item}を{a}個持っています。{b}個買い足し、友だちに{c}個あげました。"
                       f"{name}さんの{item}は今いくつですか。",
                 "en": f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. "
                       f"How many {item} does {name} have now?"}[lang]
        elif form == 1:
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            answer = a * b
            q = {"ja": f"1箱に{item}が{a}個入っています。{b}箱では{item}は全部で何個ですか。",
                 "en": f"A box holds {a} {item}. How many {item} are there in {b} boxes?"}[lang]
        else:
            b, answer = rng.randint(2, 12), rng.randint(2, 20)
            q = {"ja": f"{item}{answer * b}個を{b}人で同じ数ずつ分けます。一人あたり何個になりますか。",
                 "en": f"{answer * b} {item} are shared equally among {b} children. How many does each child get?"}[lang]
        text, answer = f"{q}{'' if lang == 'ja' else ' '}{NUMBER_ONLY[lang]}", str(answer)
    elif kind == "comparison":
        # same integer part, decimals of different lengths: the 9.11-vs-9.9 trap
        whole, x = rng.randint(0, 20), rng.randint(1, 9)
        y = rng.choice([v for v in range(11, 100) if v % 10])  # never x0: 3.5 vs 3.50 would be a tie
        a, b = f"{whole}.{x}", f"{whole}.{y}"
        if rng.random() < 0.5:
            a, b = b, a
        larger = rng.random() < 0.5
        answer = max(a, b, key=float) if larger else min(a, b, key=float)
        word = {"ja": "大きい" if larger else "小さい", "en": "larger" if larger else "smaller"}[lang]
        text = {"ja": f"{a}と{b}では、どちらが{word}ですか。その数だけを答えてください。",
                "en": f"Which is {word}, {a} or {b}? Answer with that number only."}[lang]
    elif kind == "date":
        d1 = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
        if rng.random() < 0.5:
            answer = WEEKDAYS[lang][d1.weekday()]
            text = {"ja": f"{_date_ja(d1)}は何曜日ですか。「月曜日」のように曜日だけを答えてください。",
                    "en": f"What day of the week was {MONTHS[d1.month - 1]} {d1.day}, {d1.year}? "
                          "Answer with the day name only (e.g. Monday)."}[lang]
        else:
            days = rng.randint(1, 400)
            d2 = d1 + datetime.timedelta(days=days)
            answer = str(days)
            text = {"ja": f"{_date_ja(d1)}から{_date_ja(d2)}までは何日ありますか。{NUMBER_ONLY['ja']}",
                    "en": f"How many days are there from {d1.isoformat()} to {d2.isoformat()}? {NUMBER_ONLY['en']}"}[lang]
    elif kind == "unit":
        src, dst, factor, src_ja, dst_ja = rng.choice(UNITS)
        value = rng.randint(1, 40) + (0.5 if factor % 2 == 0 and rng.random() < 0.5 else 0)  # x.5 keeps it whole
        shown = f"{value:g}"
        answer = str(int(value * factor))
        text = {"ja": f"{shown}{src_ja}は何{dst_ja}ですか。{NUMBER_ONLY['ja']}",
                "en": f"How many {dst} are in {shown} {src}? {NUMBER_ONLY['en']}"}[lang]
    elif kind == "choice":
        text, answer = _choice(rng, lang)
    else:
        raise ValueError(f"unknown offline task kind {kind!r}; kinds: {OFFLINE_KINDS}")
    return {"messages": [{"role": "user", "content": text}], "answer": answer, "kind": kind, "lang": lang}


def offline_tasks(n, seed=0, kinds=OFFLINE_KINDS):
    """Tasks 0..n-1 of make_task (what the offline backend writes, as a list)."""
    return [make_task(i, seed, kinds) for i in range(n)]


# -----------------------------------------------------------------------------
# teacher tasks: prompts for a model, built from random draws


def load_passages(path="", limit=500, min_chars=200, max_chars=2000):
    """Passages for grounded questions, rewriting and translation (docs/recipe.md "Synthetic data": Wikipedia
    passages seed questions). A .jsonl gives its "text" fields, any other file its blank-line-separated paragraphs;
    without a path, the module docstrings of the standard library, so nothing is downloaded. Fixed order: sample i
    draws the same one."""
    texts = []
    if path:
        if path.endswith(".jsonl"):  # bad lines are skipped and reported, with their file:line
            texts = [r.get("text", "") if isinstance(r.get("text"), str) else "" for r in read_jsonl(path)]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts = f.read().split("\n\n")
    else:
        root = sysconfig.get_paths()["stdlib"]
        for name in sorted(os.listdir(root)):
            if name.endswith(".py") and len(texts) < limit:
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                    try:
                        texts.append(ast.get_docstring(ast.parse(f.read())) or "")
                    except SyntaxError:
                        continue
    out = [t.strip()[:max_chars] for t in texts if len(t.strip()) >= min_chars]
    return out[:limit]


def _layout_prompt(lang, ask):
    q, a = LAYOUT[lang]
    tail = {"ja": f"次の形式で出力してください。\n{q}\n(問題文)\n{a}\n(回答)",
            "en": f"Use exactly this layout.\n{q}\n(the question)\n{a}\n(the answer)"}[lang]
    return f"{ask}\n{tail}"


def teacher_task(rng, kind, lang, pool):
    """A prompt for a teacher model: {"turns": [user messages], "kind", "lang" (of the reply), "sampling",
    "layout" (the reply is a #問題 / #回答 pair to split into the conversation)}."""
    if kind not in ASKS:
        raise ValueError(f"unknown task kind {kind!r}; kinds: {TEACHER_KINDS + OFFLINE_KINDS}")
    passage = ""
    if kind in ("grounded", "rewrite", "translate"):
        if not pool:
            raise ValueError(f"task {kind} needs passages: none loaded")
        passage = rng.choice(pool)
    if kind == "translate":
        lang = "en" if tf.detect_language(passage) == "ja" else "ja"  # into the other language
    draws = dict(role=rng.choice(ROLES[lang]), keyword=rng.choice(KEYWORDS[lang]), genre=rng.choice(GENRES[lang]),
                 area=rng.choice(PROBLEM_AREAS[lang]), style=rng.choice(REWRITE_STYLES[lang]),
                 n1=rng.randint(2, 99), n2=rng.randint(2, 999), passage=passage)  # numbers too, as Tanuki's scripts
    ask, layout = ASKS[kind][lang].format(**draws), kind in ("free", "grounded", "problem")
    turns = [_layout_prompt(lang, ask) if layout else ask]
    if kind == "multiturn":
        turns.append(rng.choice(FOLLOWUPS)[LANGS.index(lang)])
    sampling = {"temperature": temperature, "top_p": top_p}
    # Tanuki's rewriting scripts: temperature 0.1, repetition penalty 1.2 (docs/recipe.md "Synthetic data")
    if kind == "rewrite":
        sampling = {"temperature": 0.1, "top_p": top_p, **({"repetition_penalty": 1.2} if vllm_extras else {})}
    return {"turns": turns, "kind": kind, "lang": lang, "sampling": sampling, "layout": layout}


def make_task(i, seed, kinds, pool=None):
    """Sample i: the kind and language cycle (balanced), the draws are seeded by (seed, i), so sample i is the same
    prompt in every run and a resumed run continues the same dataset. A string seed is hashed with SHA-512 by
    random.Random: stable across processes, unlike hash()."""
    kind, lang = kinds[i % len(kinds)], LANGS[(i // len(kinds)) % len(LANGS)]
    rng = random.Random(f"{seed}-{i}")
    if kind in OFFLINE_KINDS:
        task = offline_task(rng, kind, lang)
        task.update(turns=[task.pop("messages")[0]["content"]], sampling={"temperature": temperature, "top_p": top_p},
                    layout=False)
    else:
        task = teacher_task(rng, kind, lang, pool)
    task["id"] = i
    return task


# -----------------------------------------------------------------------------
# backends: each turns a task into (messages, finish_reason, completion tokens)


def run_turns(task, ask):
    """Play the task's user turns against `ask(messages, sampling)`; stops early when a reply is cut off."""
    messages, finish, tokens = [], "stop", 0
    for turn in task["turns"]:
        messages.append({"role": "user", "content": turn})
        content, finish, n = ask(messages, task["sampling"])
        messages.append({"role": "assistant", "content": content})
        tokens += n
        if finish == "length":
            break
    return messages, finish, tokens


def openai_results(todo):
    """Yield (task, (messages, finish, tokens) or the exception) with `concurrency` requests in flight, in the order
    they complete. Tasks are submitted as slots free up, so a million-sample run holds a few futures, not a million."""
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1").rstrip("/")
    key = api_key or os.environ.get("OPENAI_API_KEY", "")
    name = model or os.environ.get("OPENAI_MODEL", "")

    def ask(messages, sampling):
        return chat_completion(messages, {"max_tokens": max_tokens, **sampling}, url, key, name, timeout, max_retries,
                               backoff)

    todo = iter(todo)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        running = {}
        while True:
            while len(running) < 2 * concurrency and (task := next(todo, None)) is not None:
                running[pool.submit(run_turns, task, ask)] = task
            if not running:
                return
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                yield task, future.exception() or future.result()


def local_results(todo):
    """Generate with our own checkpoint, batch_size tasks at a time, turn by turn in lockstep. model.generate has no
    repetition penalty: the rewrite task samples here at its temperature without it."""
    import torch

    from checkpoint import load_checkpoint
    from tokenizer import render_chat, special_id
    set_cpu_threads()  # as every torch stage: one thread per core this process may use (common.py)
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    net, enc, _ = load_checkpoint(init_from, device=dev)
    net.eval()
    stops = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        state = {t["id"]: ([], "stop", 0) for t in batch}
        try:
            for turn in range(max(len(t["turns"]) for t in batch)):
                live = [t for t in batch if turn < len(t["turns"]) and state[t["id"]][1] != "length"]
                if not live:
                    break
                for t in live:
                    state[t["id"]][0].append({"role": "user", "content": t["turns"][turn]})
                prompts = [render_chat(enc, state[t["id"]][0], add_generation_prompt=True)[0] for t in live]
                room = min(max_tokens, net.cfg.max_seq_len - max(map(len, prompts)))
                if room <= 0:
                    raise ValueError(f"prompt of {max(map(len, prompts))} tokens leaves no room in "
                                     f"max_seq_len {net.cfg.max_seq_len}")
                sampling = live[0]["sampling"]
                outs = net.generate(prompts, room, stop_tokens=stops, temperature=sampling["temperature"],
                                    top_p=sampling["top_p"], seed=seed + live[0]["id"] + turn)
                for t, out in zip(live, outs):
                    messages, _, n = state[t["id"]]
                    messages.append({"role": "assistant", "content": enc.decode(out)})
                    state[t["id"]] = (messages, "length" if len(out) >= room else "stop", n + len(out))
        except Exception as e:  # noqa: BLE001  the batch's error is every sample's failure, recorded, not fatal
            for t in batch:
                yield t, e
            continue
        for t in batch:
            yield t, state[t["id"]]


def offline_results(todo):
    """The offline teacher answers with the known answer; tokens are counted as text units (words, CJK characters)."""
    for task in todo:
        messages = [{"role": "user", "content": task["turns"][0]}, {"role": "assistant", "content": task["answer"]}]
        yield task, (messages, "stop", len(tf.units(task["answer"])[0]))


# -----------------------------------------------------------------------------
# filters: a reason to drop a sample, or None


def split_layout(reply, lang):
    """A '#問題 ... #回答 ...' reply as (question, answer), or None when the layout is missing."""
    q, a = (re.escape(x) for x in LAYOUT[lang])
    m = re.search(rf"{q}\s*(.+?)\s*{a}\s*(.+)", reply, re.S)
    return (m.group(1).strip(), m.group(2).strip()) if m else None


def reject_reason(task, messages, finish):
    """Why a generated conversation should not be written (None: keep). The checks of Tanuki's generation scripts
    (docs/recipe.md "Synthetic data"): empty or cut-off answers, the wrong language (>= 30% Japanese script for
    Japanese tasks), character repetition loops, refusals; and for verifiable tasks answered by a model, a wrong
    answer."""
    if finish == "length":
        return "truncated"
    for m in messages[1::2]:
        reply = m["content"]
        if not reply.strip():
            return "empty"
        c = tf.script_counts(reply)
        if c["letters"] >= 20:  # "42" has no language
            ja = (c["hiragana"] + c["katakana"] + c["kanji"]) / c["letters"]
            if (ja < min_ja_fraction) if task["lang"] == "ja" else (ja >= min_ja_fraction):
                return "wrong_language"
        hashes, lengths, _ = tf.units(reply)
        if len(hashes) >= 40:
            _, dup = tf.repetition_stats(hashes, lengths, ns_top=(), ns_dup=(10,), scale=2 if task["lang"] == "ja" else 1)
            if dup[10] > max_repetition:
                return "repetition"
        head = reply[:300].lower()
        if any(p in head for p in REFUSALS):
            return "refusal"
    if "answer" in task and not tf.verify_answer(task["answer"], messages[-1]["content"]):
        return "wrong_answer"
    return None


def conversation_text(messages):
    """The pretraining form: roles as plain words, no special tokens and no loss mask."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class Dedup:
    """Exact (normalized hash) and near (MinHash/LSH over 5-gram shingles, FineWeb's 14 bands x 8 rows) duplicate
    index, filled incrementally as samples are written. A class because the two indexes live and grow together."""

    def __init__(self):
        self.exact, self.bands = set(), set()

    def check_and_add(self, text, near):
        h = dedup.exact_hash(text)
        if h in self.exact:
            return "exact_duplicate"
        bands = set()
        if near:
            bands = set(enumerate(dedup.lsh_band_hashes(dedup.minhash([dedup.shingles(text)]))[0].tolist()))
            if bands & self.bands:
                return "near_duplicate"
        self.exact.add(h)
        self.bands |= bands
        return None


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    from tqdm import tqdm

    kinds = tasks or (OFFLINE_KINDS if backend == "offline" else TEACHER_KINDS)
    unknown = [k for k in kinds if k not in OFFLINE_KINDS + TEACHER_KINDS]
    if unknown or backend not in ("offline", "openai", "local"):
        sys.exit(f"unknown task kinds {unknown} or backend {backend!r}: kinds {OFFLINE_KINDS + TEACHER_KINDS}, "
                 "backends offline / openai / local")
    if backend == "offline" and set(kinds) - set(OFFLINE_KINDS):
        sys.exit(f"the offline backend answers only {OFFLINE_KINDS}; teacher tasks need --backend=openai or local")
    if backend == "local" and not init_from:
        sys.exit("--backend=local needs --init_from=CHECKPOINT")
    teacher = {"offline": "offline", "local": init_from,
               "openai": model or os.environ.get("OPENAI_MODEL", "") or "openai"}[backend]
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("chat", "rejected", "failures")}

    # resume: ids already written (kept or rejected) are done; failures are retried. The dedup index is rebuilt
    # from what was kept, so a duplicate of a sample written before a kill is still caught after it.
    kept, rejected = read_jsonl(paths["chat"], complete_only=True), read_jsonl(paths["rejected"], complete_only=True)
    done = {r["id"] for r in kept} | {r["id"] for r in rejected}
    seen = Dedup()
    for r in kept:
        seen.check_and_add(conversation_text(r["messages"]), near_dup and r["task"] in TEACHER_KINDS)
    pool = load_passages(passages, max_passages) if set(kinds) & {"grounded", "rewrite", "translate"} else None
    counts = {"written": 0, "rejected": {}, "failed": {}, "already_done": len(done)}
    todo, build_errors = [], []
    for i in range(num_samples):
        if i not in done:
            try:
                todo.append(make_task(i, seed, kinds, pool))
            except ValueError as e:
                build_errors.append((i, e))
    results = {"offline": offline_results, "openai": openai_results, "local": local_results}[backend](todo)
    files = {k: append_jsonl(p) for k, p in paths.items()}  # a line a kill left half-written is cut first

    def write(kind, record):
        # one line per sample, flushed: a kill loses at most the line being written
        files[kind].write(json.dumps(record, ensure_ascii=False) + "\n")
        files[kind].flush()

    for i, e in build_errors:
        write("failures", {"id": i, "error": f"task: {e}"})
        counts["failed"]["task"] = counts["failed"].get("task", 0) + 1
    t0, tokens = time.time(), 0
    bar = tqdm(results, total=len(todo), unit="sample", desc=f"synth ({backend})", dynamic_ncols=True)
    for task, result in bar:
        base = {"id": task["id"], "task": task["kind"], "lang": task["lang"], "teacher": teacher, "seed": seed}
        if isinstance(result, BaseException):
            kind = type(result).__name__
            counts["failed"][kind] = counts["failed"].get(kind, 0) + 1
            write("failures", {**base, "error": f"{kind}: {result}"})
            continue
        messages, finish, n = result
        tokens += n
        reason = reject_reason(task, messages, finish)
        if reason is None and task["layout"]:
            pair = split_layout(messages[-1]["content"], task["lang"])
            if pair is None:
                reason = "bad_layout"
            else:
                messages = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        if reason is None:
            reason = seen.check_and_add(conversation_text(messages), near_dup and task["kind"] in TEACHER_KINDS)
        record = {**base, "messages": messages, **({"answer": task["answer"]} if "answer" in task else {})}
        if reason:
            counts["rejected"][reason] = counts["rejected"].get(reason, 0) + 1
            write("rejected", {**record, "reason": reason})
        else:
            counts["written"] += 1
            write("chat", record)
        bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}", kept=counts["written"], refresh=False)
    bar.close()
    for f in files.values():
        f.close()

    # the pretraining form of everything kept so far, rewritten whole (write aside, then rename: never half a file)
    kept = read_jsonl(paths["chat"], complete_only=True)
    tmp = os.path.join(out_dir, "pretrain.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in sorted(kept, key=lambda r: r["id"]):
            f.write(json.dumps({"text": conversation_text(r["messages"])}, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(out_dir, "pretrain.jsonl"))
    counts.update(total_kept=len(kept), seconds=round(time.time() - t0, 1), tokens=tokens, config=config)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=1, ensure_ascii=False)
    print(f"synth: {counts['written']} written this run ({len(kept)} in {paths['chat']}), "
          f"rejected {counts['rejected']}, failed {counts['failed']}, {counts['already_done']} done before; "
          f"{tokens:,} tokens in {counts['seconds']}s")
