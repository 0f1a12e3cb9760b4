"""The configs of the `interplab beliefs` commands (msp, train, regress): standard library only, so that building
the command line imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from interplab.errors import InterplabError

DEFAULT_PROCESS = "mess3:x=0.05,a=0.85"
"""The process every beliefs command describes or trains on unless told otherwise (Shai et al. 2024's Mess3)."""


@dataclass
class MSPConfig:
    """Describe a process exactly: stationary distribution, entropies, mixed-state presentation and its spectrum."""

    process: str = DEFAULT_PROCESS
    """The process: a spec (mess3, mess3:x=0.05,a=0.85, rrxor, z1r, even, golden_mean) or a .npy/.json file."""
    depth: int = 7
    """Tokens of the mixed-state presentation to expand (Mess3's beliefs are all distinct: 3^depth at the last)."""
    entropy_length: int = 10
    """Myopic entropies h(L) for L = 1 .. this."""
    eigenvalues: int = 8
    """Leading eigenvalues (by magnitude) of the MSP transition matrix to report."""
    out: str = "beliefs-msp"
    """Run folder: config.json, metrics.json and figures/simplex.png (a rerun with the same config reports it)."""

    def validate(self) -> None:
        """Raise unless every count is an integer >= 1."""
        for name in ("depth", "entropy_length", "eigenvalues"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise InterplabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class BeliefTrainConfig:
    """Train a toy transformer on sequences from a hidden Markov process (next-token cross-entropy)."""

    process: str = DEFAULT_PROCESS
    """The process: a spec (mess3, mess3:x=0.05,a=0.85, rrxor, z1r, even, golden_mean) or a .npy/.json file."""
    layers: int = 4
    """Transformer blocks."""
    d_model: int = 64
    """Width of the residual stream."""
    heads: int = 1
    """Attention heads per block."""
    d_head: int | None = None
    """Width of each head (default: d_model / heads)."""
    d_mlp: int | None = None
    """MLP hidden width (default: 4 · d_model)."""
    ctx: int = 10
    """Context length: the model reads this many tokens (no BOS) and predicts the next at each position."""
    tokens: int = 3_200_000
    """Training tokens (input positions: steps · batch_size · ctx)."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak Adam learning rate."""
    warmup: float = 0.02
    """Fraction of the steps over which the learning rate rises linearly from 0 to lr."""
    lr_final: float = 0.05
    """After warmup the learning rate follows a cosine from lr down to lr · lr_final at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    checkpoints: list[int] = field(default_factory=list)
    """Token counts at which to save a checkpoint (default: 1, 2, 3.2, 6.4 × 10^k from 10k up); each is rounded up
    to whole steps, and the final count is always saved."""
    eval_sequences: int = 8192
    """Evaluate the per-position loss and its gap to the optimum exactly over all n_tokens^ctx sequences when there
    are at most this many, else over this many sampled sequences (fixed, never trained on)."""
    log_every: int = 50
    """Steps per point of the training-loss curve."""
    out: str = "beliefs-run"
    """Run folder: config.json, metrics.json, model/, checkpoints/."""
    seed: int = 0
    """Seed of the initialisation and of the data stream."""
    device: str = "cpu"
    """Device to train on."""
    progress: bool = True
    """Show a progress bar."""
    resume: bool = True
    """Continue the run already in OUT from its last checkpoint (it must have the same config); --no-resume
    refuses to touch an existing run."""

    def validate(self) -> None:
        """Raise on sizes below 1, a width that does not split into heads, a bad schedule, or under one step."""
        for name in ("layers", "d_model", "heads", "ctx", "tokens", "batch_size", "log_every", "eval_sequences"):
            if getattr(self, name) < 1:
                raise InterplabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.d_head is None and self.d_model % self.heads:
            raise InterplabError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}; "
                                 "pass --d-head explicitly")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or not 0 <= self.lr_final <= 1:
            raise InterplabError(f"need --lr > 0, 0 <= --warmup < 1 and 0 <= --lr-final <= 1; got {self.lr}, "
                                 f"{self.warmup}, {self.lr_final}")
        if self.tokens < self.tokens_per_step:
            raise InterplabError(f"--tokens {self.tokens} is less than one step (batch_size · ctx = "
                                 f"{self.tokens_per_step})")

    @property
    def tokens_per_step(self) -> int:
        """Input positions per training step: batch_size · ctx."""
        return self.batch_size * self.ctx

    @property
    def steps(self) -> int:
        """Training steps: the tokens rounded up to whole steps."""
        return math.ceil(self.tokens / self.tokens_per_step)


@dataclass
class BeliefRegressConfig:
    """Regress belief states on a trained run's activations at every checkpoint, with cross-validation and a
    shuffle control."""

    run: str = "beliefs-run"
    """Run folder written by `interplab beliefs train`."""
    hooks: list[str] = field(default_factory=list)
    """Hooks to regress from, each on its own, comma-separated (default: blocks.0.hook_resid_pre and every
    blocks.N.hook_resid_post)."""
    concat: bool | None = None
    """Also regress from all the hooks concatenated (default: on when --hooks is not given)."""
    weighted: bool = False
    """Weight each sequence by its probability P(w) (default: every sequence and position counts once, as in the
    paper)."""
    checkpoint: list[int] = field(default_factory=list)
    """Token counts of the checkpoints to regress at, comma-separated (default: every saved one). The last one
    gets the controls and the figures."""
    folds: int = 5
    """Cross-validation folds (whole sequences per fold)."""
    shuffles: int = 20
    """Repeats of the shuffle control."""
    sample: int = 0
    """Regress on this many sampled sequences instead of every sequence (needed when there are too many)."""
    max_sequences: int = 200_000
    """Most sequences to enumerate (n_tokens^ctx); beyond it, use --sample."""
    patch_pairs: int = 256
    """Belief patching at the last checkpoint (Shai et al.): move the belief subspace of one sampled sequence's last
    position into another's, over this many pairs, beside a random-subspace control (0: skip)."""
    patch_hook: str = ""
    """Hook to patch at, one of the regressed hooks (default: the final layer's resid_post)."""
    figures: bool = True
    """Draw the simplex, MSE-vs-tokens, per-layer (MSE; R² on beliefs and on next-token probabilities) and belief
    patching figures into the run folder."""
    out: str = ""
    """JSON to write (default: RUN/regress.json)."""
    seed: int = 0
    """Seed of the folds, the shuffles and --sample."""

    def validate(self) -> None:
        """Raise on impossible fold, shuffle or sample counts, or --weighted with --sample."""
        if self.folds < 2 or self.shuffles < 0 or self.sample < 0 or self.max_sequences < 1:
            raise InterplabError(f"need --folds >= 2, --shuffles >= 0, --sample >= 0 and --max-sequences >= 1; got "
                                 f"{self.folds}, {self.shuffles}, {self.sample}, {self.max_sequences}")
        if self.patch_pairs == 1 or self.patch_pairs < 0:
            raise InterplabError(f"--patch-pairs must be 0 (no belief patching) or >= 2, got {self.patch_pairs}")
        if self.sample and self.weighted:
            raise InterplabError("--weighted applies to enumerated sequences; sampled ones (--sample) are already "
                                 "drawn in proportion to their probability")
