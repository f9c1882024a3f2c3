"""Claims about serve.py's HTTP server (api_server.py), tested against a real server on 127.0.0.1 with a tiny random
checkpoint: it speaks OpenAI's chat/completions, completions and models schemas; greedy answers are model.generate's;
a stream adds up to the same text as the whole answer; seeds reproduce; stop strings cut; bad requests get a 4xx with
a JSON error and leave the server up; concurrent clients, batched together, get what they would get alone."""

import copy
import dataclasses
import http.client
import json
import os
import resource
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import api_server  # noqa: E402
from conftest import serve_py, wait_for_text  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import render_chat, special_id, train_tokenizer  # noqa: E402

MAX_SEQ_LEN, CAP = 128, 40
JSON = {"Content-Type": "application/json"}  # what OpenAI clients send; the server refuses a POST without it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = [open(os.path.join(ROOT, "tests", "data", name), encoding="utf-8").read()
             for name in ("ja_sample.txt", "en_sample.txt", "code_sample.txt")]
    enc = train_tokenizer(iter(texts), vocab_size=512)
    torch.manual_seed(0)
    # init_std 0.2: sharp logits, so greedy decoding has no near-ties that batching's rounding could flip
    cfg = ModelConfig(vocab_size=enc.n_vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=160,
                      max_seq_len=MAX_SEQ_LEN, init_std=0.2)
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(directory, Transformer(cfg), enc, stage="test")
    return directory


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, enc, _ = load_checkpoint(checkpoint)
    return model.eval(), enc


def start(model, enc, **limits):
    server = api_server.Server(model, enc, port=0, model_name="tiny", **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(loaded):
    server = start(*loaded, max_tokens_cap=CAP, max_n=4, max_request_bytes=4000)
    yield server
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, raw=None, headers=None):
    """(status, parsed JSON body) from a fresh connection; `raw` sends bytes as they are. `headers` replace the
    Content-Type: application/json that OpenAI clients send (http.client adds Host itself unless given one)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=JSON if headers is None else headers)
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    return status, json.loads(text)


def chat(server, content="タヌキについて教えて", **params):
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user", "content": content}], **params})
    assert status == 200, body
    return body


def stream(server, path, body):
    """The parsed chunks of a streamed answer; checks that it is well-formed SSE ending in [DONE]."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers=JSON)
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def greedy_reference(loaded, prompt, max_tokens):
    model, enc = loaded
    stops = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
    return enc.decode(model.generate([prompt], max_tokens, stop_tokens=stops, temperature=0)[0], errors="replace")


def test_chat_completion_schema_and_greedy_equals_model_generate(server, loaded):
    body = chat(server, max_tokens=20, temperature=0)
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    prompt, _ = render_chat(loaded[1], [{"role": "user", "content": "タヌキについて教えて"}], add_generation_prompt=True)
    assert choice["message"]["content"] == greedy_reference(loaded, prompt, 20)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt) and 0 < usage["completion_tokens"] <= 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completions_continue_the_text(server, loaded):
    status, body = request(server, "POST", "/v1/completions", {"prompt": "The tanuki", "max_tokens": 15,
                                                                "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    enc = loaded[1]
    prompt = [special_id(enc, "<|bos|>")] + enc.encode_ordinary("The tanuki")
    assert body["choices"][0]["text"] == greedy_reference(loaded, prompt, 15)
    chunks = stream(server, "/v1/completions", {"prompt": "The tanuki", "max_tokens": 15, "temperature": 0})
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]


def test_models_lists_the_checkpoint(server):
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.0, seed=3, n=2, stop=["e", "の"])])
def test_stream_adds_up_to_the_whole_answer(server, params):
    body = chat(server, max_tokens=30, **params)
    chunks = stream(server, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "タヌキについて教えて"}], "max_tokens": 30, **params,
                     "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    for choice in body["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_n_choices_and_seeds(server):
    first = chat(server, max_tokens=20, temperature=1.0, n=3, seed=7)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2] and len(set(texts)) > 1  # independent samples
    again = chat(server, max_tokens=20, temperature=1.0, n=3, seed=7)
    assert [c["message"]["content"] for c in again["choices"]] == texts
    other = chat(server, max_tokens=20, temperature=1.0, n=3, seed=8)
    assert [c["message"]["content"] for c in other["choices"]] != texts


