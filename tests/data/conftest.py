"""Offline tokenizers with a readable vocabulary, and an isolated cache for the python-docs corpus.

The word 'tN' (N in 10..59) has token id N, so the expected ids of a text can be read off the text itself.
Special tokens: <pad>=0, <bos>=1, <eos>=2, <unk>=3, <|endoftext|>=4; the GPT-2 style tokenizer uses
<|endoftext|> as both BOS and EOS, like GPT-2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from interplab.data.python_docs import python_docs_documents

PAD, BOS, EOS, UNK, ENDOFTEXT = 0, 1, 2, 3, 4


def make_tokenizer(*, bos: str | None, eos: str | None, model_max_length: int | None = None):
    specials = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK, "<|endoftext|>": ENDOFTEXT}
    vocab = {**specials, **{f"t{i}": i for i in range(10, 60)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>", **kwargs
    )


@pytest.fixture(scope="session")
def tokenizer_factory():
    """`make_tokenizer`, for tests that need a tokenizer of their own (test modules cannot import conftest)."""
    return make_tokenizer


@pytest.fixture(scope="session")
def tok_bos_eos():
    """Separate BOS and EOS tokens (Llama / SmolLM2 style)."""
    return make_tokenizer(bos="<bos>", eos="<eos>")


@pytest.fixture(scope="session")
def tok_eos_only():
    """EOS but no BOS."""
    return make_tokenizer(bos=None, eos="<eos>")


@pytest.fixture(scope="session")
def tok_gpt2_style():
    """One token, <|endoftext|>, is both BOS and EOS."""
    return make_tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")


@pytest.fixture(scope="session")
def tok_plain():
    """Neither BOS nor EOS."""
    return make_tokenizer(bos=None, eos=None)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Build the python-docs cache in a temporary folder, never in the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def python_docs(isolated_cache: None) -> list[str]:
    """The python-docs corpus, built once per test session."""
    return python_docs_documents()
