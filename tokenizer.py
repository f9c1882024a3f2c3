"""
The nanotanuki tokenizer: byte-level BPE trained with rustbpe, run with tiktoken, exportable to Hugging Face.

Tanuki-8B used a 65,000-piece SentencePiece unigram model over MeCab-pre-split Japanese
(docs/recipe.md "Tokenizer"). We keep the two ideas that matter on the project's stack:
- SPLIT_PATTERN cuts Japanese wherever the script changes (kanji | hiragana | katakana), a cheap stand-in for
  MeCab's word segmentation, so no BPE token can span two scripts. The team reported that without MeCab
  Japanese compression went above 2 characters per token, which learned worse; with it they measured
  1.56 characters per token on Japanese and 3.72 on English Wikipedia (docs/recipe.md "Tokenizer").
- 65,536 ids in total, special tokens included, so token ids fit in uint16 data shards (docs/recipe.md "Tokenizer").

Contract (other modules rely on exactly these names):
    enc = train_tokenizer(texts, vocab_size)            # a tiktoken.Encoding with enc.n_vocab == vocab_size
    save_tokenizer(enc, dir) / load_tokenizer(dir)      # tokenizer.tiktoken + tokenizer_meta.json
    tokenizer_hash(enc)                                 # sha256 hex of ranks + pattern + specials
    special_id(enc, "<|bos|>")                          # the id of a special token (also eos, pad, end, roles)
    encode_batch(enc, texts, bos=True, eos=True)        # documents -> ids; "<|bos|>" inside a text stays text
    render_chat(enc, messages) -> (ids, loss_mask)      # the chat template; loss on the assistant's tokens
    save_hf_tokenizer(enc, dir)                         # tokenizer.json etc. for transformers.AutoTokenizer
Special tokens come after the mergeable ranks: id = n_ranks + SPECIAL_TOKENS.index(name).
"""

import base64
import hashlib
import json
import os
import time

import tiktoken

# The plain GPT-4 (cl100k) pattern, exactly as tiktoken ships it; kept for comparison (tests, ablations).
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

# GPT-4's pattern with the letter alternative split by script for Japanese. The same string runs in three regex
# engines: fancy-regex (rustbpe training, tiktoken) and Oniguruma (HF tokenizers). Both read \p{Han} etc. as the
# Unicode Script property (not Script_Extensions) and agree on every code point for each class used here; the
# tests check that the HF export encodes to the same ids. Every character must be matched by some alternative:
# tiktoken silently drops what the pattern skips. Japanese runs take an optional space, as English words do
# ("Python を"), but never punctuation: MeCab splits 「 and 。 off as morphemes of their own.
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",          # English contractions ('s 'll 're ...), as GPT-4
    r" ?[\p{Han}〆ヵヶ]++",             # kanji run (々 and 〇 are Han already); 〆 and the small ヵ ヶ of 三ヶ月 and
                                        # 霞ヶ関 are read as kanji, so they join the kanji around them
    r" ?\p{Hiragana}++",               # hiragana run: particles and inflections (は, を, しました) split off stems
    r" ?[\p{Katakana}ーｰﾞﾟ&&[^ヵヶ]]++",  # katakana run with the prolonged sound mark ー (script Common, but it only
                                        # lengthens katakana: コンピューター) and its half-width forms
    # any other letters (Latin, Hangul, ...) as GPT-4: an optional one-character prefix (" word"), except that
    # CJK and full-width punctuation (U+3000-30FF, U+FF00-FFEF) never glues onto a word; the run itself stops at
    # any Japanese script, so "Pythonで" is "Python" + "で"
    r"[^\r\n\p{L}\p{N}\x{3000}-\x{30FF}\x{FF00}-\x{FFEF}]?+[^\P{L}\p{Han}〆\p{Hiragana}\p{Katakana}ーｰﾞﾟ]++",
    r"\p{N}{1,3}",                     # numbers in groups of at most 3 digits, as GPT-4 (Tanuki split every digit);
                                        # not GPT-4's possessive {1,3}+, which Oniguruma reads as ({1,3})+: any run
    r" ?[^\s\p{L}\p{N}]++[\r\n]*+",    # punctuation and symbols (。」 and emoji too), with an optional leading space
    r"\s++$",                          # trailing whitespace at the end of the text
    r"\s*[\r\n]",                      # whitespace up to and including a newline
    r"\s+(?!\S)",                      # whitespace except the last space, which prefixes the next word
    r"\s",                             # any whitespace left
])

# Document framing first, then the chat template's roles and end-of-message. <|pad|> is never trained on.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ROLES = ("system", "user", "assistant")


def special_id(enc, name):
    """The id of a special token, e.g. special_id(enc, "<|bos|>"). The one way callers get bos/eos/pad/end ids."""
    # not enc.encode_single_token(name): it would also answer for an ordinary token such as "the"
    if name not in enc._special_tokens:
        raise ValueError(f"{name!r} is not a special token of {enc.name}; they are {list(enc._special_tokens)}")
    return enc._special_tokens[name]


