"""Configs of `interplab weights svd` and `interplab weights outliers` (standard library only: the CLI builds its
options from them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from interplab.config import ModelFields
from interplab.errors import InterplabError, check_int

MATRICES = ("ov", "qk", "mlp-in", "mlp-gate", "mlp-out", "embed", "unembed")
"""The kinds of matrix `interplab weights svd` reads (see `svd_read`)."""
PER_HEAD = ("ov", "qk")
"""The kinds with one matrix per attention head."""


@dataclass
class SVDConfig(ModelFields):
    """Read a weight matrix's top singular directions through the vocabulary, beside random directions."""

    what: str = "ov"
    """Matrix: ov, qk, mlp-in, mlp-gate, mlp-out, embed, unembed, or all (every kind at --layer, compared)."""
    layer: int = 0
    """Layer of ov, qk and the MLP matrices."""
    head: int | None = None
    """ov/qk: one head (default: every head of the layer)."""
    directions: int = 10
    """Top singular directions read per matrix (per head)."""
    top_k: int = 20
    """Tokens kept at each end of a direction; the proxies use them all."""
    controls: int = 200
    """Random residual directions read as the control."""
    out: str = "weights-svd"
    """Output folder: config.json, metrics.json and figures/."""
    seed: int = 0
    """Seed of the random directions."""

    def validate(self) -> None:
        """Refuse an unknown matrix kind and too few directions, tokens or controls."""
        if self.what != "all" and self.what not in MATRICES:
            raise InterplabError(f"--what {self.what!r} is not valid; choose from {', '.join(MATRICES)}, all")
        if self.directions < 1 or self.top_k < 2 or self.controls < 2:
            raise InterplabError(f"need --directions >= 1, --top-k >= 2 and --controls >= 2; got {self.directions}, "
                                 f"{self.top_k}, {self.controls}")


@dataclass
class OutliersConfig(ModelFields):
    """Residual-stream outlier dimensions (massive activations, rogue dims) per layer, beside a rotated basis."""

    corpus: str = "python-docs"
    """Text corpus (see `interplab harvest --help`)."""
    split: str = "train"
    """Corpus split: train, test or all."""
    tokens: int = 16_384
    """Token budget: tokens // ctx-len contexts are read."""
    ctx_len: int = 128
    """Tokens per context (BOS included when the tokenizer has one)."""
    prepend_bos: bool | None = None
    """Start every context with BOS (default: iff the tokenizer has one); --no-prepend-bos puts an ordinary
    token at position 0, to tell a BOS effect from a first-position effect."""
    batch_size: int = 8
    """Contexts per forward pass."""
    top: int = 5
    """Dims reported per layer (by max |act|) and drawn in the figure."""
    massive_abs: float = 100.0
    """Massive activation: |act| above this ..."""
    massive_ratio: float = 1000.0
    """... and above this many times the layer's median |act|."""
    rogue_factor: float = 10.0
    """Rogue dim at a layer: mean |act| at least this many times the layer's average over dims."""
    rogue_layers: float = 0.5
    """Consistent rogue dim: rogue at at least this share of the layers."""
    rogue_skip_first: bool = True
    """Take mean |act|, mean and variance (the rogue-dim statistics) over positions >= 1, so that the first
    token's massive activations do not make their dims look rogue."""
    aligned_ratio: float = 3.0
    """A layer's outlier is basis-aligned when its max |act| is at least this many times the rotated basis's."""
    max_records: int = 200_000
    """Cap on the candidate massive values recorded per basis (the carrier statistics use these)."""
    out: str = "outliers"
    """Output folder: config.json, metrics.json and figures/."""
    seed: int = 0
    """Seed of the corpus shuffle and of the random rotation."""

    def validate(self) -> None:
        """Refuse sizes, thresholds and splits out of range, before the model is loaded."""
        for name, minimum in (("tokens", 1), ("ctx_len", 2), ("batch_size", 1), ("top", 1), ("max_records", 0)):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum)
        if self.tokens < self.ctx_len:
            raise InterplabError(f"--tokens {self.tokens} is below --ctx-len {self.ctx_len}: not one context")
        checks = [(self.massive_abs > 0, f"--massive-abs must be > 0, got {self.massive_abs}"),
                  (self.massive_ratio >= 1, f"--massive-ratio must be >= 1, got {self.massive_ratio}"),
                  (self.rogue_factor > 1, f"--rogue-factor must be > 1, got {self.rogue_factor}"),
                  (0 < self.rogue_layers <= 1, f"--rogue-layers must lie in (0, 1], got {self.rogue_layers}"),
                  (self.aligned_ratio > 1, f"--aligned-ratio must be > 1, got {self.aligned_ratio}"),
                  (self.split in ("train", "test", "all"), f"--split {self.split!r} is not train, test or all")]
        for ok, message in checks:
            if not ok:
                raise InterplabError(message)
