"""The configs of `interplab harvest` and `interplab inspect` (standard library only: the CLI builds its options from
them without importing torch)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

from interplab.config import DTYPE_NAMES, ModelFields, TextFields
from interplab.errors import InterplabError

STORE_IDENTITY_SKIPS = ("out", "resume", "device", "device_map", "batch_size")
"""HarvestConfig fields that do not change what a store holds: a resumed harvest may set them differently."""


@dataclass
class HarvestConfig(TextFields, ModelFields):
    """What to harvest, from which model and text, and where to."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    """Hook points to harvest, comma-separated (TransformerLens names, e.g. blocks.6.hook_resid_post)."""
    tokens: int = 1_000_000
    """Number of tokens to harvest (rounded up to whole contexts)."""
    out: str = "activations"
    """Output store: a folder or fsspec URL (s3://... needs interplab[s3])."""
    dtype: str = "float32"
    """Dtype of the stored activations: float32, float16 or bfloat16."""
    model_dtype: str = "float32"
    """Dtype the model runs in: float32, float16 or bfloat16."""
    contexts_per_shard: int = 256
    """Contexts per shard file (rounded to a multiple of batch_size)."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu; under torchrun each rank's own GPU)."""
    device_map: str | None = None
    """Spread a model too large for one device over the available devices with accelerate: 'auto' (the frozen
    model's layers placed by available memory; see docs/big-models.md). Not with torchrun."""
    resume: bool = False
    """Continue an interrupted harvest in --out from its last complete shard."""

    @property
    def n_contexts(self) -> int:
        """Contexts to harvest: --tokens rounded up to whole contexts."""
        return math.ceil(self.tokens / self.ctx_len)

    @property
    def shard_contexts(self) -> int:
        """Contexts per shard: contexts_per_shard rounded down to whole batches (at least one batch)."""
        return max(self.batch_size, self.contexts_per_shard // self.batch_size * self.batch_size)

    def validate(self) -> None:
        """Check what can be checked before loading anything."""
        if self.tokens < 1:
            raise InterplabError(f"--tokens must be a positive number of tokens, got {self.tokens}")
        if self.ctx_len < 2:
            raise InterplabError(f"--ctx-len must be at least 2 (BOS plus one token), got {self.ctx_len}")
        if self.batch_size < 1 or self.contexts_per_shard < 1:
            raise InterplabError("--batch-size and --contexts-per-shard must be at least 1")
        # Python counts contexts in machine-sized integers (itertools.islice); no corpus comes close to the limit.
        for flag, value, limit in (("--tokens", self.tokens, sys.maxsize * self.ctx_len),
                                   ("--batch-size", self.batch_size, sys.maxsize),
                                   ("--contexts-per-shard", self.contexts_per_shard, sys.maxsize)):
            if value > limit:
                raise InterplabError(f"{flag} {value} is more than any corpus can supply (at most {limit:.3g}); "
                                     "a harvest stops early, with a note, when its corpus runs out")
        if not self.hooks:
            raise InterplabError("--hooks needs at least one hook name, e.g. blocks.6.hook_resid_post")
        if self.dtype not in DTYPE_NAMES:
            raise InterplabError(f"--dtype '{self.dtype}' is not one of {sorted(DTYPE_NAMES)}")

    def store_identity(self) -> dict[str, object]:
        """The settings that define a store's contents: resuming requires them to match."""
        return {k: v for k, v in asdict(self).items() if k not in STORE_IDENTITY_SKIPS}


@dataclass
class InspectConfig:
    """Describe an activation store and verify its checksums."""

    store: str = "activations"
    """Store folder or fsspec URL."""
    verify: bool = True
    """Read every shard and check its sha256."""
