"""`TrainConfig`: what to train (a sweep of sparse dictionaries), on which activations, and how.

Every field has its docstring under it: `interplab sae train --help` is generated from them. The schedules are
methods here, pure functions of the step, so that a resumed run recomputes them exactly and tests can check them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from interplab.config import TextFields
from interplab.errors import InterplabError
from interplab.sae.config import ARCHS, SAEConfig

SWEPT: dict[str, tuple[str, ...]] = {
    "relu": ("l1_coefficient",),
    "topk": ("k",),
    "batchtopk": ("k",),
    "jumprelu": ("l0_coefficient",),
    "matryoshka": ("k",),
}
"""The sweep lists each architecture uses besides `expansion` (the others must hold a single value)."""

B_DEC_INITS = ("geometric_median", "mean", "zeros")
TRANSCODER_INITS = ("tied", "fitted")

# Fields that do not change what is trained: a resumed run may set them differently.
NOT_IDENTITY = ("out", "resume", "device", "checkpoint_every", "wandb_project", "allow_incomplete_store")


class SweepPoint(NamedTuple):
    """One SAE of a sweep: its folder name and its architecture config."""

    name: str
    """Folder name under --out encoding the sweep point, e.g. topk-k32-x16."""
    cfg: SAEConfig


@dataclass
class TrainConfig(TextFields):
    """Train sparse autoencoders (a sweep, all on the same batches) on a store or on a model's activations."""

    store: str | None = None
    """Activation store (folder or fsspec URL) written by `interplab harvest`; or give --model/--hook/--corpus."""
    hook: str | None = None
    """Hook point to train on (default with --store: the store's only hook; required with --model)."""
    hooks: list[str] = field(default_factory=list)
    """Instead of --hook: train one run (the whole sweep) per hook, each in OUT/<hook>/. Under torchrun the hooks
    are spread over the ranks (rank r trains hooks r, r+N, ... of N ranks), each rank on its own with no
    communication between ranks; otherwise they train one after another."""
    target: str | None = None
    """Train transcoders: reconstruct this hook from --hook (e.g. --hook blocks.6.mlp.hook_in --target
    blocks.6.hook_mlp_out), a per-token hook of the same width, other than --hook; from a store harvested with
    both hooks in one pass, or (stream mode) from one forward pass reading both. The encoder does not subtract
    b_dec (it lives in the target's space)."""
    skip: bool = False
    """With --target: add a trained linear skip connection x @ W_skip (zero-initialised; a skip transcoder)."""
    transcoder_init: str = "tied"
    """With --target: the encoder's start. tied: W_enc = W_decᵀ, as for an SAE; fitted: that, scaled by the
    least-squares factor that brings the first prediction closest to the target (it starts at FVU ≤ 1; see
    interplab.sae.transcoder_init)."""
    model: str | None = None
    """Stream mode: model spec to run directly on --corpus (its --split, --test-fraction, in contexts of --ctx-len
    tokens; no store is written)."""
    synthetic: str | None = None
    """Synthetic mode: a generator with planted features, e.g. sparse, sparse:mean_active=10,correlated=true or
    animals (see interplab.synth.specs); its stream is endless, so --tokens is required."""
    model_batch_size: int = 16
    """Stream mode: contexts per forward pass of the model."""
    shuffle_buffer: int = 65_536
    """Stream mode: activations (token rows) shuffled together; a whole number of batches is drawn from each fill."""
    exclude_bos: bool = True
    """Leave out position 0 of every context (BOS), as the evaluation does: it is an attention sink whose norm can
    dwarf the rest (SmolLM2 layer 15: ~25,000 vs ~174, 99% of the squared norm), so it would set the normalisation
    and the loss."""
    arch: str = "topk"
    """Architecture: relu (L1), topk, batchtopk, jumprelu (L0) or matryoshka (nested BatchTopK)."""
    expansion: list[int] = field(default_factory=lambda: [16])
    """Dictionary size as a multiple of the activation width (d_sae = expansion x d_in); a list sweeps."""
    k: list[int] = field(default_factory=lambda: [32])
    """topk/batchtopk/matryoshka: active latents per token; a list (e.g. 16,32,64) sweeps."""
    l1_coefficient: list[float] = field(default_factory=lambda: [5.0])
    """relu: L1 coefficient; a list (e.g. 1,3,10) sweeps."""
    l0_coefficient: list[float] = field(default_factory=lambda: [1.0])
    """jumprelu: L0 coefficient; a list sweeps."""
    aux_k: int | None = None
    """topk/batchtopk/matryoshka: dead latents used by the AuxK loss (default: the SAE config's, 512)."""
    aux_coefficient: float | None = None
    """topk/batchtopk/matryoshka: weight of the AuxK loss (default: the SAE config's, 1/32)."""
    jumprelu_bandwidth: float | None = None
    """jumprelu: bandwidth of the straight-through estimator (default: the SAE config's, 0.05)."""
    jumprelu_init_threshold: float | None = None
    """jumprelu: initial threshold of every latent (default: the SAE config's, 0.01)."""
    matryoshka_prefixes: list[int] = field(default_factory=list)
    """matryoshka: nested dictionary sizes ending at d_sae (default: d_sae/16, d_sae/4, d_sae)."""
    tokens: int | None = None
    """Training tokens, rounded up to whole batches (default with --store: one pass; the data repeats if needed)."""
    batch_size: int = 4096
    """Activations (tokens) per training step."""
    lr: float = 3e-4
    """Adam learning rate (betas 0.9, 0.999). Short runs gain from more (SmolLM2 layer 6, 384k tokens, k=32:
    held-out FVU 0.095 at 2e-4, 0.079 at 3e-4, 0.050 at 1e-3)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up: step s (from 0) uses lr x min(1, (s+1)/lr_warmup_steps)."""
    lr_decay_start: float = 0.8
    """Fraction of the steps after which the learning rate decays linearly, reaching 0 after the last step."""
    sparsity_warmup_steps: int = 0
    """relu/jumprelu: the L1/L0 coefficient at step s is coefficient x min(1, (s+1)/sparsity_warmup_steps)."""
    dead_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many tokens (capped at a quarter of the training tokens)."""
    resample_every: int = 0
    """Resample dead latents every this many steps (0: never): Anthropic-style, toward poorly reconstructed inputs."""
    normalize: bool = True
    """Scale activations so their mean squared norm is d_in (estimated on the first batches); folded in on save."""
    b_dec_init: str = "geometric_median"
    """Initial decoder bias from the first batches: geometric_median, mean or zeros."""
    log_every: int = 100
    """Record each SAE's metrics (and send them to wandb) every this many steps."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: never)."""
    out: str = "sae"
    """Run folder: one subfolder per SAE (SAELens layout) plus train_config.json, metrics.json, checkpoint.pt."""
    seed: int = 0
    """Seed of the initialisation, the data shuffle and the resampling."""
    device: str | None = None
    """Device to train on (default: cuda if available, else cpu; under torchrun each rank's own GPU)."""
    shard_latents: bool = False
    """Under torchrun: split each SAE's latents over the ranks instead of the batch (rank r of N holds d_sae/N of
    them, every rank reads the whole batch, the TopK is chosen over all ranks), for dictionaries too large for one
    device. topk only; equal to the unsharded SAE up to float rounding. Without torchrun it changes nothing."""
    resume: bool = False
    """Continue an interrupted run in --out from its last checkpoint (ends bit-identical to an uninterrupted run)."""
    allow_incomplete_store: bool = False
    """Train on a store whose harvest has not finished (manifest complete=false); refused without this flag. The
    run records the store as it is: resuming after the harvest went on is refused."""
    wandb_project: str | None = None
    """Log metrics to this Weights & Biases project (needs pip install interplab[wandb])."""

    # ---- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check what can be checked before opening the data; `sweep(d_in)` checks the rest."""
        sources = [name for name in ("store", "model", "synthetic") if getattr(self, name) is not None]
        if len(sources) != 1:
            got = f"; got --{', --'.join(sources)}" if sources else ""
            raise InterplabError("give one of --store DIR (a harvested store), --model with --hook (stream mode) or "
                                 f"--synthetic SPEC (planted features){got}")
        if self.shard_latents and (self.arch != "topk" or self.resample_every or self.hooks):
            raise InterplabError("--shard-latents trains topk SAEs (got --arch {}) without --resample-every and "
                                 "without --hooks".format(self.arch))
        if self.hooks:
            if self.hook is not None or self.synthetic is not None:
                raise InterplabError("--hooks trains one run per hook of a store or a model: give it without "
                                     "--hook and without --synthetic")
            if len(set(self.hooks)) != len(self.hooks):
                raise InterplabError(f"--hooks lists a hook twice: {self.hooks}")
        elif self.model is not None and not self.hook:
            raise InterplabError("stream mode (--model) needs --hook, e.g. blocks.6.hook_resid_post")
        self._validate_target()
        if self.tokens is not None and self.tokens < 1:
            raise InterplabError(f"--tokens must be a positive number of tokens, got {self.tokens}")
        if self.model is not None and self.tokens is None:
            raise InterplabError("stream mode (--model) needs --tokens: a corpus has no fixed length")
        if self.synthetic is not None and self.tokens is None:
            raise InterplabError("synthetic mode (--synthetic) needs --tokens: a generator's stream is endless")
        if self.arch not in ARCHS:
            raise InterplabError(f"unknown --arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        positive = ("batch_size", "log_every", "dead_tokens", "ctx_len", "model_batch_size", "shuffle_buffer")
        for name in positive:
            if getattr(self, name) < 1:
                raise InterplabError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "resample_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InterplabError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InterplabError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_decay_start <= 1:
            raise InterplabError(f"--lr-decay-start is a fraction of training in [0, 1], got {self.lr_decay_start}")
        if self.b_dec_init not in B_DEC_INITS:
            raise InterplabError(f"--b-dec-init {self.b_dec_init!r} is not one of {', '.join(B_DEC_INITS)}")
        if self.model is not None and self.shuffle_buffer < self.batch_size:
            raise InterplabError(f"--shuffle-buffer {self.shuffle_buffer} must hold at least one batch "
                                 f"(--batch-size {self.batch_size})")
        for name in ("expansion", "k", "l1_coefficient", "l0_coefficient"):
            values = getattr(self, name)
            if not values:
                raise InterplabError(f"--{_flag(name)} needs at least one value")
            if len(set(values)) != len(values):
                raise InterplabError(f"--{_flag(name)} lists a value twice: {values}")
            if len(values) > 1 and name != "expansion" and name not in SWEPT[self.arch]:
                used = ", ".join(f"--{_flag(n)}" for n in ("expansion", *SWEPT[self.arch]))
                raise InterplabError(f"--{_flag(name)} lists {len(values)} values but {self.arch} does not use it; "
                                     f"{self.arch} sweeps {used}")
        if any(e < 1 for e in self.expansion):
            raise InterplabError(f"--expansion values must be >= 1, got {self.expansion}")
        # Coefficients and other settings that do not depend on the data (k < d_sae and prefixes need d_in).
        for point in self.sweep(max(self.k) + 1, prefixes=False):
            point.cfg.validate()

    def _validate_target(self) -> None:
        """--target and --skip: a transcoder reads one hook and writes another, from a store or a model."""
        if self.skip and self.target is None:
            raise InterplabError("--skip adds a skip connection to a transcoder: give --target too")
        if self.transcoder_init not in TRANSCODER_INITS:
            raise InterplabError(f"--transcoder-init {self.transcoder_init!r} is not one of "
                                 f"{', '.join(TRANSCODER_INITS)}")
        if self.transcoder_init != "tied" and self.target is None:
            raise InterplabError("--transcoder-init starts a transcoder: give --target too")
        if self.target is None:
            return
        if self.target == self.hook:
            raise InterplabError(f"--target {self.target} is --hook itself: that trains an SAE, drop --target")
        if self.hooks or self.synthetic is not None or self.shard_latents:
            raise InterplabError("--target trains transcoders on one --hook of a store or a model: give it without "
                                 "--hooks, --synthetic and --shard-latents")
        if self.hook is None:
            raise InterplabError(f"--target {self.target} needs --hook, the hook the transcoder reads "
                                 "(e.g. blocks.6.mlp.hook_in)")

    def sweep(self, d_in: int, *, prefixes: bool = True) -> list[SweepPoint]:
        """The SAEs this run trains on activations of width `d_in`, in a fixed order (configs not yet validated)."""
        points = []
        lists = [self.expansion] + [getattr(self, name) for name in SWEPT[self.arch]]
        for expansion, *values in itertools.product(*lists):
            swept = dict(zip(SWEPT[self.arch], values))
            cfg = self._sae_config(d_in, d_in * expansion, swept)
            if not prefixes:
                cfg.matryoshka_prefixes = None
            label = "".join(f"-{_SHORT[name]}{value:g}" for name, value in swept.items())
            points.append(SweepPoint(f"{self.arch}{label}-x{expansion}", cfg))
        return points

    def _sae_config(self, d_in: int, d_sae: int, swept: dict[str, int | float]) -> SAEConfig:
        optional = ("aux_k", "aux_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold")
        extra = {name: getattr(self, name) for name in optional if getattr(self, name) is not None}
        fixed = {name: getattr(self, name)[0] for name in ("k", "l1_coefficient", "l0_coefficient")}
        return SAEConfig(arch=self.arch, d_in=d_in, d_sae=d_sae, **{**fixed, **swept}, **extra,
                         matryoshka_prefixes=list(self.matryoshka_prefixes) or None,
                         hook_name=self.hook or "", model=self.model or "",
                         apply_b_dec_to_input=False if self.target is not None else None)

    def identity(self) -> dict[str, object]:
        """The settings that define a run: resuming requires them to match."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}

    # ---- schedules ------------------------------------------------------------------------------------------
    def n_steps(self, tokens: int) -> int:
        """Training steps for `tokens` tokens: whole batches, rounding up."""
        return math.ceil(tokens / self.batch_size)

    def lr_at(self, step: int, n_steps: int) -> float:
        """Learning rate of step `step` (0-based) of `n_steps`: linear warm-up, constant, linear decay to 0.

        Warm-up factor min(1, (step+1)/lr_warmup_steps); decay factor (n_steps - step)/(n_steps - d) from step
        d = floor(lr_decay_start x n_steps) on (1 before it); the rate is lr times the smaller of the two.
        """
        warm = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        decay_from = math.floor(self.lr_decay_start * n_steps)
        decay = (n_steps - step) / (n_steps - decay_from) if step >= decay_from else 1.0
        return self.lr * min(warm, decay)

    def sparsity_factor(self, step: int) -> float:
        """Multiplier of the L1/L0 coefficient at step `step` (0-based): min(1, (step+1)/sparsity_warmup_steps)."""
        return min(1.0, (step + 1) / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0

    def dead_window(self, n_steps: int) -> int:
        """Tokens without firing after which a latent counts as dead: dead_tokens, capped at a quarter of the
        training tokens (at least one batch), so that short runs still see dead latents and feed the AuxK loss."""
        return min(self.dead_tokens, max(self.batch_size, n_steps * self.batch_size // 4))


_SHORT = {"k": "k", "l1_coefficient": "l1c", "l0_coefficient": "l0c"}


def _flag(name: str) -> str:
    return name.replace("_", "-")
