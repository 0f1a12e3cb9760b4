"""Packing: documents -> one token stream -> fixed-length contexts, with no padding.

The stream is the documents' tokens joined by a separator (EOS, else BOS, else nothing):

    doc0 <sep> doc1 <sep> doc2 ...

and each context is the next `ctx_len` stream tokens, or `[BOS]` + the next `ctx_len - 1` when BOS is prepended,
so that position 0 always sees the same token, as it did in pre-training for models that use a BOS. Documents are
cut across context boundaries; the final partial context is dropped rather than padded, so every position of
every context holds a real token.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from jaxtyping import Int

from interplab.errors import InterplabError


class Tokenizer(Protocol):
    """What packing needs of a tokenizer: a Hugging Face (fast) tokenizer, or interplab's byte tokenizer. Its
    optional `bos_token_id` and `eos_token_id` set BOS and the separator."""

    def __call__(self, texts: list[str], *, add_special_tokens: bool, return_attention_mask: bool,
                 verbose: bool) -> Mapping[str, Sequence[Sequence[int]]]:
        """Token ids of each text, under "input_ids"."""
        ...


def pack_tokens(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    ctx_len: int,
    *,
    prepend_bos: bool | None = None,
    docs_per_batch: int = 256,
) -> Iterator[Int[torch.Tensor, " ctx_len"]]:
    """Yield int64 tensors of shape [ctx_len]: the packed token stream, no padding.

    Args:
        docs: documents, consumed lazily, `docs_per_batch` at a time.
        tokenizer: a Hugging Face (fast) tokenizer; its `bos_token_id` and `eos_token_id` set BOS and separator.
        ctx_len: tokens per context, at least 2.
        prepend_bos: start every context with BOS; None means: iff the tokenizer has a BOS token.
        docs_per_batch: documents tokenized per call to the tokenizer (batching is what makes fast tokenizers fast).

    Bad arguments raise `InterplabError` here, at the call, not at the first `next()`.
    """
    if not _is_int(ctx_len) or ctx_len < 2:
        raise InterplabError(f"ctx_len {ctx_len!r} is not valid; a context needs at least 2 tokens (ctx_len >= 2)")
    if not _is_int(docs_per_batch) or docs_per_batch < 1:
        raise InterplabError(f"docs_per_batch {docs_per_batch!r} is not valid; it must be a positive integer")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise InterplabError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False or None")

    separator = eos if eos is not None else bos
    stream = _token_stream(docs, tokenizer, separator, int(docs_per_batch))
    return _contexts(stream, int(ctx_len), bos if prepend_bos else None)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_stream(
    docs: Iterable[str], tokenizer: Tokenizer, separator: int | None, docs_per_batch: int
) -> Iterator[list[int]]:
    """The stream in pieces: one list of token ids per batch of documents, separators included."""
    docs = iter(docs)
    first = True
    while batch := list(itertools.islice(docs, docs_per_batch)):
        # verbose=False silences "sequence length is longer than the specified maximum": documents are meant to
        # be longer than the model's context here, since packing cuts them.
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        piece: list[int] = []
        for ids in encoded["input_ids"]:
            if not first and separator is not None:
                piece.append(separator)
            piece.extend(ids)
            first = False
        yield piece


def _contexts(pieces: Iterator[list[int]], ctx_len: int, bos: int | None) -> Iterator[torch.Tensor]:
    """Cut the stream into contexts as soon as enough tokens have arrived; drop the partial tail."""
    prefix = [] if bos is None else [bos]
    body_len = ctx_len - len(prefix)
    buffer: list[int] = []
    for piece in pieces:
        buffer.extend(piece)
        n_full = len(buffer) // body_len
        for i in range(n_full):
            yield torch.tensor(prefix + buffer[i * body_len : (i + 1) * body_len], dtype=torch.int64)
        # Keep only the unfinished remainder, so the buffer stays smaller than one batch of documents.
        del buffer[: n_full * body_len]
