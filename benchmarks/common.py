"""Pieces the benchmark scripts share: a truncated HF forward (the bare reference), fixed token batches, and
launching a script on N ranks that share this machine's two cores."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
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


def run_ranks(script: list[str], world: int, result: Path, cores: int = 2) -> dict:
    """Run `script` (a Python file and its arguments) as `world` torchrun ranks of cores // world threads each (one
    plain process when world is 1), and return the JSON its rank 0 wrote to `result`."""
    threads = str(cores // world)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
    subprocess.run(launcher + script, env=env, check=True)
    return json.loads(result.read_text())
