"""Fixtures several test files share."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def enc():
    """A 512-id tokenizer trained on the Japanese, English and code samples in tests/data: small enough for tiny
    models, real enough to tokenize the chat template, synth.py's tasks and Hugging Face round trips."""
    texts = [open(os.path.join(ROOT, "tests", "data", name), encoding="utf-8").read()
             for name in ("ja_sample.txt", "en_sample.txt", "code_sample.txt")]
    return train_tokenizer(iter(texts), vocab_size=512)
