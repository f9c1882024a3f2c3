"""
The OpenAI-compatible HTTP server that serve.py runs around a model (see serve.py for how to start it and what a
client sends). dpo.py and eval.py talk to it through llm_api.py, and their tests run it in a thread.

POST /v1/chat/completions (our chat template applied to `messages`), POST /v1/completions (raw text, continued),
GET /v1/models; `stream: true` answers with server-sent events as OpenAI does. Every field a request sends is
validated (`Job`) and a bad one is a 400 that names the rule it broke. One worker thread owns the model and runs the
requests waiting at the start of each generation as one left-padded batch; the connections wait in one selector, so
an idle client costs a file descriptor, not a thread (`Server`). A web page cannot drive it: a POST must be
application/json, and Host a name of this machine (`Handler.check_host`).
"""

import codecs
import contextlib
import ipaddress
import json
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

from tokenizer import ROLES, render_chat, special_id


def mask_undecodable(model, enc):
    """Never sample an id the tokenizer has no bytes for: train.py may round vocab_size up (to a multiple of 64, for
    fast matmuls), and decoding a padding id is a KeyError. model.stream samples from lm_head's output, so a hook
    there sets those logits to -inf. Returns the hook's handle (.remove() undoes it), None when nothing is masked."""
    if model.cfg.vocab_size <= enc.n_vocab:
        return None

    def hook(module, inputs, logits):
        logits[..., enc.n_vocab:] = float("-inf")
    return model.lm_head.register_forward_hook(hook)


# -----------------------------------------------------------------------------
# requests: validated, and answered choice by choice

ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET"}


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the message the client reads."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def option(body, key, default, types, ok, rule):
    """body[key], or `default` when it is absent or null (some clients send every field); a RequestError that
    states the rule when the value breaks it."""
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python: "max_tokens": true must not pass as 1
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool) or not ok(value):
        raise RequestError(f"'{key}' must be {rule}, got {json.dumps(value)[:100]}")
    return value


