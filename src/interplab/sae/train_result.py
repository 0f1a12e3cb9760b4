"""What the trainer returns and small checks it makes before training (kept apart to keep trainer.py short)."""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

from torch import Tensor

from interplab import distributed as D
from interplab.errors import InterplabError
from interplab.sae.base import SparseAutoencoder
from interplab.sae.sharded import ShardedTopKSAE
from interplab.sae.sources import Batch
from interplab.sae.train_config import TrainConfig

Metrics = dict[str, float | int | str]
"""One SAE's final metrics (numbers, and its name)."""


class TrainResult(NamedTuple):
    """What a call to `train` did."""

    out: str
    names: list[str]
    """The SAEs of the sweep, in order; each is saved in OUT/<name>."""
    saes: dict[str, SparseAutoencoder | ShardedTopKSAE]
    """The trained SAEs as they were during training: they read activations x `scale` (the saved ones read raw
    activations); with --shard-latents under torchrun, this rank's slices. Empty if the run was already complete."""
    scale: float
    """Normalisation factor the activations were multiplied by (1.0 without --normalize); the target's has its own,
    in the summary (`target_scale`)."""
    metrics: dict[str, Metrics]
    """Final metrics of each SAE (as in OUT/<name>/metrics.json, without the history)."""
    steps: int
    tokens: int
    tokens_per_s: float
    """Tokens trained in this call per second of training (data included; initialisation and saving excluded)."""
    resumed_from: int
    """Steps already done when this call started (0 for a fresh run)."""
    already_complete: bool
    """OUT held this complete run before the call: nothing was done."""


def check_data_parallel(cfg: TrainConfig, ranks: D.Ranks) -> None:
    """What data-parallel training needs of the config, checked before joining the process group."""
    if cfg.batch_size % ranks.world_size:
        raise InterplabError(f"--batch-size {cfg.batch_size} does not split evenly over {ranks.world_size} ranks; "
                             f"use a multiple of {ranks.world_size} (it is the whole batch, summed over ranks)")
    if cfg.model is not None:
        raise InterplabError("stream mode (--model) under torchrun would run the model on every rank for the same "
                             "batches: harvest a store first (torchrun ... -m interplab harvest), then train with "
                             "--store; or train one hook per rank with --hooks")


def import_wandb() -> ModuleType:
    try:
        import wandb  # optional: only with --wandb-project
    except ImportError:
        raise InterplabError("--wandb-project is set but wandb is not installed: "
                             "pip install interplab[wandb]") from None
    return wandb


def batch_parts(batch: Batch) -> tuple[Tensor, ...]:
    """A batch's tensors: (x,) for an SAE, (x, target) for a transcoder."""
    return batch if isinstance(batch, tuple) else (batch,)
