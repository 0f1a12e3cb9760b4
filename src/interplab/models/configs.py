"""Command configs of the models package (the CLI builds options from them): standard library only, so that
`interplab --help` needs neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass

from interplab.config import DEFAULT_MODEL


@dataclass
class HooksConfig:
    """List the hook points of a model."""

    model: str = DEFAULT_MODEL
    """Model spec."""
