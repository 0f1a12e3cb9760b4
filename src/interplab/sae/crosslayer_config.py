"""`CLTTrainConfig`: what `interplab transcoder train` trains (a sweep of cross-layer transcoders) and how.

Every field has its docstring under it: `interplab transcoder train --help` is generated from them. Standard library
only, so that `--help` never imports torch. The schedules are pure functions of the step, so that a resumed run
recomputes them exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from interplab.config import ModelFields, TextFields
from interplab.errors import InterplabError

CLT_ACTIVATIONS = ("relu", "jumprelu", "topk")
"""The activations a cross-layer transcoder can use."""
IN_HOOK = "blocks.{layer}.mlp.hook_in"
OUT_HOOK = "blocks.{layer}.hook_mlp_out"
CLT_SWEPT: dict[str, str] = {"relu": "l1_coefficient", "jumprelu": "l0_coefficient", "topk": "k"}
"""The list each activation sweeps besides d_sae (the other lists must hold one value)."""
NOT_IDENTITY = ("out", "resume", "device", "checkpoint_every")
"""Fields that do not change what is trained: a resumed run may set them differently."""
_SHORT = {"k": "k", "l1_coefficient": "l1c", "l0_coefficient": "l0c"}


class CLTPoint(NamedTuple):
    """One CLT of a sweep."""

    name: str
    """Its folder under --out, e.g. clt-topk-k16-f1024."""
    d_sae: int
    """Features per layer."""
    k: int
    """topk: active features per token at each layer."""
    l1_coefficient: float
    """relu: weight of the decoder-norm-weighted L1 penalty."""
    l0_coefficient: float
    """jumprelu: weight of the L0 penalty."""


@dataclass
class CLTTrainConfig(ModelFields, TextFields):
    """Train cross-layer transcoders (a sweep, all on the same batches) on a model's MLP inputs and outputs."""

    tokens: int = 200_000
    """Training tokens (rounded up to whole steps of --batch-size contexts, BOS left out with --drop-bos)."""
    activation: str = "topk"
    """relu (L1 penalty weighted by decoder norms), jumprelu (L0 penalty) or topk (k features per layer)."""
    d_sae: list[int] = field(default_factory=lambda: [1024])
    """Features per layer; a list (e.g. 512,1024) sweeps."""
    k: list[int] = field(default_factory=lambda: [16])
    """topk: active features per token at each layer; a list (e.g. 8,16,32) sweeps."""
    l1_coefficient: list[float] = field(default_factory=lambda: [1e-3])
    """relu: weight of mean_b Σ f·‖W_dec‖; a list sweeps."""
    l0_coefficient: list[float] = field(default_factory=lambda: [1e-3])
    """jumprelu: weight of the mean number of active features per token (summed over layers); a list sweeps."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the straight-through estimator's rectangle kernel."""
    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial threshold of every feature."""
    aux_k: int = 64
    """topk: dead features per token and layer used by the AuxK loss (0: no AuxK)."""
    aux_coefficient: float = 1 / 32
    """topk: weight of the AuxK loss (dead features reconstruct the detached residual of the outputs they reach)."""
    lr: float = 1e-3
    """Adam learning rate (betas 0.9, 0.999)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up: step s (from 0) uses lr x min(1, (s+1)/lr_warmup_steps)."""
    lr_decay_start: float = 0.8
    """Fraction of the steps after which the learning rate decays linearly, reaching 0 after the last step."""
    normalize: bool = True
    """Scale each layer's MLP input and output so their mean squared norm is d_model (from the first batch), so
    every layer weighs alike in the loss; folded into the saved weights exactly."""
    dead_tokens: int = 1_000_000
    """A feature is dead once it has not fired for this many tokens (capped at a quarter of the training tokens)."""
    drop_bos: bool = True
    """Leave out each context's first position (BOS activations are outliers that no sparse code should fit)."""
    in_hook: str = IN_HOOK
    """Template of the hook each encoder reads."""
    out_hook: str = OUT_HOOK
    """Template of the hook each layer's decoders predict."""
    log_every: int = 50
    """Record each CLT's metrics every this many steps."""
    checkpoint_every: int = 200
    """Write a resumable checkpoint every this many steps (0: never)."""
    out: str = "clt"
    """Run folder: one subfolder per CLT (circuit-tracer's CLT layout) plus train_config.json, metrics.json."""
    resume: bool = False
    """Continue an interrupted run in --out from its last checkpoint (ends bit-identical to an uninterrupted run)."""

    # ---- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse, in one line, settings that are wrong whatever the model (hooks are checked against it later)."""
        if self.activation not in CLT_ACTIVATIONS:
            raise InterplabError(f"unknown --activation {self.activation!r}; valid: {', '.join(CLT_ACTIVATIONS)}")
        for name in ("tokens", "batch_size", "ctx_len", "log_every", "dead_tokens"):
            if getattr(self, name) < 1:
                raise InterplabError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "checkpoint_every", "aux_k"):
            if getattr(self, name) < 0:
                raise InterplabError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.drop_bos and self.ctx_len < 2:
            raise InterplabError("--drop-bos needs --ctx-len >= 2")
        if self.tokens < self.tokens_per_step:
            raise InterplabError(f"--tokens {self.tokens} is less than one batch ({self.tokens_per_step} tokens: "
                                 f"--batch-size {self.batch_size} contexts of {self.rows_per_context} trained "
                                 "positions)")
        for name in ("lr", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise InterplabError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.lr_decay_start <= 1:
            raise InterplabError(f"--lr-decay-start is a fraction of training in [0, 1], got {self.lr_decay_start}")
        if self.aux_coefficient < 0:
            raise InterplabError(f"--aux-coefficient must be >= 0, got {self.aux_coefficient}")
        for name in ("in_hook", "out_hook"):
            if "{layer}" not in getattr(self, name):
                raise InterplabError(f"--{_flag(name)} must be a template with {{layer}}, e.g. "
                                     f"{IN_HOOK if name == 'in_hook' else OUT_HOOK!r}; got {getattr(self, name)!r}")
        self._validate_lists()

    def _validate_lists(self) -> None:
        for name in ("d_sae", "k", "l1_coefficient", "l0_coefficient"):
            values = getattr(self, name)
            if not values:
                raise InterplabError(f"--{_flag(name)} needs at least one value")
            if len(set(values)) != len(values):
                raise InterplabError(f"--{_flag(name)} lists a value twice: {values}")
            if len(values) > 1 and name not in ("d_sae", CLT_SWEPT[self.activation]):
                raise InterplabError(f"--{_flag(name)} lists {len(values)} values but {self.activation} does not "
                                     f"use it; {self.activation} sweeps --d-sae, --{_flag(CLT_SWEPT[self.activation])}")
        if min(self.d_sae) < 1:
            raise InterplabError(f"--d-sae values must be >= 1, got {self.d_sae}")
        for name in ("l1_coefficient", "l0_coefficient"):
            if min(getattr(self, name)) < 0:
                raise InterplabError(f"--{_flag(name)} values must be >= 0, got {getattr(self, name)}")
        if self.activation == "topk":
            for point in self.sweep():
                if not 1 <= point.k < point.d_sae:
                    raise InterplabError(f"topk needs 1 <= k < d_sae, got k={point.k} with d_sae={point.d_sae}")

    def sweep(self) -> list[CLTPoint]:
        """The CLTs this run trains, in a fixed order: d_sae × the activation's swept list."""
        swept = CLT_SWEPT[self.activation]
        points = []
        for d_sae, value in itertools.product(self.d_sae, getattr(self, swept)):
            fixed = {name: getattr(self, name)[0] for name in ("k", "l1_coefficient", "l0_coefficient")}
            fixed[swept] = value
            points.append(CLTPoint(f"clt-{self.activation}-{_SHORT[swept]}{value:g}-f{d_sae}", d_sae, **fixed))
        return points

    def identity(self) -> dict[str, object]:
        """The settings that define a run: resuming requires them to match."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}

    # ---- sizes and schedules --------------------------------------------------------------------------------
    @property
    def rows_per_context(self) -> int:
        """Trained positions per context (BOS left out with drop_bos)."""
        return self.ctx_len - int(self.drop_bos)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.rows_per_context

    @property
    def n_steps(self) -> int:
        """Training steps: whole batches of contexts, rounding up."""
        return math.ceil(self.tokens / self.tokens_per_step)

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): lr × min(warm-up, decay), as `TrainConfig.lr_at`:
        warm-up min(1, (step+1)/lr_warmup_steps); decay (n − step)/(n − d) from d = ⌊lr_decay_start·n⌋ on."""
        n = self.n_steps
        warm = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        decay_from = math.floor(self.lr_decay_start * n)
        decay = (n - step) / (n - decay_from) if step >= decay_from else 1.0
        return self.lr * min(warm, decay)

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a feature counts as dead: dead_tokens, capped at a quarter of the
        training tokens (at least one batch), so that short runs still see dead features."""
        return min(self.dead_tokens, max(self.tokens_per_step, self.n_steps * self.tokens_per_step // 4))


def _flag(name: str) -> str:
    return name.replace("_", "-")
