"""Claims about synth.py: the offline teacher's answers are right (recomputed here from the question text, by code
that shares nothing with the generator), balanced and deterministic; textfilters.verify_answer is as strict as llm-jp-eval's exact
match; the OpenAI-compatible client survives a server that fails, hangs or talks nonsense, with requests in
parallel; a killed run resumes without duplicates; the filters drop planted bad samples, each with its reason."""

import calendar
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import synth  # noqa: E402  (its script flow runs only under __main__)
from conftest import running, serve_py  # noqa: E402
import textfilters as tf  # noqa: E402

JA_DAYS = dict(zip(calendar.day_name, ["月曜日", "火曜日", "水曜日", "木曜日", "金曜日", "土曜日", "日曜日"]))
UNIT_FACTORS = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
                ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("liters", "milliliters"): 1000,
                ("days", "hours"): 24, ("キロメートル", "メートル"): 1000, ("メートル", "センチメートル"): 100,
                ("キログラム", "グラム"): 1000, ("時間", "分"): 60, ("分", "秒"): 60, ("リットル", "ミリリットル"): 1000,
                ("日", "時間"): 24}


def is_prime(n):
    return n > 1 and all(n % k for k in range(2, int(n ** 0.5) + 1))


def recompute(kind, lang, q):
    """The answer to an offline question, worked out from its text alone."""
    ints = lambda m: [int(x) for x in m.groups()]  # noqa: E731
    if kind == "arithmetic":
        if m := re.search(r"(\d+)個持っています。(\d+)個買い足し、友だちに(\d+)個|has (\d+) \w+\. \w+ buys (\d+) more "
                          r"and then gives (\d+)", q):
            a, b, c = [int(x) for x in m.groups() if x]
            return str(a + b - c)
        if m := re.search(r"1箱に\w+が(\d+)個入っています。(\d+)箱|A box holds (\d+) \w+\. How many \w+ are there in "
                          r"(\d+) boxes", q):
            a, b = [int(x) for x in m.groups() if x]
            return str(a * b)
        total, people = ints(re.search(r"(\d+)(?:個を| \w+ are shared equally among )(\d+)", q))
        assert total % people == 0
        return str(total // people)
    if kind == "comparison":
        numbers = re.findall(r"\d+\.\d+", q)
        pick = max if ("larger" in q or "大きい" in q) else min
        return pick(numbers, key=Decimal)
    if kind == "date":
        if m := re.search(r"was (\w+ \d+, \d+)\?", q):
            return datetime.datetime.strptime(m.group(1), "%B %d, %Y").strftime("%A")
        if m := re.search(r"(\d+)年(\d+)月(\d+)日は何曜日", q):
            return JA_DAYS[calendar.day_name[datetime.date(*ints(m)).weekday()]]
        if m := re.search(r"from (\S+) to (\S+)\?", q):
            a, b = (datetime.date.fromisoformat(x) for x in m.groups())
        else:
            y1, m1, d1, y2, m2, d2 = ints(re.search(r"(\d+)年(\d+)月(\d+)日から(\d+)年(\d+)月(\d+)日まで", q))
            a, b = datetime.date(y1, m1, d1), datetime.date(y2, m2, d2)
        return str((b - a).days)
    if kind == "unit":
        if m := re.search(r"How many (\w+) are in ([\d.]+) (\w+)\?", q):
            dst, value, src = m.groups()
        else:
            value, src, dst = re.search(r"^([\d.]+)(\D+?)は何(\D+?)ですか", q).groups()
        result = Decimal(value) * UNIT_FACTORS[(src, dst)]
        assert result == int(result)
        return str(int(result))
    assert kind == "choice"
    options = dict(re.findall(r"^(\d)\. (.+)$", q, re.M))
    assert sorted(options) == ["1", "2", "3", "4"]
    if m := re.search(r"(\d+) ?× ?(\d+)", q):
        right = [k for k, v in options.items() if int(v) == int(m.group(1)) * int(m.group(2))]
    elif "prime" in q or "素数" in q:
        right = [k for k, v in options.items() if is_prime(int(v))]
    else:
        m = re.search(r"after (\w+)\?|^(\S+)の次の曜日", q)
        day = m.group(1) or m.group(2)
        names = list(calendar.day_name) if lang == "en" else [JA_DAYS[d] for d in calendar.day_name]
        right = [k for k, v in options.items() if v == names[(names.index(day) + 1) % 7]]
    assert len(right) == 1, q
    return right[0]


def test_offline_answers_are_right_by_an_independent_computation():
    tasks = synth.offline_tasks(1000, seed=3)
    for task in tasks:
        q = task["turns"][0]
        assert recompute(task["kind"], task["lang"], q) == task["answer"], q
        assert tf.verify_answer(task["answer"], task["answer"])
        if task["lang"] == "ja":  # the question itself is Japanese, by the same >= 30% rule as the filter
            assert synth.reject_reason(task, [{"role": "user", "content": q}, {"role": "assistant", "content": q}],
                                       "stop") in (None, "wrong_answer")


def test_offline_tasks_are_balanced_and_deterministic():
    tasks = synth.offline_tasks(200, seed=1)
    counts = Counter((t["kind"], t["lang"]) for t in tasks)
    assert set(counts) == {(k, lang) for k in synth.OFFLINE_KINDS for lang in ("ja", "en")}
    assert set(counts.values()) == {20}  # exactly balanced over kinds x languages
    assert tasks == synth.offline_tasks(200, seed=1)
    assert [t["turns"] for t in tasks] != [t["turns"] for t in synth.offline_tasks(200, seed=2)]
    assert len({t["turns"][0] for t in tasks}) > 180  # varied, not a handful of prompts
    # the library call: the same rng state gives the same task
    assert synth.offline_task(random.Random(7), "choice", "ja") == synth.offline_task(random.Random(7), "choice", "ja")


def test_verify_is_strict_about_the_format():
    task = {"answer": "2"}
    assert tf.verify_answer(task["answer"], "2") and tf.verify_answer(task["answer"], " 2\n")
    for reply in ("2.", "2. マザーボード", "答えは2です", "12", "２", "", "The answer is 2."):
        assert not tf.verify_answer(task["answer"], reply), reply
    # lenient: the knowledge without the format (full-width digits normalized), but never inside another number
    for reply in ("2.", "2. マザーボード", "答えは2です", "２", "The answer is 2."):
        assert tf.verify_answer(task["answer"], reply, strict=False), reply
    for reply in ("12", "2.5", "3", ""):
        assert not tf.verify_answer(task["answer"], reply, strict=False), reply
    assert tf.verify_answer("金曜日", "金曜日") and not tf.verify_answer("金曜日", "金曜日です")


def test_filters_drop_planted_bad_answers_with_their_reasons():
    ja = {"lang": "ja", "kind": "multiturn"}
    en = {"lang": "en", "kind": "multiturn"}
    conv = lambda reply: [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]  # noqa: E731
    good_ja = "タヌキは日本の里山に暮らす動物で、夜になると森の中を歩き回って食べ物を探します。"
    good_en = "The tanuki is a wild dog of Japan that walks through the forest at night looking for food."
    assert synth.reject_reason(ja, conv(good_ja), "stop") is None
    assert synth.reject_reason(en, conv(good_en), "stop") is None
    planted = [
        (ja, conv(good_ja), "length", "truncated"),
        (ja, conv("  \n"), "stop", "empty"),
        (ja, conv(good_en), "stop", "wrong_language"),
        (en, conv(good_ja), "stop", "wrong_language"),
        (ja, conv("タヌキはかわいい。" * 40), "stop", "repetition"),
        (en, conv("the forest at night " * 40), "stop", "repetition"),
        (en, conv("I'm sorry, but I can't help with that request about the forest animals."), "stop", "refusal"),
        (ja, conv("申し訳ありませんが、その質問にはお答えできません。別の質問をしてください。"), "stop", "refusal"),
        ({"lang": "en", "kind": "arithmetic", "answer": "13"}, conv("14"), "stop", "wrong_answer"),
        ({"lang": "en", "kind": "choice", "answer": "2"}, conv("2. motherboard"), "stop", "wrong_answer"),
    ]
    for task, messages, finish, reason in planted:
        assert synth.reject_reason(task, messages, finish) == reason, (messages, reason)
    # a bad second turn of a multi-turn conversation is caught too
    second_turn = conv(good_en) + [{"role": "user", "content": "more"}, {"role": "assistant", "content": ""}]
    assert synth.reject_reason(en, second_turn, "stop") == "empty"
    dedup = synth.Dedup()
    long_text = " ".join(f"Sentence {i} says something different about tanuki habits and forests." for i in range(30))
    assert dedup.check_and_add(long_text, near=True) is None
    assert dedup.check_and_add("  " + long_text.upper(), near=True) == "exact_duplicate"
    assert dedup.check_and_add(long_text.replace("Sentence 7 ", "Sentence seven "), near=True) == "near_duplicate"
    assert dedup.check_and_add("A different text about bees and honey, long enough to have shingles.", near=True) is None
    assert synth.split_layout("#問題\nタヌキとは?\n#回答\n動物です。", "ja") == ("タヌキとは?", "動物です。")
    assert synth.split_layout("no layout here", "en") is None


def test_teacher_tasks_build_deterministic_prompts(tmp_path):
    passages = synth.load_passages()  # the standard library's docstrings: present on every machine
    assert len(passages) > 50 and all(len(p) >= 200 for p in passages)
    for i in range(24):
        task = synth.make_task(i, 0, synth.TEACHER_KINDS, passages)
        assert task == synth.make_task(i, 0, synth.TEACHER_KINDS, passages)
        assert task["turns"] and all(isinstance(t, str) and t for t in task["turns"])
        assert len(task["turns"]) == (2 if task["kind"] == "multiturn" else 1)
        if task["kind"] == "rewrite":  # Tanuki's rewriting settings
            assert task["sampling"]["temperature"] == 0.1 and task["sampling"]["repetition_penalty"] == 1.2
        if task["kind"] == "translate":  # English docstrings go into Japanese
            assert task["lang"] == "ja" and "日本語" in task["turns"][0]
        if task["layout"]:
            assert synth.LAYOUT[task["lang"]][0] in task["turns"][0]
    path = tmp_path / "p.jsonl"
    path.write_bytes("\n".join(json.dumps({"text": f"passage {i} " + "x" * 300}) for i in range(3)).encode()
                     + b"\n\xff not utf-8\n")
    assert len(synth.load_passages(str(path))) == 3  # the bad line 4 skipped (and reported on stderr)


# -----------------------------------------------------------------------------
# the OpenAI-compatible backend against a stdlib server on 127.0.0.1:0 that misbehaves on chosen prompts


class Teacher(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with the known answer of an offline task, or misbehaves as server.modes says for
    that prompt: 500 always, 500 once then well, hang (until the test ends: past any client timeout, however slow the
    machine), or a body that is not JSON."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802  (http.server's name)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with srv.lock:
            srv.requests[prompt] += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            n = srv.requests[prompt]
            held = srv.hold_after is not None and sum(srv.requests.values()) > srv.hold_after
        try:
            if held:  # answers nothing more until the test opens the gate
                srv.gate.wait()
            time.sleep(srv.delay)
            mode = srv.modes.get(prompt, "ok")
            if mode == "500" or (mode == "flaky" and n == 1):
                self.send_response(500)
                self.end_headers()
                return
            if mode == "hang":  # not counted in flight: the client's worker waits on it, then gives up
                with srv.lock:
                    srv.in_flight -= 1
                n = None
                srv.gate.wait()
            payload = b"{not json" if mode == "badjson" else json.dumps({
                "choices": [{"message": {"role": "assistant", "content": srv.answers.get(prompt, "?")},
                             "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the hang case)
            return
        finally:
            if n is not None:  # a hung request was uncounted when it began to hang
                with srv.lock:
                    srv.in_flight -= 1


@pytest.fixture
def teacher():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    server.daemon_threads = True
    server.lock, server.requests, server.in_flight, server.max_in_flight = threading.Lock(), Counter(), 0, 0
    server.modes, server.delay, server.hold_after, server.gate = {}, 0.0, None, threading.Event()
    server.answers = {t["turns"][0]: t["answer"] for t in synth.offline_tasks(300, seed=0)}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.gate.set()
    server.shutdown()
    server.server_close()


def synth_args(out, url, n, *extra):
    return [sys.executable, "synth.py", "--backend=openai", f"--base_url={url}", "--model=teacher",
            f"--tasks={synth.OFFLINE_KINDS}", f"--num_samples={n}", f"--out_dir={out}", "--timeout=0.5",
            "--max_retries=2", "--backoff=0.01", *extra]


def run_synth(args):
    result = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=900)  # only a hung run fails on the clock
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


def ids(path):
    return [r["id"] for r in synth.read_jsonl(str(path))]


def test_openai_backend_retries_then_records_failures_and_keeps_the_rest(tmp_path, teacher):
    prompts = [t["turns"][0] for t in synth.offline_tasks(24, seed=0)]
    teacher.modes = {prompts[3]: "500", prompts[5]: "hang", prompts[8]: "badjson", prompts[11]: "flaky"}
    teacher.delay = 0.05  # so that requests overlap
    # a 3 s timeout: only the hung request reaches it, even on a busy machine
    run_synth(synth_args(tmp_path, teacher.url, 24, "--concurrency=4", "--timeout=3"))
    failures = {r["id"]: r["error"] for r in synth.read_jsonl(str(tmp_path / "failures.jsonl"))}
    assert set(failures) == {3, 5, 8}
    assert "HTTP 500" in failures[3] and "imed out" in failures[5] and "invalid response" in failures[8]
    assert "3 attempts" in failures[3]
    assert teacher.requests[prompts[3]] == 3 and teacher.requests[prompts[8]] == 3  # 1 try + max_retries
    assert teacher.requests[prompts[11]] == 2  # failed once, retried, kept
    written = ids(tmp_path / "chat.jsonl") + ids(tmp_path / "rejected.jsonl")
    assert sorted(written) == sorted(set(range(24)) - {3, 5, 8})
    # 4 workers, all busy at once, never more (the hung requests are not counted)
    assert teacher.max_in_flight == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sum(summary["failed"].values()) == 3
    # the server recovers: a re-run retries only the failures, and nothing is written twice
    teacher.modes = {}
    before = sum(teacher.requests.values())
    run_synth(synth_args(tmp_path, teacher.url, 24, "--concurrency=4"))
    assert sum(teacher.requests.values()) - before == 3
    written = ids(tmp_path / "chat.jsonl") + ids(tmp_path / "rejected.jsonl")
    assert sorted(written) == list(range(24))
    for r in synth.read_jsonl(str(tmp_path / "chat.jsonl")):  # the perfect teacher passes the strict check
        assert r["messages"][-1]["content"] == r["answer"] and r["teacher"] == "teacher"


def test_killed_run_resumes_without_duplicates(tmp_path, teacher):
    teacher.hold_after = 30  # the teacher answers 30 requests, then holds the rest: the run is mid-way, whatever the clock
    chat, rejected = tmp_path / "chat.jsonl", tmp_path / "rejected.jsonl"
    written = lambda: sum(p.read_text().count("\n") for p in (chat, rejected) if p.exists())  # noqa: E731
    with running(synth_args(tmp_path, teacher.url, 200, "--concurrency=4", "--timeout=600"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        while written() < 30:
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    teacher.gate.set()
    done_before = len(ids(chat))
    assert done_before >= 20 and written() == 30
    with open(chat, "a") as f:
        f.write('{"id": 99999, "messa')  # a line cut by the kill: cut from the file, then the run goes on
    teacher.hold_after = None
    run_synth(synth_args(tmp_path, teacher.url, 200, "--concurrency=4"))
    written = ids(chat) + ids(tmp_path / "rejected.jsonl")
    assert sorted(written) == list(range(200))  # every sample once: none lost, none twice
    pretrain = [json.loads(line) for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    assert len(pretrain) == len(ids(chat))


def test_offline_run_writes_the_schema_and_a_rerun_adds_nothing(tmp_path):
    run_synth([sys.executable, "synth.py", "--num_samples=40", f"--out_dir={tmp_path}"])
    records = synth.read_jsonl(str(tmp_path / "chat.jsonl"))
    assert len(records) >= 36
    for r in records:
        assert set(r) == {"id", "messages", "task", "lang", "teacher", "seed", "answer"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"] == r["answer"] and r["teacher"] == "offline" and r["seed"] == 0
        assert r["task"] in synth.OFFLINE_KINDS and r["lang"] in ("ja", "en")
    texts = [json.loads(line)["text"] for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    assert len(texts) == len(records) and all(t.startswith("user: ") and "\nassistant: " in t for t in texts)
    rejected = synth.read_jsonl(str(tmp_path / "rejected.jsonl"))
    assert all(r["reason"] == "exact_duplicate" for r in rejected)
    run_synth([sys.executable, "synth.py", "--num_samples=40", f"--out_dir={tmp_path}"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["written"] == 0 and summary["already_done"] == 40
    assert len(synth.read_jsonl(str(tmp_path / "chat.jsonl"))) == len(records)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 1-layer model with a 512-id tokenizer trained here: what a teacher sounds like is not the point."""
    from checkpoint import save_checkpoint
    from model import ModelConfig, Transformer
    from tokenizer import train_tokenizer
    texts = [open(os.path.join(ROOT, "tests", "data", name), encoding="utf-8").read()
             for name in ("ja_sample.txt", "en_sample.txt")]
    enc = train_tokenizer(iter(texts), vocab_size=512)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=enc.n_vocab, d_model=32, n_layer=1, n_head=2, n_kv_head=2, ffn_hidden=64,
                      max_seq_len=512)
    directory = tmp_path_factory.mktemp("synth") / "ckpt"
    save_checkpoint(str(directory), Transformer(cfg), enc, stage="test")
    return directory


def test_against_serve_py_a_real_server(tmp_path, tiny_checkpoint):
    """synth.py -> serve.py on 127.0.0.1, no mocks: 4 concurrent workers finish, the schema holds, a killed run
    resumes without duplicates. Each process is waited on by what it writes, never by a clock, and stopped at the
    end, pass or fail."""
    out = tmp_path / "out"
    with serve_py(tiny_checkpoint, tmp_path / "serve.txt") as (_, url):
        args = synth_args(out, url, 60, "--concurrency=4", "--max_tokens=8", "--timeout=600",
                          "--tasks=['multiturn', 'arithmetic', 'date']")
        lines = lambda: sum(p.read_text().count("\n") for p in out.glob("*.jsonl") if p.exists())  # noqa: E731
        with running(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
            while proc.poll() is None and lines() < 10:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert 10 <= len(ids(out / "chat.jsonl") + ids(out / "rejected.jsonl")) < 60  # killed mid-run
        run_synth(args)
    records = synth.read_jsonl(str(out / "chat.jsonl")) + synth.read_jsonl(str(out / "rejected.jsonl"))
    assert not ids(out / "failures.jsonl")
    assert sorted(r["id"] for r in records) == list(range(60))  # each sample once across the kill
    for r in records:
        assert r["teacher"] == "teacher" and r["task"] in ("multiturn", "arithmetic", "date")
        assert [m["role"] for m in r["messages"]][:2] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) for m in r["messages"])
    # a random model cannot do arithmetic in the strict format: its answers are checked, not trusted
    assert all(r.get("reason") for r in records if r["task"] != "multiturn")


def test_local_backend_generates_with_our_checkpoint(tmp_path, tiny_checkpoint):
    run_synth([sys.executable, "synth.py", "--backend=local", f"--init_from={tiny_checkpoint}",
               "--tasks=['multiturn', 'arithmetic']", "--num_samples=6", "--max_tokens=8", "--batch_size=4",
               f"--out_dir={tmp_path / 'out'}", "--device=cpu"])
    out = tmp_path / "out"
    assert not ids(out / "failures.jsonl")
    records = synth.read_jsonl(str(out / "chat.jsonl")) + synth.read_jsonl(str(out / "rejected.jsonl"))
    assert sorted(r["id"] for r in records) == list(range(6))
    # a random model's replies are cut at max_tokens or garbage: the filters say why, per sample
    assert all(r.get("reason") for r in synth.read_jsonl(str(out / "rejected.jsonl")))
    multiturn = [r for r in records if r["task"] == "multiturn" and r.get("reason") != "truncated"]
    assert all(len(r["messages"]) == 4 for r in multiturn)
