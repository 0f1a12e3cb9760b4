"""One training run per hook point, spread over torchrun's ranks: `interplab sae train --hooks a,b,c`.

Rank r of N trains hooks r, r+N, r+2N, ... one after another, each as an ordinary run in OUT/<hook>/ (its own
checkpoints, its own `--resume`). The ranks never communicate: no process group, no barrier, no gathered
metrics. That is the point. Schemes that exchange activations between ranks must keep every rank's collectives in
lockstep, and hang when the ranks' work differs (sparsify's distribute mode hung when the number of examples did
not divide evenly over the ranks, EleutherAI/sparsify#68, and at checkpoint saves, #69). Here a rank that finishes
early just exits, and torchrun waits for the others.

The price of independence: every rank reads its own data. From a store that is only reading; in stream mode
(--model) each rank runs the model for its own hooks.
"""

from __future__ import annotations

from dataclasses import replace

from interplab import distributed as D
from interplab.fileio import join
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import TrainResult, train


def hooks_of_rank(hooks: list[str], ranks: D.Ranks) -> list[str]:
    """The hooks rank `ranks.rank` trains: every world_size-th one, starting at its rank."""
    return hooks[ranks.rank::ranks.world_size]


def hook_run_config(cfg: TrainConfig, hook: str) -> TrainConfig:
    """The run of one hook: the same settings, in OUT/<hook>/."""
    return replace(cfg, hook=hook, hooks=[], out=join(cfg.out, hook))


def train_hooks(cfg: TrainConfig, *, progress: bool = True) -> dict[str, TrainResult]:
    """Train this rank's share of `cfg.hooks` (all of them outside torchrun); returns {hook: result}."""
    cfg.validate()
    ranks = D.ranks()
    mine = hooks_of_rank(cfg.hooks, ranks)
    if progress and ranks.distributed:
        print(f"rank {ranks.rank} of {ranks.world_size} trains {', '.join(mine) or 'nothing (more ranks than hooks)'}")
    return {hook: train(hook_run_config(cfg, hook), progress=progress, data_parallel=False) for hook in mine}
