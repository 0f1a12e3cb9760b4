"""Fixtures of the evaluation tests: a small word-salad corpus (jsonl) and the tiny GPT-2 loaded once per module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab.models import load_model

WORDS = "the quick brown fox jumps over a lazy dog python sparse features residual stream layers".split()


def write_word_corpus(path: Path, n_docs: int = 40, words_per_doc: int = 60) -> str:
    """n_docs seeded random documents, one jsonl line each (so the hash split has documents on both sides)."""
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (words_per_doc,), generator=g).tolist())
            for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_word_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), device="cpu")
