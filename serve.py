"""
Serve a checkpoint over an OpenAI-compatible HTTP API, talk to it in the terminal, or export it to Hugging Face
format for transformers and vLLM.

    python serve.py --init_from=out/sft/model                             # HTTP on 127.0.0.1:8000 (the default mode)
    python serve.py --init_from=out/sft/model --port=8001 --model_name=tanuki-tiny
    python serve.py --init_from=out/sft/model --chat                      # chat in the terminal
    python serve.py --init_from=out/sft/model --chat --system_prompt="あなたは親切なアシスタントです。"
    python serve.py --init_from=out/sft/model --chat --temperature=0      # greedy
    printf 'こんにちは\\n/quit\\n' | python serve.py --init_from=out/sft/model --chat  # scripted: a reply per line
    python serve.py --init_from=out/sft/model --export_hf=out/hf          # Llama format, then exit
    python serve.py --init_from=out/sft/model --export_hf=out/hf --dtype=bfloat16

HTTP (the server is api_server.py): POST /v1/chat/completions (our chat template applied to `messages`), POST
/v1/completions (raw text, continued), GET /v1/models; `stream: true` answers with server-sent events as OpenAI does.
A web page cannot drive it: a POST must be application/json, and Host a name of this machine. Any OpenAI client works:
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "こんにちは"}]}'
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(model="sft", messages=...)
Sampling: temperature, top_p, top_k, max_tokens, stop, n, seed. One thread owns the model and runs the requests
waiting at the start of each generation as one left-padded batch.

Chat: each line you type is a user message; the reply streams to stdout, everything else goes to stderr, so
`serve.py --chat < questions.txt > answers.txt` keeps only the answers. `/reset` forgets the conversation (the system
prompt stays), `/quit` or end of input (Ctrl-D) exits, Ctrl-C stops a reply that runs on.
"""

import codecs
import os
import sys

import torch

from api_server import Server, mask_undecodable
from checkpoint import load_checkpoint
from common import load_config, setup_distributed
from export import save_hf
from tokenizer import render_chat, special_id

# -----------------------------------------------------------------------------
init_from = "out/sft"   # a checkpoint directory written by checkpoint.save_checkpoint (any stage)
export_hf = ""          # a directory: write the checkpoint there in Hugging Face Llama format and exit
chat = False            # chat in the terminal instead of serving HTTP
device = "auto"         # cuda if available, else cpu
dtype = "auto"          # chat and HTTP: bfloat16 on CUDA, float32 on CPU; export: "auto" keeps the checkpoint's dtype
seed = 1337
# HTTP server
host = "127.0.0.1"      # this machine only: the server has no authentication. 0.0.0.0 opens it to the network
port = 8000             # vLLM's default, so a client configured for a local vLLM finds us; 0: any free port
model_name = ""         # the model id /v1/models reports; "" -> the checkpoint directory's name
max_tokens_cap = 2048   # the most tokens one choice may generate, whatever a request asks for
max_n = 8               # the most choices one request may ask for
max_batch_size = 32     # the most sequences (requests x n) generated together
max_request_bytes = 1_000_000  # a larger body is refused before it is read
allowed_hosts = ""      # Host names to answer besides localhost and IP addresses, comma-separated; "*": any
client_timeout = 30.0   # seconds for a client to send its whole request, and for each write to a client
max_connections = 512   # more open connections get a 503 (each holds a file descriptor: keep it under ulimit -n)
max_handlers = 64       # threads reading requests and writing answers; more connections wait their turn
compile_decode = False  # decode with the compiled step (model.decode_step): faster per token after a compilation
                        # on the first request and on the first new batch size (tens of seconds on a CPU)
# terminal chat; common chat sampling settings, not the recipe's (docs/recipe.md gives none); 0 is greedy
system_prompt = ""      # the first message of every conversation when not empty
max_new_tokens = 512
temperature = 0.7
top_k = 0               # 0: off
top_p = 0.9             # 1.0: off
# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # right after the defaults, while every name defined is a setting; a test that imports serve keeps its argv
    load_config(globals())

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# chat

