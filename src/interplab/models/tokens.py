"""Token ids as text: the byte tokenizer of table-embedding (planted) models, and a token's display text in reports."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

BOS_TEXT = "<bos>"
"""How `ByteTokenizer` shows its BOS token in decoded text."""


class Decoder(Protocol):
    """What `token_text` needs of a tokenizer: an HF tokenizer and `ByteTokenizer` both have it."""

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and BOS = 256: what `pack_tokens` needs, with nothing to download.

    Decoding is the inverse, with the bytes that are not valid UTF-8 on their own (half of a "é") shown as U+FFFD and
    BOS shown as `<bos>`, so that dashboards and token tables can print any id of the vocabulary.
    """

    bos_token_id = 256
    eos_token_id = None
    vocab_size = 257

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        """{"input_ids": one list of byte ids per text}; HF keywords (add_special_tokens, ...) are accepted and
        ignored, since there are no special tokens to add."""
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        """The text of `ids`: consecutive bytes decoded together (errors='replace'), BOS as `<bos>` (or dropped with
        skip_special_tokens). Other HF keywords (clean_up_tokenization_spaces, ...) are accepted and ignored."""
        parts: list[str] = []
        run = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the byte vocabulary 0..{self.vocab_size - 1}")
            if token < self.bos_token_id:
                run.append(token)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special_tokens:
                parts.append(BOS_TEXT)
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        """`decode` of each sequence."""
        return [self.decode(ids, **kwargs) for ids in sequences]


def token_text(tokenizer: Decoder | None, token: int) -> str:
    """The token's decoded text, or `#id` for models without a tokenizer (toy models)."""
    return f"#{token}" if tokenizer is None else tokenizer.decode([token])
