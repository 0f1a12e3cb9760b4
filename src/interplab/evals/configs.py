"""The configs of `interplab sae eval`, `interplab transcoder eval` and `interplab perturb` (standard library only,
so `--help` stays fast).

Their `validate()` methods hold the checks that need no model; the model-dependent ones (hook names, widths,
context length) run in `sae_eval` and `perturb` once the model is loaded, still before the first forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from interplab.config import ModelFields, TextFields
from interplab.errors import InterplabError

__all__ = ["SCALE_PER", "TARGET_KINDS", "EvalConfig", "PerturbConfig", "TranscoderEvalConfig"]

SCALE_PER = ("latent", "output")
"""What one learned decoder scale multiplies (see `scale_tune`): each latent's code, or each output dimension."""
TARGET_KINDS = ("isotropic", "mean_cov", "real", "sae_decoder")
"""The perturbation target kinds (see `perturb`)."""
SPLITS = ("train", "test", "all")


def _positive(option: str, value: float) -> None:
    """Refuse a float option that is not a finite number > 0 (nan and inf pass a plain `> 0` or fail it silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InterplabError(f"{option} must be a finite number > 0, got {value!r}")


def _check_text(split: str, test_fraction: float) -> None:
    """The corpus split and the held-out share: a valid split, 0 <= test_fraction < 1 (> 0 to read the test split)."""
    if split not in SPLITS:
        raise InterplabError(f"--split {split!r} is not valid; valid: {', '.join(SPLITS)}")
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
            or not math.isfinite(test_fraction) or not 0 <= test_fraction < 1):
        raise InterplabError(f"--test-fraction must be a number in [0, 1), got {test_fraction!r}")
    if split == "test" and test_fraction == 0:
        raise InterplabError("--test-fraction 0 holds no document out, so the test split is empty; use --split all "
                             "or a test fraction > 0")


@dataclass
class SplicedEvalFields(TextFields, ModelFields):
    """What every evaluation of a dictionary spliced into its model reads: held-out text, and the model the
    dictionary was trained on unless another is named."""

    model: str | None = None
    """Model spec (default: the model the dictionary records, e.g. in its cfg.json)."""
    split: str = "test"
    """Corpus split: test (held out, the default), train or all."""
    batch_size: int = 8

    def check_contexts(self, tokens: int) -> None:
        """What every spliced evaluation needs: contexts that predict at least two tokens after BOS, `tokens` (the
        subclass's --tokens) filling at least one of them, and a batch."""
        if self.ctx_len < 3:
            raise InterplabError(f"--ctx-len {self.ctx_len} is too short: need >= 3 (BOS plus two predicted tokens)")
        if tokens < self.ctx_len:
            raise InterplabError(f"--tokens {tokens} is less than one context (--ctx-len {self.ctx_len})")
        if self.batch_size < 1:
            raise InterplabError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class EvalConfig(SplicedEvalFields):
    """Evaluate an SAE spliced into its model, with controls (ε-random, norm-matched, covariance-matched, ablations)."""

    sae: str = ""
    """SAE folder (SAELens layout or sparsify hookpoint folder). Required."""
    hook: str | None = None
    """Hook point to splice at (default: the SAE's cfg.hook_name)."""
    tokens: int = 65_536
    """Tokens to evaluate on (rounded down to whole contexts)."""
    out: str | None = None
    """JSON file to write the metrics to (local path or fsspec URL); not written if omitted. It must be new, or hold
    this same evaluation (then it is recomputed and replaced); anything else is refused before any work."""
    figures: str | None = None
    """Folder to write the PNG figures to (kl_histograms.png, kl_gap_vs_frequency.png); none if omitted."""
    scale_tune: str = "none"
    """Decoder-scale fine-tuning before the evaluation: none, latent (one scale per latent) or output (one per
    output dimension); fitted on the train split, it adds the variants sae_scale_tuned and its own ε-random."""
    scale_tune_tokens: int = 16_384
    """Train-split tokens the decoder scales are fitted on."""
    scale_tune_epochs: int = 4
    """Passes of Adam over those tokens."""
    scale_tune_lr: float = 0.01
    """Adam learning rate of the scales."""

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model (an `InterplabError` naming the option)."""
        self.check_contexts(self.tokens)
        if self.scale_tune not in ("none", *SCALE_PER):
            raise InterplabError(f"--scale-tune {self.scale_tune!r} is not valid; valid: none, {', '.join(SCALE_PER)}")
        if self.scale_tune != "none" and self.scale_tune_tokens < self.ctx_len:
            raise InterplabError(f"--scale-tune-tokens {self.scale_tune_tokens} is less than one context "
                                 f"(--ctx-len {self.ctx_len})")
        if self.scale_tune_epochs < 1:
            raise InterplabError(f"--scale-tune-epochs must be >= 1, got {self.scale_tune_epochs}")
        _positive("--scale-tune-lr", self.scale_tune_lr)
        _check_text(self.split, self.test_fraction)


@dataclass
class PerturbConfig(TextFields, ModelFields):
    """Move real activations toward targets; record KL and a later layer's change along the way (plateaus)."""

    split: str = "test"
    """Corpus split: test (held out, the default), train or all."""
    ctx_len: int = 32
    """Tokens per context (BOS included); the last position is perturbed."""
    hook: str = "blocks.6.hook_resid_post"
    """Hook point whose activation (at the last position of each context) is perturbed."""
    sae: str | None = None
    """SAE folder whose decoder rows give the sae_decoder directions (must be trained at --hook)."""
    targets: list[str] = field(default_factory=lambda: list(TARGET_KINDS))
    """Target kinds: isotropic, mean_cov, real, sae_decoder (the last needs --sae; skipped with a note without)."""
    n_contexts: int = 64
    """Contexts, i.e. perturbed activations (pairs) per target kind and start."""
    n_steps: int = 21
    """Step lengths per path, evenly from 0 to --max-step (>= 2)."""
    max_step: float = 1.0
    """Longest step, in units of the median ‖x‖ of the sampled non-BOS activations (recorded as step_unit)."""
    kl_threshold: float = 0.1
    """KL (nats) whose first crossing marks the end of a pair's plateau."""
    later_hook: str | None = None
    """Later hook whose change is measured (default: the last block's hook_resid_post, else ln_final)."""
    out: str | None = None
    """JSON file to write the result to (local path or fsspec URL); not written if omitted. It must be new, or hold
    this same sweep (then it is recomputed and replaced); anything else is refused before any work."""
    figures: str | None = None
    """Folder to write perturbation_curves.png to; none if omitted."""

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model (an `InterplabError` naming the option)."""
        unknown = [k for k in self.targets if k not in TARGET_KINDS]
        if unknown:
            raise InterplabError(f"unknown target kind(s) {unknown}; valid kinds: {', '.join(TARGET_KINDS)}")
        _positive("--max-step", self.max_step)
        _positive("--kl-threshold", self.kl_threshold)
        _check_text(self.split, self.test_fraction)
        checks = [(self.n_steps >= 2, f"--n-steps must be >= 2 (0 and at least one step), got {self.n_steps}"),
                  (self.n_contexts >= 2, f"--n-contexts must be >= 2 (real targets need another context), "
                                         f"got {self.n_contexts}"),
                  (self.ctx_len >= 2, f"--ctx-len must be >= 2 (BOS plus the perturbed position), got {self.ctx_len}"),
                  (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")]
        for ok, message in checks:
            if not ok:
                raise InterplabError(message)


@dataclass
class TranscoderEvalConfig(SplicedEvalFields):
    """Evaluate transcoders spliced in place of their MLPs, one at a time and all at once, beside ε-random controls."""

    transcoders: str = ""
    """Folder of one transcoder, of a set (one transcoder per layer), or of a cross-layer transcoder (circuit-tracer's
    CLT layout, as `interplab transcoder train` writes). Required."""
    tokens: int = 16_384
    """Tokens to evaluate on (rounded down to whole contexts)."""
    layers: list[int] = field(default_factory=list)
    """Layers whose transcoder is spliced alone (default: every layer the transcoders cover)."""
    full_replacement: bool = True
    """Also replace every covered layer's MLP at once (with and without error terms, beside ε-random at each)."""
    out: str = "transcoder_eval"
    """Output folder (run folder): config.json, metrics.json, report.md."""

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model (an `InterplabError` naming the option)."""
        if not self.transcoders:
            raise InterplabError("--transcoders is required: a transcoder folder or a folder of one per layer")
        self.check_contexts(self.tokens)
        bad = [v for v in self.layers if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad or len(set(self.layers)) != len(self.layers):
            raise InterplabError(f"--layers must be distinct integers >= 0, got {self.layers}")
        if not self.out:
            raise InterplabError("--out is required: the folder to write the evaluation to")
        _check_text(self.split, self.test_fraction)
