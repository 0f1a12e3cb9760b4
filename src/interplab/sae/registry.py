"""`make_sae`: from `SAEConfig.arch` to the class that implements it.

The one module that knows every architecture, so that base.py (which they all build on) knows none of them.
"""

from __future__ import annotations

from interplab.sae.base import SparseAutoencoder
from interplab.sae.batchtopk import BatchTopKSAE
from interplab.sae.config import SAEConfig
from interplab.sae.jumprelu import JumpReLUSAE
from interplab.sae.matryoshka import MatryoshkaSAE
from interplab.sae.relu import ReLUSAE
from interplab.sae.topk import TopKSAE

ARCH_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.arch: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)
}
"""Each `SAEConfig.arch` (config.ARCHS) and its class."""


def make_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """Validate `cfg` and build the SparseAutoencoder subclass for cfg.arch."""
    cfg.validate()
    return ARCH_CLASSES[cfg.arch](cfg)