def test_stop_strings_cut_at_the_first_occurrence(server):
    full = chat(server, max_tokens=CAP, temperature=0)["choices"][0]["message"]["content"]
    stop = next(full[i:i + 2] for i in range(6, len(full) - 2) if full[i:i + 2].strip())  # cuts a few characters in
    cut = chat(server, max_tokens=CAP, temperature=0, stop=["never appears", stop])["choices"][0]
    assert cut["message"]["content"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    cut = chat(server, max_tokens=CAP, temperature=0, stop=stop)["choices"][0]
    assert cut["message"]["content"] == full[:full.index(stop)]


def test_max_tokens_is_capped_and_must_fit_the_context(server):
    body = chat(server, max_tokens=CAP + 30, temperature=0, stop=[])
    assert body["usage"]["completion_tokens"] <= CAP
    status, body = request(server, "POST", "/v1/completions", {"prompt": "The tanuki " * 60, "max_tokens": 5})
    assert status == 400 and "context of 128 tokens" in body["error"]["message"]


BAD = [  # (method, path, body, expected status)
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400),
    ("POST", "/v1/chat/completions", [1, 2], 400),
    ("POST", "/v1/chat/completions", {}, 400),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, 400),
    *[("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **param}, 400) for param in
      [{"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": 2.5}, {"max_tokens": True}, {"max_tokens": "8"},
       {"temperature": -0.1}, {"n": 0}, {"n": 5}, {"top_p": 0}, {"top_p": 1.5}, {"stop": [""]}, {"stop": 3},
       {"seed": "x"}, {"stream": "yes"},
       # values that made inf/NaN probabilities or overflowed torch's generator: a 500, and on CUDA a device assert
       # that breaks every later request. Refused before they reach the sampler
       {"temperature": 1e-45}, {"temperature": 0.001}, {"temperature": 1e300}, {"top_p": 1e-300},
       {"seed": 2**64}, {"seed": -1}]],
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
     400),  # Python's json reads NaN and Infinity, which JSON has not
    ("POST", "/v1/chat/completions", b"[" * 3900, 400),  # deeper than the recursion limit: RecursionError, was a 500
    ("POST", "/v1/completions", {"max_tokens": 5}, 400),
    ("POST", "/v1/chat/completions", b"{" + b" " * 5000 + b"}", 413),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/models", {}, 405),
    ("GET", "/v1/nothing", None, 404),
    ("DELETE", "/", None, 404),
    ("PATCH", "/v1/completions", {}, 405),
]


@pytest.mark.parametrize("method,path,body,status", BAD)
def test_bad_requests_get_a_json_error_and_the_server_stays_up(server, method, path, body, status):
    raw = body if isinstance(body, bytes) else None
    got, reply = request(server, method, path, body=None if raw else body, raw=raw)
    assert got == status and reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    assert chat(server, max_tokens=2)["choices"]


def test_concurrent_clients_get_what_they_would_get_alone(server):
    # greedy requests share batches; seeded ones run alone, else their draws would depend on the batch
    asks = [(q, {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i})
            for i, q in enumerate(["こんにちは", "What is a tanuki?", "数を数えて: 1, 2, 3", "def f(x):", "タヌキ", "猫"])]
    def ask(q_params):
        q, params = q_params
        return chat(server, q, max_tokens=25, **params)["choices"][0]["message"]["content"]
    alone = [ask(a) for a in asks]
    for _ in range(3):  # several rounds, so that requests meet in batches
        with ThreadPoolExecutor(len(asks)) as pool:
            assert list(pool.map(ask, asks)) == alone


