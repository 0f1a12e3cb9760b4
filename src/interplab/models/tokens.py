"""A token id as display text, the same way in every report."""

from __future__ import annotations

from typing import Any


def token_text(tokenizer: Any, token: int) -> str:
    """The token's decoded text, or `#id` for models without a tokenizer (toy and planted models)."""
    return f"#{token}" if tokenizer is None else tokenizer.decode([token])