def train_tokenizer(texts, vocab_size, pattern=SPLIT_PATTERN, name="nanotanuki"):
    """Train byte-level BPE on an iterable of str to exactly vocab_size ids, special tokens included."""
    import rustbpe  # only training needs it; loading a tokenizer needs tiktoken alone
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small for 256 byte tokens + {len(SPECIAL_TOKENS)} specials")
    stats = {"docs": 0, "chars": 0}
    def counted(texts):
        for text in texts:
            stats["docs"] += 1
            stats["chars"] += len(text)
            yield text
    # rustbpe reports per-percent progress to the Python logger "rustbpe" at INFO (logging.basicConfig(level=20))
    print(f"training BPE to {n_ranks:,} ranks + {len(SPECIAL_TOKENS)} special tokens ...")
    t0 = time.time()
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(counted(texts), n_ranks, pattern=pattern)
    mergeable_ranks = {bytes(token): rank for token, rank in tok.get_mergeable_ranks()}
    print(f"trained on {stats['docs']:,} docs, {stats['chars']:,} chars in {time.time() - t0:.1f}s")
    if len(mergeable_ranks) != n_ranks:  # rustbpe stops early when no pair is left to merge
        raise ValueError(f"learned only {len(mergeable_ranks) - 256} of {n_ranks - 256} merges: "
                         f"the training text is too small for vocab_size={vocab_size}")
    special_tokens = {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)


def _ranks_text(enc):
    # tiktoken's own file format: one "base64(token bytes) rank" line per token, in rank order
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks)


def tokenizer_hash(enc):
    """sha256 hex over ranks + pattern + special tokens: equal hashes mean equal encodings, in any process."""
    # the name is left out on purpose: renaming a tokenizer does not change a single id
    specials = json.dumps(enc._special_tokens, sort_keys=True)
    return hashlib.sha256("\n".join([_ranks_text(enc), enc._pat_str, specials]).encode()).hexdigest()


