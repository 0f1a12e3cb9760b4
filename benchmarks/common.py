"""Pieces the benchmark scripts share: a truncated HF forward (the bare reference) and fixed token batches."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def truncated(base_model: nn.Module, n_layers: int) -> Iterator[nn.Module]:
    """Temporarily keep only the first `n_layers` decoder layers of an HF base model (and skip its final norm)."""
    layers, norm, n = base_model.layers, base_model.norm, base_model.config.num_hidden_layers
    base_model.layers, base_model.norm = nn.ModuleList(layers[:n_layers]), nn.Identity()
    base_model.config.num_hidden_layers = n_layers
    try:
        yield base_model
    finally:
        base_model.layers, base_model.norm, base_model.config.num_hidden_layers = layers, norm, n


def take_batches(contexts: Iterator[torch.Tensor], batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The next `n_batches` stacks of `batch_size` contexts."""
    return [torch.stack(list(itertools.islice(contexts, batch_size))) for _ in range(n_batches)]
