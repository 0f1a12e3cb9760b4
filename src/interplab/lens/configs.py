"""Config of `interplab lens` (standard library only: the CLI builds its options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from interplab.config import ModelFields
from interplab.errors import InterplabError, check_int

KINDS = ("logit", "tuned")


@dataclass
class LensConfig(ModelFields):
    """Logit lens and tuned lens of every layer, scored on held-out tokens."""

    kind: str = "tuned"
    """logit: the logit lens only; tuned: train (or load) a tuned lens and report both."""
    corpus: str = "python-docs"
    """Corpus of the training tokens (train split) and the held-out tokens (test split)."""
    train_tokens: int = 16384
    """Tokens the tuned lens is trained on (position 0 of each context, BOS, is not counted or used)."""
    eval_tokens: int = 2048
    """Held-out tokens both lenses are scored on."""
    ctx_len: int = 128
    """Tokens per context."""
    batch_size: int = 8
    """Contexts per forward pass of the model."""
    epochs: int = 1
    """Passes of tuned-lens training over its cached residuals."""
    train_batch_tokens: int = 32
    """Tokens per tuned-lens optimiser step."""
    lr: float = 3e-3
    """Peak AdamW learning rate of the tuned lens (10% warm-up, cosine decay)."""
    train_dtype: str = "bfloat16"
    """Compute dtype of the readout during tuned-lens training (float32 or bfloat16); scoring is always float32."""
    layers: list[int] = field(default_factory=list)
    """Layers whose translator is trained (default: all but the last, whose logit lens is already exact)."""
    lens_path: str | None = None
    """Folder of a saved tuned lens to use instead of training one."""
    prompt: str = "The capital of France is Paris, and the capital of Germany is"
    """Prompt of the token × layer grid of top predictions."""
    top_k: int = 5
    """Predictions kept per cell of the grid in metrics.json."""
    out: str = "lens"
    """Output folder: config.json, metrics.json, figures/, tuned_lens/."""
    seed: int = 0
    """Seed of the corpus order and the training order."""

    def validate(self) -> None:
        """Refuse an unknown kind, sizes out of range, an empty prompt, and --lens-path without --kind tuned."""
        if self.kind not in KINDS:
            raise InterplabError(f"--kind {self.kind!r} is not valid; choose from {', '.join(KINDS)}")
        for name, minimum in (("train_tokens", 1), ("eval_tokens", 1), ("ctx_len", 2), ("batch_size", 1),
                              ("epochs", 1), ("train_batch_tokens", 1), ("top_k", 1)):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum)
        if not self.lr > 0:
            raise InterplabError(f"--lr must be > 0, got {self.lr}")
        if self.train_dtype not in ("float32", "bfloat16"):
            raise InterplabError(f"--train-dtype {self.train_dtype!r} is not valid; choose float32 or bfloat16")
        if not self.prompt.strip():
            raise InterplabError("--prompt is empty; give a text for the grid of top predictions")
        if self.lens_path and self.kind != "tuned":
            raise InterplabError("--lens-path needs --kind tuned")