def test_a_failure_during_generation_is_a_500_and_the_server_stays_up(loaded):
    model, enc = loaded
    broken = copy.deepcopy(model)
    broken.lm_head.weight = torch.nn.Parameter(torch.zeros(3, 5))  # a shape mismatch on the first forward
    server = start(broken, enc)
    try:
        for _ in range(2):
            status, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
            assert status == 500 and body["error"]["type"] == "server_error"
        assert request(server, "GET", "/v1/models")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_command_line_serves_on_a_free_port(tmp_path, checkpoint):
    log = tmp_path / "stderr.txt"
    with serve_py(checkpoint, log) as (proc, url):
        address, port = url.split("http://")[1].split("/v1")[0].split(":")  # the bound port
        assert address == "127.0.0.1"
        remote = SimpleNamespace(server_address=(address, int(port)))  # what request() reads of a server
        status, body = request(remote, "GET", "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "tiny"  # the directory's name
        assert 0 < chat(remote, max_tokens=3)["usage"]["completion_tokens"] <= 3
        # one line per request, written just after the answer
        assert "GET /v1/models 200 " in wait_for_text(log, "POST /v1/chat/completions 200 prompt=", proc)


# -----------------------------------------------------------------------------
# hostile clients: each test below failed on the server before it was hardened against what it sends


def raw_exchange(address, data, timeout=30):
    """(status, body) of the answer to the bytes `data` on a fresh socket that stays open for writing: a server that
    waits for more than `data` never answers, and the socket's timeout fails the test."""
    with socket.create_connection(address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_burst_of_100_clients_is_answered_without_a_connection_error(server):
    # socketserver listens with a backlog of 5: in a burst, the kernel's queue of connections waiting for accept()
    # overflowed, and 60-86 of the 100 were reset
    barrier = threading.Barrier(100)

    def one(i):
        barrier.wait()  # all connect at once
        try:
            return request(server, "POST", "/v1/completions", {"prompt": f"{i}", "max_tokens": 2, "temperature": 0})[0]
        except OSError as e:
            return repr(e)
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    failed = [r for r in results if r != 200]
    assert not failed, f"{len(failed)} of 100 failed: {failed[:3]}"


@pytest.mark.parametrize("length,status", [("-1", 400), ("12abc", 400), ("+5", 400), (None, 411)])
def test_a_length_that_is_not_a_byte_count_is_refused_unread(server, length, status):
    # int() read "-1" as a length under the limit, and rfile.read(-1) reads to the end of the stream: the server
    # held whatever the client sent (300 MB in a test) and never answered one that keeps its socket open
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n" if length else ""
    got, body = raw_exchange(server.server_address, f"{head}\r\n".encode() + b'{"prompt": "hi", "max_tokens": 2}')
    assert got == status and json.loads(body)["error"]["message"]


def test_idle_connections_hold_no_thread_and_do_not_delay_a_request(loaded):
    # a thread per connection, waiting without a timeout: 2,000 idle connections left ~1,900 threads and the server
    # unresponsive for minutes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:  # this process holds both ends of each connection
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"needs 1200 file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    server = start(*loaded)
    idle = []
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(server.server_address[:2], timeout=30) for _ in range(500)]
        idle[0].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a head, then nothing
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.connect()
        t0 = time.monotonic()  # from the request being sent, not the connection made
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}), JSON)
        status, seconds = conn.getresponse().status, time.monotonic() - t0
        conn.close()
        # the request connected after the 500: answered, they were all accepted. A tiny model answers in ms
        assert status == 200 and seconds < 1.0
        assert threading.active_count() - threads <= 2, "a thread per idle connection"
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()


