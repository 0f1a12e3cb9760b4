"""Text corpora, tokenising and packing.

    >>> from interplab.data import iter_contexts
    >>> contexts = iter_contexts("python-docs", tokenizer, ctx_len=128)   # int64 tensors of shape [128]

A corpus spec is a string (see `CORPUS_SPEC_HELP`); documents come shuffled by a seed and restricted to a
hash-based train/test split, then are packed into fixed-length contexts without padding.
Importing this package does not import `datasets`, `pyarrow` or `transformers`; the readers that need them do.
"""

from interplab.data.corpus import CORPUS_SPEC_HELP, iter_contexts, iter_documents
from interplab.data.packing import pack_tokens
from interplab.data.python_docs import python_docs_documents

__all__ = ["CORPUS_SPEC_HELP", "iter_contexts", "iter_documents", "pack_tokens", "python_docs_documents"]