def save_tokenizer(enc, directory):
    """Write tokenizer.tiktoken (ranks) and tokenizer_meta.json (name, pattern, specials, vocab_size, hash)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.tiktoken"), "w", encoding="utf-8") as f:
        f.write(_ranks_text(enc))
    meta = {"name": enc.name, "pattern": enc._pat_str, "special_tokens": enc._special_tokens,
            "vocab_size": enc.n_vocab, "hash": tokenizer_hash(enc)}
    with open(os.path.join(directory, "tokenizer_meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)


def load_tokenizer(directory):
    """Read back what save_tokenizer wrote; checks the stored hash."""
    paths = [os.path.join(directory, f) for f in ("tokenizer.tiktoken", "tokenizer_meta.json")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no tokenizer in {directory!r}: missing {missing} (train one with train_tokenizer "
                                f"and save_tokenizer)")
    # parsed here rather than with tiktoken.load.load_tiktoken_bpe, which caches files in /tmp keyed by their path
    mergeable_ranks = {}
    with open(paths[0], encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                token, rank = line.split()
                mergeable_ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is one too
                raise ValueError(f"{paths[0]}:{number}: not a line of base64 token and rank: {line[:80]!r}") from None
    with open(paths[1], encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except ValueError as e:
            raise ValueError(f"{paths[1]}: {e}") from None
    enc = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"], mergeable_ranks=mergeable_ranks,
                            special_tokens=meta["special_tokens"])
    if tokenizer_hash(enc) != meta["hash"]:
        raise ValueError(f"tokenizer in {directory!r} does not match the hash in its tokenizer_meta.json")
    return enc


def encode_batch(enc, texts, bos=True, eos=True, num_threads=8):
    """Encode documents in parallel, each optionally framed as <|bos|> ... <|eos|>."""
    # encode_ordinary never produces special ids: a document that contains "<|end|>" cannot inject a control token
    head = [special_id(enc, "<|bos|>")] if bos else []
    tail = [special_id(enc, "<|eos|>")] if eos else []
    return [head + ids + tail for ids in enc.encode_ordinary_batch(list(texts), num_threads=num_threads)]


def render_chat(enc, messages, add_generation_prompt=False):
    """
    The chat template: <|bos|> then <|role|> content <|end|> per message. Returns (ids, loss_mask) where the mask is 1
    exactly on the assistant's content and its <|end|> (the model must learn to stop), 0 elsewhere. With
    add_generation_prompt, ends with <|assistant|> for the model to continue from. Content is text, never control
    tokens: a message that spells "<|end|>" gets the ids of those seven characters (CHAT_TEMPLATE does the same).
    """
    ids, mask = [], []
    def add(tokens, m):
        ids.extend(tokens)
        mask.extend([m] * len(tokens))
    add([special_id(enc, "<|bos|>")], 0)
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
        train = int(role == "assistant")
        add([special_id(enc, f"<|{role}|>")], 0)
        add(enc.encode_ordinary(content.replace(UNSPECIAL, "<|")), train)
        add([special_id(enc, "<|end|>")], train)
    if add_generation_prompt:
        add([special_id(enc, "<|assistant|>")], 0)
    return ids, mask


# The same layout as render_chat, for transformers' apply_chat_template (and so vLLM, TRL). A template renders a
# string that is then tokenized, and the tokenizer turns every "<|end|>" it finds into the control token: a user
# could end their turn and write a system turn. So the template writes each "<|" of the content as "<", U+FDD0, "|",
# which no special token matches, and the exported tokenizer's normalizer (save_hf_tokenizer), which runs after
# the special tokens are found, turns it back into "<|": the content is tokenized as the plain text it is, the ids
# render_chat gives. U+FDD0 is a Unicode noncharacter, never in interchange text; render_chat maps the same
# three characters to "<|" so the two agree on any input. {% generation %} marks what render_chat's loss mask
# marks (the assistant's content and its <|end|>), for return_assistant_tokens_mask (TRL's assistant_only_loss).
UNSPECIAL = "<\ufdd0|"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% set content = message['content'] | replace('<|', '" + UNSPECIAL + "') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ content + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _bytes_to_unicode():
    # GPT-2's byte -> character map that HF's ByteLevel uses: printable Latin-1 bytes stand for themselves, the
    # other 68 (controls, space, ...) move to U+0100 and up, so every vocab entry is a printable, space-free string
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _merge_pair(ranks, token):
    # Replay BPE on the token's bytes with only the merges older than the token: the two parts left are the merge
    # that created it. O(len^2) per token: about a second for a 65k vocab (trying all pairs of tokens is O(V^2)).
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, f"token {token!r} is not a merge of two older tokens"
    return parts


def save_hf_tokenizer(enc, directory, model_max_length=4096):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers.AutoTokenizer."""
    # model_max_length: Tanuki's 4k context (docs/recipe.md "Models")
    os.makedirs(directory, exist_ok=True)
    byte_char = _bytes_to_unicode()
    def hf(token):  # token bytes -> HF vocab string
        return "".join(byte_char[b] for b in token)
    ranks = enc._mergeable_ranks
    by_rank = sorted(ranks, key=ranks.get)
    merges = [[hf(a), hf(b)] for a, b in (_merge_pair(ranks, t) for t in by_rank if len(t) > 1)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for tok, i in enc._special_tokens.items()],
        # CHAT_TEMPLATE's escaped "<|" back to plain text, after the special tokens have been matched
        "normalizer": {"type": "Replace", "pattern": {"String": UNSPECIAL}, "content": "<|"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        # tokenizer("text") prepends <|bos|> like our documents; add_special_tokens=False gives the bare ids
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [special_id(enc, "<|bos|>")],
                                                          "tokens": ["<|bos|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does (for a BPE-trained vocab the
        # merges would reach the same token; this makes the equivalence hold by construction)
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {hf(t): ranks[t] for t in by_rank}, "merges": merges},
    }
    special_map = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                   "additional_special_tokens": SPECIAL_TOKENS[3:]}  # the roles and <|end|>
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, **special_map}
    for filename, obj in [("tokenizer.json", tokenizer), ("tokenizer_config.json", config),
                          ("special_tokens_map.json", special_map)]:
        with open(os.path.join(directory, filename), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2 if filename != "tokenizer.json" else None)


if __name__ == "__main__":
    # python tokenizer.py --input=DIR_OR_FILE[,...] --vocab_size=N --out_dir=DIR
    # Trains on the documents of the files found (.txt .md .py .rst as text, .jsonl / .json by their "text" field,
    # read as prepare_data.py reads them: corpus.py), holding every 100th file out to report characters per token;
    # prepare_data.py calls train_tokenizer itself on a sample of the cleaned corpus.
    import sys
    from common import load_config
    from corpus import list_files, new_counts, read_files
    input, vocab_size, out_dir, max_chars = "", 4096, "out/tokenizer", 50_000_000  # noqa: A001
    load_config(globals(), sys.argv[1:])
    files = input and [p for p in list_files(input, "--input") if p.endswith((".txt", ".md", ".py", ".rst", ".jsonl",
                                                                              ".json"))]
    if not files:
        sys.exit("no text files found: pass --input=DIR_OR_FILE[,...]")
    counts = new_counts()
    def read(paths):
        total = 0
        for text in read_files(paths, counts):
            total += len(text)
            if total > max_chars:
                return
            yield text
    held_out, train = files[::100], [f for i, f in enumerate(files) if i % 100]
    enc = train_tokenizer(read(train or files), vocab_size)
    save_tokenizer(enc, out_dir)
    sample = "".join(read(held_out))
    print(f"skipped as bad input: {counts['bad_records']} records, {counts['bad_files']} files" if
          counts["bad_records"] or counts["bad_files"] else "no bad input")
    print(f"saved to {out_dir}: {enc.n_vocab:,} ids; held-out {len(held_out)} files: "
          f"{len(sample) / max(1, len(enc.encode_ordinary(sample))):.2f} characters per token")
