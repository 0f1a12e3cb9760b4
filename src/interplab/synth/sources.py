"""Synthetic mode of `interplab sae train` (--synthetic SPEC): the planted-truth generator as the trainer's batch
source. It lives here, above the SAE package, so that the trainer never imports the lab that checks it:

    from interplab.sae.trainer import train
    from interplab.synth.sources import synthetic_source

    train(cfg, source=synthetic_source(cfg) if cfg.synthetic else None)
"""

from __future__ import annotations

from interplab.errors import InterplabError
from interplab.sae.sources import BatchSource
from interplab.sae.train_config import TrainConfig
from interplab.synth.sparse import SyntheticSource
from interplab.synth.specs import make_generator


def synthetic_source(cfg: TrainConfig) -> BatchSource:
    """The endless, resumable batches of the generator `cfg.synthetic` names (e.g. "sparse:mean_active=10"),
    `cfg.batch_size` rows at a time."""
    if cfg.synthetic is None:
        raise InterplabError("synthetic_source needs a config with --synthetic SPEC (e.g. sparse or animals)")
    return SyntheticSource(make_generator(cfg.synthetic), cfg.batch_size, name=f"synthetic:{cfg.synthetic}")
