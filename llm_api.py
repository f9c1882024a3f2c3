"""
The OpenAI-compatible client and the LLM judge, which several stages share: chat_completion for
synth.py's teacher, eval.py's and dpo.py's judge and any served model, and MT-Bench-style judging with a cache.
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import re
import time
import unicodedata
import urllib.error
import urllib.request

# -----------------------------------------------------------------------------
# the OpenAI-compatible client of the stages that talk to a teacher, a judge or a served model

def chat_completion(messages, sampling, url, key, model_name, request_timeout, retries, backoff_s):
    """One POST {url}/chat/completions to any OpenAI-compatible server (vLLM, serve.py): the teacher of synth.py,
    the judge of eval.py and dpo.py. Retries: 5xx, 429, timeouts, dropped connections and unparsable replies
    are retried after backoff_s * 2^attempt (plus jitter, so many workers do not retry in lockstep); other 4xx
    are the request's fault and fail at once. Returns (content, finish_reason, completion_tokens)."""
    body = json.dumps({"model": model_name, "messages": messages, **sampling}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
        try:
            request = urllib.request.Request(f"{url.rstrip('/')}/chat/completions", data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=request_timeout) as response:
                data = json.loads(response.read())
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return choice["message"]["content"] or "", choice.get("finish_reason"), usage.get("completion_tokens", 0)
        except urllib.error.HTTPError as e:  # before URLError: it is one
            if e.code < 500 and e.code != 429:
                raise RuntimeError(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
            error = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:  # timeouts, refused or dropped connections, cut bodies
            error = f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            error = f"invalid response: {type(e).__name__}: {e}"
    raise RuntimeError(f"{url}: gave up after {retries + 1} attempts: {error}")


# -----------------------------------------------------------------------------
# an LLM judge: MT-Bench-style single-answer grading 1-10 (docs/recipe.md "Evaluation";
# docs/recipe.md "Reference thresholds": the judge answers "評価：[[N]]" and deducts for answering in the wrong
# language), for eval.py's MT-Bench and dpo.py's pairs.
# The prompts are our own words.

JUDGE_SYSTEM = {
    "ja": "あなたは公平で厳格な審査員です。AIアシスタントの回答を、有用性・正確さ・深さ・創造性・詳しさの観点から評価して"
          "ください。質問と異なる言語で書かれた回答（日本語の質問に日本語以外で答えたもの）は大きく減点してください。"
          "参照解答が示されている場合は、それと照らして正しいかを確かめてください。まず短く講評を書き、最後に必ず"
          "「評価：[[N]]」（Nは1から10の整数）の形で点数を書いてください。",
    "en": "You are an impartial and strict judge. Rate the AI assistant's answer for helpfulness, accuracy, depth, "
          "creativity and level of detail. An answer written in a different language from the question loses many "
          "points. If a reference answer is given, check the answer against it. Write a short assessment first, then "
          "end with the score exactly in the form \"Rating: [[N]]\", where N is an integer from 1 to 10.",
}
JUDGE_LABELS = {  # question, reference, answer, which turn is judged
    "ja": ("質問", "参照解答", "アシスタントの回答", "評価するのは最後のアシスタントの回答です。"),
    "en": ("Question", "Reference answer", "Assistant's answer", "Rate the assistant's last answer only."),
}


def judge_prompt(lang, turns, answers, references):
    """The judge's messages for the last answer of a conversation (turn 2 is judged with turn 1 in view, as
    MT-Bench does)."""
    q_label, ref_label, a_label, which = JUDGE_LABELS[lang]
    parts = []
    for i, (q, a) in enumerate(zip(turns, answers)):
        parts.append(f"[{q_label} {i + 1}]\n{q}")
        if i < len(references) and references[i]:
            parts.append(f"[{ref_label} {i + 1}]\n{references[i]}")
        parts.append(f"[{a_label} {i + 1}]\n{a}")
    parts.append(which)
    return [{"role": "system", "content": JUDGE_SYSTEM[lang]}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_rating(text):
    """The judge's 1-10 rating: the last [[N]] of the reply (a judge may quote the format before using it), after
    NFKC so that full-width ［［８］］ counts; None when there is none or it is out of range (never guessed)."""
    found = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", unicodedata.normalize("NFKC", text))
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1 <= rating <= 10 else None


def judge_ratings(prompts, judge, cache_path, retries=2, max_tokens=512, concurrency=8, request_timeout=120.0,
                  http_retries=4, backoff_s=1.0):
    """Rate every judge prompt (a list of message lists, judge_prompt's) with judge = {"url", "key", "model"}.
    Returns ({key: record}, number of requests sent), where key = judge_key(judge model, messages) and the record
    holds the rating (None when unparsable), the judgment and the attempts. Judgments are cached in cache_path
    (JSONL, one line per judgment as it arrives), so a re-run, or a run killed midway and started again, sends only
    what is new. A reply without a rating is asked again (the first request is greedy, as MT-Bench's judge; retries
    sample at 0.7, since a greedy judge repeats itself word for word); after `retries` it is recorded unparsable and
    counted by the caller, never given a score."""
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    cache[record["key"]] = record
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: judged again
                    pass
    todo = {judge_key(judge["model"], m): m for m in prompts}
    todo = [(k, m) for k, m in todo.items() if k not in cache]

    def ask(job):
        for attempt in range(retries + 1):
            reply = chat_completion(job[1], {"max_tokens": max_tokens, "temperature": 0.0 if attempt == 0 else 0.7},
                                    judge["url"], judge["key"], judge["model"], request_timeout, http_retries,
                                    backoff_s)[0]
            if parse_rating(reply) is not None:
                break
        return {"key": job[0], "rating": parse_rating(reply), "judgment": reply, "attempts": attempt + 1}

    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool, \
            open(cache_path, "a", encoding="utf-8") as f:
        for record in pool.map(ask, todo):
            cache[record["key"]] = record
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return cache, len(todo)


def judge_key(model_name, messages):
    return hashlib.sha256(json.dumps([model_name, messages], ensure_ascii=False).encode()).hexdigest()
