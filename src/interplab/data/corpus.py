"""Corpus specs: from a string such as 'python-docs' or 'data/wiki.jsonl' to a shuffled stream of documents.

Two ideas make runs reproducible:
- the train/test split is a function of each document's text alone (a hash), so it does not depend on the order
  of the files, on the shuffle seed, or on which other documents are present;
- the order is a seeded shuffle, so the same seed gives the same documents in the same order on every run.
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from jaxtyping import Int

from interplab.data.files import is_saved_dataset, read_path, read_saved_dataset
from interplab.data.packing import Tokenizer, pack_tokens
from interplab.data.python_docs import python_docs_documents
from interplab.errors import InterplabError

_VALID_SPECS = (
    "'python-docs' (built in, offline), a .txt/.jsonl/.parquet file or a folder of them, "
    "a folder saved by datasets' save_to_disk (add ':SPLIT' to pick a DatasetDict split), "
    "or 'hf:NAME[:CONFIG[:SPLIT]]' for a Hugging Face dataset streamed from the hub"
)
CORPUS_SPEC_HELP = f"A corpus is {_VALID_SPECS}."

SPLITS = ("train", "test", "all")
HUB_SHUFFLE_BUFFER = 10_000


def iter_documents(
    corpus: str,
    *,
    split: str = "train",
    test_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
) -> Iterator[str]:
    """Documents of a corpus, deterministically shuffled by `seed`, restricted to a split.

    Args:
        corpus: a corpus spec; see `CORPUS_SPEC_HELP`.
        split: 'train', 'test' (the held-out documents) or 'all'.
        test_fraction: share of documents held out in 'test', chosen by a hash of each text, in [0, 1).
        seed: shuffle seed; the split does not depend on it.
        text_field: the column holding the text in .jsonl, .parquet and dataset corpora.

    Bad specs and arguments raise `InterplabError` here, at the call, not at the first `next()`.
    Empty documents are skipped.
    """
    _check_split(split, test_fraction)
    if corpus.startswith("hf:"):
        return _iter_hub(corpus, split=split, test_fraction=test_fraction, seed=seed, text_field=text_field)

    docs = [doc for doc in _read_local(corpus, text_field) if in_split(doc, split, test_fraction)]
    random.Random(seed).shuffle(docs)
    return iter(docs)


def iter_contexts(
    corpus: str,
    tokenizer: Tokenizer,
    ctx_len: int,
    *,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.05,
    text_field: str = "text",
    prepend_bos: bool | None = None,
) -> Iterator[Int[torch.Tensor, " ctx_len"]]:
    """Packed int64 contexts of shape [ctx_len] from a corpus: `iter_documents` followed by `pack_tokens`."""
    docs = iter_documents(corpus, split=split, test_fraction=test_fraction, seed=seed, text_field=text_field)
    return pack_tokens(docs, tokenizer, ctx_len, prepend_bos=prepend_bos)


def in_split(text: str, split: str, test_fraction: float) -> bool:
    """Whether a document belongs to `split`: 'test' iff the first 8 bytes of sha256(text) / 2**64 < test_fraction."""
    if split == "all":
        return True
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    is_test = int.from_bytes(digest[:8], "big") / 2**64 < test_fraction
    return is_test == (split == "test")


def _check_split(split: str, test_fraction: float) -> None:
    if split not in SPLITS:
        raise InterplabError(f"split {split!r} is not valid; valid splits: {', '.join(SPLITS)}")
    if not isinstance(test_fraction, numbers.Real) or not 0 <= test_fraction < 1:
        raise InterplabError(f"test_fraction {test_fraction!r} is not valid; it must be a number with 0 <= f < 1")


def _read_local(corpus: str, text_field: str) -> list[str]:
    """All documents of a non-hub corpus, in a fixed order."""
    if corpus == "python-docs":
        return python_docs_documents()

    path = Path(corpus).expanduser()
    if path.exists():
        if is_saved_dataset(path):
            docs = read_saved_dataset(path, text_field, dataset_split=None)
        else:
            docs = read_path(path, text_field)
    else:
        # 'folder:SPLIT' picks a split of a saved DatasetDict; only tried when the whole spec is not a path.
        folder, _, dataset_split = corpus.rpartition(":")
        if not (folder and dataset_split and is_saved_dataset(Path(folder).expanduser())):
            raise InterplabError(f"corpus path '{corpus}' does not exist; a corpus is {_VALID_SPECS}")
        docs = read_saved_dataset(Path(folder).expanduser(), text_field, dataset_split=dataset_split)

    if not docs:
        raise InterplabError(f"corpus '{corpus}' holds no documents (every text is empty)")
    return docs


def _iter_hub(corpus: str, *, split: str, test_fraction: float, seed: int, text_field: str) -> Iterator[str]:
    """Stream `hf:NAME[:CONFIG[:SPLIT]]` from the Hugging Face hub, shuffled with a seeded buffer."""
    parts = corpus[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise InterplabError(
            f"hub corpus '{corpus}' is not valid; write 'hf:NAME', 'hf:NAME:CONFIG' or 'hf:NAME:CONFIG:SPLIT'"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None  # 'hf:NAME::SPLIT' leaves the config at its default
    hub_split = parts[2] if len(parts) > 2 and parts[2] else "train"

    import datasets  # heavy (~0.6 s) and needed by hub corpora only: the package promises a light import

    try:
        dataset = datasets.load_dataset(name, config, split=hub_split, streaming=True)
    except Exception as e:  # no network, unknown name, gated repo, bad config: all are the user's to fix
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InterplabError(f"could not load HF dataset '{corpus[3:]}': {reason}") from e

    # A streamed dataset cannot be shuffled whole: `datasets` shuffles shard order and samples from a buffer.
    dataset = dataset.shuffle(seed=seed, buffer_size=HUB_SHUFFLE_BUFFER)
    return _hub_documents(dataset, corpus, split=split, test_fraction=test_fraction, text_field=text_field)


def _hub_documents(
    rows: Iterable[Mapping[str, object]], corpus: str, *, split: str, test_fraction: float, text_field: str
) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            fields = ", ".join(row)
            raise InterplabError(f"HF dataset '{corpus[3:]}' has no field '{text_field}'; fields present: {fields}")
        text = row[text_field]
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            kind = type(text).__name__
            raise InterplabError(f"field '{text_field}' of HF dataset '{corpus[3:]}' holds {kind}, not text")
        if in_split(text, split, test_fraction):
            yield text