class Choice:
    """One of a request's n answers, built token by token by the worker thread."""

    def __init__(self, job, index):
        self.job, self.index = job, index
        # a token can end inside a character (a kanji is 3 bytes): the decoder keeps the bytes until it is whole
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.tokens, self.finish_reason = "", 0, 0, None

    def add(self, token, enc, stop_ids):
        self.tokens += 1
        if token in stop_ids:
            return self.finish("stop")
        old = len(self.text)
        self.text += self.utf8.decode(enc.decode_single_token_bytes(token))
        # a stop string completed by this token starts at most `hold` characters before the new text
        found = [i for i in (self.text.find(s, max(0, old - self.job.hold)) for s in self.job.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self.finish("stop", flush=False)
        if self.tokens == self.job.max_tokens:
            return self.finish("length")
        # hold back what may yet turn out to be the start of a stop string: a client never sees a stop string,
        # and the streamed pieces add up to exactly the non-streamed text
        self.emit(len(self.text) - self.job.hold)

    def emit(self, end):
        if self.job.stream and end > self.sent:
            self.job.events.put(("delta", self.index, self.text[self.sent:end]))
            self.sent = end

    def finish(self, reason, flush=True):
        if flush:  # a character cut off by the end shows as U+FFFD, as in the terminal chat
            self.text += self.utf8.decode(b"", final=True)
        self.finish_reason = reason
        self.emit(len(self.text))
        if self.job.stream:
            self.job.events.put(("finish", self.index, reason))


class Job:
    """One validated request: its prompt ids, its sampling settings, and its choices as they are generated.
    The worker thread reports to the handler thread through `events`."""

    def __init__(self, server, path, body):
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        enc, max_seq_len = server.enc, server.model.cfg.max_seq_len
        self.chat = path == "/v1/chat/completions"
        if self.chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise RequestError(f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a "
                                       f"string}}, got {json.dumps(m)[:100]}")
            self.prompt, _ = render_chat(enc, messages, add_generation_prompt=True)
        else:
            text = option(body, "prompt", None, str, lambda v: True, "a string")
            if text is None:
                raise RequestError("'prompt' is required: the text to continue")
            # a document starts with <|bos|> in pretraining; encode_ordinary keeps "<|end|>" in the text as text
            self.prompt = [special_id(enc, "<|bos|>")] + enc.encode_ordinary(text)
        room = max_seq_len - len(self.prompt)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = option(body, key, None, int, lambda v: v >= 1, "an integer >= 1")
        if asked is None:  # as long as the context allows (OpenAI's meaning), within the cap
            self.max_tokens = min(server.max_tokens_cap, room)
        else:  # over the cap: cut to it, as a policy of this server; finish_reason "length" tells the client
            self.max_tokens = min(asked, server.max_tokens_cap)
        # only a request that cannot fit in the context is refused: model.stream could not run it
        if self.max_tokens < 1 or self.max_tokens > room:
            raise RequestError(f"the prompt ({len(self.prompt)} tokens) + {key} ({asked or 1}) exceed the model's "
                               f"context of {max_seq_len} tokens")
        # OpenAI's defaults (temperature 1, top_p 1), not the terminal chat's. The ranges keep the sampler's float32
        # finite: logits / 1e-45 are inf, a top_p of 1e-300 is 0 in float32 and drops every token, and their NaN
        # probabilities fail the batch (on CUDA a device assert fails every later request too). torch's generator
        # takes a seed below 2**64, OpenAI's is an int64
        temperature = option(body, "temperature", 1.0, (int, float), lambda v: v == 0 or 0.01 <= v <= 100,
                             "0 (greedy) or a number from 0.01 to 100")
        top_p = option(body, "top_p", 1.0, (int, float), lambda v: 1e-6 <= v <= 1, "a number in (0, 1], at least 1e-6")
        top_k = option(body, "top_k", 0, int, lambda v: True, "an integer (0 or -1: off, as vLLM)")
        seed = option(body, "seed", None, int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")
        self.n = option(body, "n", 1, int, lambda v: 1 <= v <= server.max_n, f"an integer from 1 to {server.max_n}")
        stop = option(body, "stop", [], (str, list), lambda v: all(isinstance(s, str) and s for s in
                      ([v] if isinstance(v, str) else v)), "a non-empty string or a list of them")
        self.stop = [stop] if isinstance(stop, str) else stop
        self.hold = max(map(len, self.stop), default=1) - 1
        self.stream = option(body, "stream", False, bool, lambda v: True, "true or false")
        stream_options = option(body, "stream_options", {}, dict, lambda v: True, "an object")
        self.include_usage = stream_options.get("include_usage") is True
        if temperature == 0:  # greedy: nothing else matters, and every greedy request can share a batch
            self.sampling, self.batch_key = {"temperature": 0}, (0,)
        else:
            self.sampling = {"temperature": temperature, "top_k": top_k if top_k > 0 else None, "top_p": top_p,
                             "seed": seed}
            # a seeded request runs alone: its rows' draws from the batch's one generator would depend on who else
            # is in the batch. Unseeded ones that sample alike share one
            self.batch_key = (temperature, top_k, top_p) if seed is None else self
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created, self.model_name = int(time.time()), server.model_name
        self.choices = [Choice(self, i) for i in range(self.n)]
        self.events, self.cancelled, self.batch_size = queue.SimpleQueue(), False, 0

    def head(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def chunk(self, index, text="", finish_reason=None, first=False):
        """One streamed piece of one choice, in OpenAI's format."""
        if not self.chat:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {**self.head("text_completion"), "choices": [choice]}
        delta = {"role": "assistant", "content": ""} if first else {"content": text} if text else {}
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage(self):
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    def result(self):
        """The whole non-streamed answer."""
        if self.chat:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in self.choices]
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}


# -----------------------------------------------------------------------------
# connections, the batching worker, and HTTP

class Server(HTTPServer):
    """The HTTP server. Its accept loop (serve_forever) also holds the connections that have not sent a request yet,
    all in one selector: an idle client costs a file descriptor, not a thread. A connection with bytes to read goes
    to one of max_handlers threads, which parses, validates and answers it; one worker thread owns the model.
    The worker takes the oldest waiting request and every other waiting one that samples alike, and generates them
    as one left-padded batch (model.stream). Requests that arrive meanwhile wait for the next batch: simpler than
    vLLM's continuous batching, which adds sequences to a batch already running, and still one forward pass for
    all the clients waiting, where a lock would run them one after another."""
    # connections the kernel has completed and holds until accept(): with socketserver's 5, a burst of 100 clients
    # overflowed it and most were reset. Linux caps it at net.core.somaxconn (4096 since Linux 5.4)
    request_queue_size = 1024

    def __init__(self, model, enc, host="127.0.0.1", port=0, model_name="nanotanuki", max_tokens_cap=2048,
                 max_n=8, max_batch_size=32, max_request_bytes=1_000_000, allowed_hosts=(), client_timeout=30.0,
                 max_connections=512, max_handlers=64, compile_decode=False):
        super().__init__((host, port), Handler)
        self.socket.setblocking(False)  # accept() of a client that left meanwhile fails instead of waiting
        self.model, self.enc, self.model_name = model, enc, model_name
        self.max_tokens_cap, self.max_n, self.max_batch_size = max_tokens_cap, max_n, max_batch_size
        self.max_request_bytes, self.created = max_request_bytes, int(time.time())
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.client_timeout, self.max_connections, self.max_handlers = client_timeout, max_connections, max_handlers
        # a chat turn ends with <|end|>, a document with <|eos|>: stop at either, as the exported generation config
        self.stop_ids = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
        self.pad_id, self.compile_decode = special_id(enc, "<|pad|>"), compile_decode
        self.vocab_hook = mask_undecodable(model, enc)
        self.pending, self.ready, self.closing = [], threading.Condition(), False
        # each open connection -> the time.monotonic() by which its request must have arrived (None: not timed)
        self.connections, self.lock, self.readable = {}, threading.Lock(), queue.SimpleQueue()
        self.stopping, self.stopped = False, threading.Event()
        for target in [self.work] + [self.handle_connections] * max_handlers:
            threading.Thread(target=target, daemon=True).start()  # daemon: a stuck client does not hold the exit

    def serve_forever(self, poll_interval=0.5):
        """Accept connections and hold those that have not spoken yet, until shutdown(). socketserver's loop gave each
        a thread at once, which waited for it forever: 2,000 idle clients were 2,000 threads."""
        self.stopped.clear()
        try:
            with selectors.DefaultSelector() as waiting:
                waiting.register(self.socket, selectors.EVENT_READ)
                while not self.stopping:
                    for key, _ in waiting.select(poll_interval):
                        if key.fileobj is self.socket:
                            self.admit(waiting)
                        else:  # it sent something, or hung up: a handler thread reads it (untimed until one is free)
                            waiting.unregister(key.fileobj)
                            self.set_deadline(key.fileobj, None)
                            self.readable.put((key.fileobj, key.data))
                    self.expire(waiting)
                for sock in [key.fileobj for key in waiting.get_map().values() if key.fileobj is not self.socket]:
                    self.release(sock)
        finally:
            self.stopping = False
            self.stopped.set()

    def shutdown(self):
        """Stop serve_forever, from another thread, and wait for it to return."""
        self.stopping = True
        self.stopped.wait()

    def admit(self, waiting):
        try:
            sock, address = self.socket.accept()
        except OSError:  # the client left already, or no file descriptor is left
            return
        if len(self.connections) >= self.max_connections:  # a 503 at once rather than one more held
            sys.stderr.write(f"{address[0]} 503 over max_connections={self.max_connections}\n")
            body = json.dumps({"error": {"message": f"over max_connections={self.max_connections}: retry later",
                                         "type": "server_error", "code": 503}})
            with contextlib.suppress(OSError):
                sock.sendall(f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            return self.shutdown_request(sock)
        sock.settimeout(self.client_timeout)  # every read and write: a client that stops reading is cut too
        self.set_deadline(sock, self.client_timeout)
        waiting.register(sock, selectors.EVENT_READ, address)

    def expire(self, waiting):
        """Cut the connections whose request has not come in client_timeout: idle ones, and slowloris (a byte now and
        then, to hold a thread forever)."""
        now = time.monotonic()
        with self.lock:
            late = [sock for sock, deadline in self.connections.items() if deadline is not None and deadline < now]
            for sock in late:
                self.connections[sock] = None
        idle = {key.fileobj for key in waiting.get_map().values()}  # not `in get_map()`: a closed socket raises
        for sock in late:
            if sock in idle:
                waiting.unregister(sock)
                self.release(sock)
            else:  # a handler thread waits in a read of it: shutting the socket down ends the read
                with contextlib.suppress(OSError):  # closed by its handler meanwhile
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_connections(self):
        """A handler thread: answers the connections that have something to read, one after another."""
        while item := self.readable.get():
            sock, address = item
            self.set_deadline(sock, self.client_timeout)
            try:
                self.finish_request(sock, address)  # Handler
            except OSError:  # the client left or was cut before its request was read
                pass
            except Exception:  # noqa: BLE001  a bug of ours: logged, the thread goes on
                self.handle_error(sock, address)
            finally:
                self.release(sock)

    def set_deadline(self, sock, seconds):
        """When sock's request must have come: in `seconds`; None: not timed (it waits for us, or has come)."""
        with self.lock:
            self.connections[sock] = None if seconds is None else time.monotonic() + seconds

    def release(self, sock):
        with self.lock:
            self.connections.pop(sock, None)
        self.shutdown_request(sock)

    def submit(self, job):
        with self.ready:
            self.pending.append(job)
            self.ready.notify()

    def take_batch(self):
        """Remove from `pending` and return the oldest job and the waiting jobs that can share its batch: the same
        sampling, the longest prompt + the most steps within the context (model.stream), at most max_batch_size
        rows. The oldest always goes first, so no request waits behind younger ones forever. Called locked."""
        first = self.pending.pop(0)
        batch, rows, longest, steps = [first], first.n, len(first.prompt), first.max_tokens
        for job in list(self.pending):
            if (job.batch_key == first.batch_key and rows + job.n <= self.max_batch_size
                    and max(longest, len(job.prompt)) + max(steps, job.max_tokens) <= self.model.cfg.max_seq_len):
                batch.append(job)
                self.pending.remove(job)
                rows, longest, steps = rows + job.n, max(longest, len(job.prompt)), max(steps, job.max_tokens)
        return batch

    def work(self):
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.pending or self.closing)
                if self.closing:
                    return
                batch = self.take_batch()
            rows = [choice for job in batch for choice in job.choices]  # a job's n choices are n rows
            live = list(batch)
            for job in batch:
                job.batch_size = len(batch)
            try:
                steps = max(job.max_tokens for job in batch)
                for step in self.model.stream([c.job.prompt for c in rows], steps, stop_tokens=self.stop_ids,
                                              pad_id=self.pad_id, compile=self.compile_decode,
                                              **batch[0].sampling):
                    for choice, token in zip(rows, step):  # a cancelled job's rows run on, unread
                        if token is not None and choice.finish_reason is None and not choice.job.cancelled:
                            choice.add(token, self.enc, self.stop_ids)
                    # a job answers as soon as its own choices are done, not when the longest in its batch is
                    for job in [job for job in live if all(c.finish_reason for c in job.choices)]:
                        job.events.put(("done",))
                        live.remove(job)
                    if all(job.cancelled for job in live):  # nobody waits for the rest: stop the batch early
                        break
            except Exception as e:  # noqa: BLE001  the clients of this batch get a 500; the server goes on
                traceback.print_exc()
                for job in live:
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))

    def server_close(self):
        super().server_close()
        if self.vocab_hook:
            self.vocab_hook.remove()
        for _ in range(self.max_handlers):
            self.readable.put(None)
        with self.ready:
            self.closing = True
            self.ready.notify()


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 (BaseHTTPRequestHandler's default): one request per connection, so a streamed answer simply ends
    # when the connection closes, with no chunked transfer encoding to write
    server_version = "nanotanuki"

    def log_request(self, code="-", size="-"):
        """Silenced: route() logs each request once it is answered, with its tokens and time."""

    def route(self):
        t0, self.status, job, method = time.time(), None, None, self.command
        try:
            self.check_host()
            path = self.path.partition("?")[0]
            if path not in ROUTES:
                raise RequestError(f"no route {path}; this server has {', '.join(ROUTES)}", 404)
            if method != ROUTES[path]:
                raise RequestError(f"{path} takes {ROUTES[path]}, not {method}", 405)
            if path == "/v1/models":
                cfg = self.server.model.cfg
                return self.send_json(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "nanotanuki", "max_model_len": cfg.max_seq_len}]})
            job = Job(self.server, path, self.read_json())
            self.server.submit(job)
            if job.stream:
                self.send_stream(job)
            else:
                kind, *error = job.events.get()  # a non-streamed job gets "done" or "error" only
                if kind == "error":
                    return self.send_error_json(500, error[0], "server_error")
                self.send_json(200, job.result())
        except RequestError as e:
            self.send_error_json(e.status, str(e))
        except RecursionError:  # json.loads of "[" * 200_000, or json.dumps of a deep value in an error message
            self.send_error_json(400, "the body is nested too deeply")
        except (ConnectionError, TimeoutError):  # the client left, or stopped reading: its rows stop being decoded
            if job:
                job.cancelled = True
            self.status = 499  # nginx's code for "client closed the request", for the log only
        except Exception as e:  # noqa: BLE001  a bug of ours: the client gets a 500, the server goes on
            traceback.print_exc()
            if self.status is None:
                self.send_error_json(500, f"{type(e).__name__}: {e}", "server_error")
        finally:
            tokens = ""
            if job and self.status in (200, 499):
                usage = job.usage()
                tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}"
                tokens += f" batch={job.batch_size}"  # requests generated together with this one, itself included
            tokens += " (client left or timed out)" if self.status == 499 else ""
            ms = (time.time() - t0) * 1000
            sys.stderr.write(f"{self.command} {self.path} {self.status}{tokens} {ms:.0f}ms\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = route  # what BaseHTTPRequestHandler calls for each method

    def check_host(self):
        """Refuse DNS rebinding: a web page of attacker.example can point its name at 127.0.0.1, and the browser then
        lets it read our answers as its own. It sends Host: attacker.example, a name no client of ours uses: ours
        name localhost, an IP address (rebinding needs a name) or one of --allowed_hosts ("*": any name). A request
        without Host is no browser's."""
        host = self.headers.get("Host")
        if host is None or "*" in self.server.allowed_hosts:
            return
        name = (host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]).lower()
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name not in {"localhost", *self.server.allowed_hosts}:
                raise RequestError(f"Host {host!r} is not a name of this server; start it with "
                                   f"--allowed_hosts={name} to answer it", 403) from None

    def read_json(self):
        # any web page can have a browser POST here without asking first (a CORS "simple request") with a form's
        # or text's Content-Type, or none; with application/json the browser asks first, and is not answered
        if self.headers.get_content_type() != "application/json":
            raise RequestError(f"Content-Type must be application/json, not {self.headers['Content-Type']!r}", 415)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a POST needs a Content-Length", 411)
        # digits only: int() reads "-1", and rfile.read(-1) reads until the client closes, whatever it sends
        if not (length.isascii() and length.isdigit()):
            raise RequestError(f"Content-Length must be a number of bytes, not {length!r}")
        # checked before reading: a client cannot make the server hold a body of any size in memory
        if int(length) > self.server.max_request_bytes:
            raise RequestError(f"the body is {length} bytes, more than the {self.server.max_request_bytes} "
                               f"this server accepts", 413)
        data = self.rfile.read(int(length))
        self.server.set_deadline(self.connection, None)  # the request is in: its answer takes the time it takes
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            raise RequestError(f"the body is not valid JSON: {e}") from None

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj, ensure_ascii=False).encode()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status, message, kind="invalid_request_error"):
        # 405 names the method that works, as HTTP asks
        allow = [("Allow", ROUTES[self.path.partition("?")[0]])] if status == 405 else []
        self.send_json(status, {"error": {"message": message, "type": kind, "code": status}}, allow)

    def send_stream(self, job):
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if job.chat:  # OpenAI's first chunk of each choice names the role
            for i in range(job.n):
                self.send_event(job.chunk(i, first=True))
        while True:
            kind, *args = job.events.get()
            if kind == "delta":
                self.send_event(job.chunk(args[0], text=args[1]))
            elif kind == "finish":
                self.send_event(job.chunk(args[0], finish_reason=args[1]))
            elif kind == "error":  # the status line is sent already: the error travels as an event, as OpenAI's
                self.status = 500
                self.send_event({"error": {"message": args[0], "type": "server_error", "code": 500}})
                break
            else:
                if job.include_usage:
                    # OpenAI's stream_options.include_usage: one more chunk, with no choices
                    chunk = job.chunk(0)
                    self.send_event({**chunk, "choices": [], "usage": job.usage()})
                break
        self.wfile.write(b"data: [DONE]\n\n")

    def send_event(self, obj):
        # a server-sent event; the socket is unbuffered (wfile), so each reaches the client as it is written
        self.wfile.write(f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode())