def test_clients_too_slow_to_send_a_request_are_cut(loaded, capsys):
    # no timeout at all: a client that sent nothing, or a byte now and then (slowloris), was held forever
    server = start(*loaded, client_timeout=0.5)
    try:
        silent = socket.create_connection(server.server_address[:2], timeout=30)
        slow = socket.create_connection(server.server_address[:2], timeout=30)  # its body never comes whole
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10\r\n\r\n{")
        for sock in (silent, slow):
            while sock.recv(65536):  # b"" once the server closed it; the socket's 30 s timeout fails the test
                pass
            sock.close()
        assert request(server, "GET", "/v1/models")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capsys.readouterr().err


def test_connections_over_max_connections_get_a_503(loaded):
    server = start(*loaded, max_connections=2)
    held = [socket.create_connection(server.server_address[:2], timeout=30) for _ in range(2)]
    try:
        # the 3rd is refused at once; it sends nothing, so no unread request turns the server's close into a reset
        status, body = raw_exchange(server.server_address, b"")
        assert status == 503 and "max_connections=2" in json.loads(body)["error"]["message"]
        for sock in held:
            sock.close()
        # once they are gone (the server sees them hang up), requests are answered again
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(server, "GET", "/v1/models")[0] == 200:
                    break
            except (OSError, ValueError, http.client.HTTPException):  # a reset, or a reply cut short
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_leaves_mid_stream_stops_its_generation_and_is_logged_once(loaded, capsys):
    enc = loaded[1]
    token, steps, closed = enc.encode_ordinary("a")[0], [], threading.Event()

    def endless(prompts, max_new_tokens, **sampling):  # model.stream of a model that never says <|end|>
        try:
            for _ in range(max_new_tokens):
                steps.append(1)
                time.sleep(0.001)  # pace only: a stream not stopped would run for 100 s, not forever
                yield [token] * len(prompts)
        finally:
            closed.set()
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=10**6, vocab_size=enc.n_vocab), stream=endless)
    server = start(model, enc, max_tokens_cap=100_000)
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 100_000, "stream": True}).encode()
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while received.count(b"data: ") < 3:  # a few chunks, then leave with more on the way
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
        assert closed.wait(60) and len(steps) < 100_000  # the worker stopped generating for nobody
        err = ""
        deadline = time.monotonic() + 60
        while "client left" not in err and time.monotonic() < deadline:  # the log line follows the handler's end
            err += capsys.readouterr().err
            time.sleep(0.05)
        assert request(server, "GET", "/v1/models")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    err += capsys.readouterr().err
    assert "Traceback" not in err and "Broken pipe" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("POST /v1/completions")]
    assert " 499 " in line and "client left" in line  # not a 200: nobody got the answer


def test_ids_the_tokenizer_cannot_decode_are_never_sampled(loaded):
    # train.py may pad the vocabulary to a multiple of 64: the padding ids have no bytes, and one sampled failed the
    # whole batch with a KeyError (a 500)
    enc = loaded[1]
    n = enc.n_vocab
    torch.manual_seed(0)
    padded = Transformer(dataclasses.replace(loaded[0].cfg, vocab_size=n + 64, tie_embeddings=False)).eval()
    with torch.no_grad():  # every real id gets logit 0, the padding ids logits in the hundreds
        padded.lm_head.weight[:n] = 0
        padded.lm_head.weight[n:] *= 1000
    bos = special_id(enc, "<|bos|>")
    assert all(t >= n for t in padded.generate([[bos]], 4, temperature=1.0)[0])  # unmasked, they are all it says
    server = start(padded, enc)
    try:
        statuses = [request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4, **params})[0]
                    for params in [{"temperature": 1.0}] * 39 + [{"temperature": 0}]]
        assert statuses == [200] * 40
    finally:
        server.shutdown()
        server.server_close()


BROWSER = [  # (headers, expected status): what a web page can make a browser send, and what clients send
    ({"Content-Type": "text/plain"}, 415),  # a "simple" cross-origin request: no CORS preflight, so any page can
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),  # send it (curl -d's default too)
    ({}, 415),  # fetch() of a Blob: no Content-Type at all
    ({"Content-Type": "application/json; charset=utf-8"}, 200),
    ({"Content-Type": "Application/JSON"}, 200),
    ({**JSON, "Host": "attacker.example:8000"}, 403),  # DNS rebinding: a name the attacker points at 127.0.0.1
    ({**JSON, "Host": "localhost.attacker.example"}, 403),
    ({**JSON, "Host": "localhost:8000"}, 200),
    ({**JSON, "Host": "[::1]:8000"}, 200),
    ({**JSON, "Host": "10.1.2.3"}, 200),  # an address is not a name: rebinding needs one (a client of 0.0.0.0)
]


@pytest.mark.parametrize("headers,status", BROWSER)
def test_requests_a_web_page_could_send_are_refused(server, headers, status):
    got, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=headers)
    assert got == status, body
    if status != 200:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_allowed_hosts_names_more_hosts_or_any(loaded):
    for allowed, host, status in [(("tanuki.lan",), "tanuki.lan:8000", 200), (("tanuki.lan",), "other.lan", 403),
                                  (("*",), "anything.example", 200)]:
        server = start(*loaded, allowed_hosts=allowed)
        try:
            assert request(server, "GET", "/v1/models", headers={"Host": host})[0] == status
        finally:
            server.shutdown()
            server.server_close()