def fit_context(enc, messages, budget):
    """Render the conversation for generation, dropping the oldest user/assistant exchange (never the system
    prompt) until it fits in `budget` tokens. Returns (ids, messages kept); ids is None when even the last
    message alone does not fit."""
    first = int(messages[0]["role"] == "system")
    while True:
        ids, _ = render_chat(enc, messages, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, messages
        if len(messages) - first <= 1:
            return None, messages
        messages = messages[:first] + messages[first + 2:]


def stream_reply(model, enc, prompt, max_new_tokens, out=sys.stdout, **sampling):
    """Generate the assistant's reply to `prompt` (token ids), printing it to `out` as it comes. Returns its text."""
    stops = (special_id(enc, "<|end|>"), special_id(enc, "<|eos|>"))
    # a token can end inside a character (a kanji is 3 bytes of UTF-8): the incremental decoder keeps the
    # incomplete tail and hands back only whole characters
    utf8, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        for (token,) in model.stream([prompt], max_new_tokens, stop_tokens=stops, **sampling):
            if token in stops:
                break
            piece = utf8.decode(enc.decode_single_token_bytes(token))
            out.write(piece)
            out.flush()
            text += piece
    except KeyboardInterrupt:  # Ctrl-C ends a reply that runs on, not the program; what was said stays
        pass
    tail = utf8.decode(b"", final=True)  # a character cut off by max_new_tokens shows as U+FFFD
    out.write(tail + "\n")
    out.flush()
    return text + tail


if __name__ == "__main__":
    if export_hf:
        # renaming and writing needs no accelerator: load on the CPU, where the host memory is
        model, enc, meta = load_checkpoint(init_from, device="cpu")
        save_hf(model, enc, export_hf, dtype=None if dtype == "auto" else DTYPES[dtype])
        print(f"exported {init_from} ({meta['stage']}, {model.num_params():,} parameters) to {export_hf}",
              file=sys.stderr)
        sys.exit(0)

    _, _, _, device = setup_distributed(device)  # one process; resolves device="auto" as every stage does
    if dtype == "auto":  # CPUs without bf16 matrix units run bf16 slower than float32
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch.manual_seed(seed)  # once: replies differ from each other, the whole session is reproducible
    model, enc, meta = load_checkpoint(init_from, device=device, dtype=DTYPES[dtype])
    model.eval()
    about = f"{init_from}: {meta['stage']} checkpoint, {model.num_params():,} parameters, {device}, {dtype}."
    if not chat:
        name = model_name or os.path.basename(os.path.normpath(init_from))
        server = Server(model, enc, host, port, name, max_tokens_cap, max_n, max_batch_size, max_request_bytes,
                        allowed_hosts.split(","), client_timeout, max_connections, max_handlers, compile_decode)
        # the bound port (port=0 picks a free one), flushed: scripts and tests read it from here
        print(f"{about} Serving '{name}' at http://{host}:{server.server_address[1]}/v1 (Ctrl-C stops).",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        server.server_close()
        sys.exit(0)

    # model.stream refuses prompt + max_new_tokens > max_seq_len: the rendered conversation gets the rest
    budget = model.cfg.max_seq_len - max_new_tokens
    if budget < 8:
        sys.exit(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}")
    mask_undecodable(model, enc)
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, compile=compile_decode)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(system)
    print(f"{about} /reset clears the conversation, /quit exits.", file=sys.stderr)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() then edits the line and keeps a history: arrow keys, Ctrl-R)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave without a traceback
            print(file=sys.stderr)
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        prompt, kept = fit_context(enc, messages + [{"role": "user", "content": line}], budget)
        if prompt is None:  # the history stays as it was
            print(f"(message too long: it does not fit in {budget} tokens with the system prompt)", file=sys.stderr)
            continue
        if len(kept) < len(messages) + 1:
            print(f"(context full: forgot the {(len(messages) + 1 - len(kept)) // 2} oldest exchange(s))",
                  file=sys.stderr)
        messages = kept
        reply = stream_reply(model, enc, prompt, max_new_tokens, **sampling)
        messages.append({"role": "assistant", "content": reply})
