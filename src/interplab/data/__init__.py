"""Text corpora, tokenising and packing.

    >>> from interplab.data import iter_contexts
    >>> contexts = iter_contexts("python-docs", tokenizer, ctx_len=128)   # int64 tensors of shape [128]

A corpus spec is a string (see `CORPUS_SPEC_HELP`); documents come shuffled by a seed and restricted to a
hash-based train/test split, then are packed into fixed-length contexts without padding.
Importing this package does not import `datasets`, `pyarrow` or `transformers`; the readers that need them do.
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "corpus": ["CORPUS_SPEC_HELP", "iter_contexts", "iter_documents"],
        "packing": ["pack_tokens"],
        "python_docs": ["python_docs_documents"],
    },
)
