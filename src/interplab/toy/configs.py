"""The configs of the `interplab toy` commands (train, inspect): standard library only, so that building the command
line imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

from interplab.errors import InterplabError, check_int

TASK_DEFAULTS: dict[str, dict[str, int | float | str]] = {
    # Attention-only, no LayerNorm (the read-outs stay linear). 2 heads of 5 learn ov-coherent exactly in ~150 steps;
    # one head learns it too, but only on some seeds within 3000 steps (it can sit on a plateau).
    "ov-coherent": dict(heads=2, d_head=5, d_model=32, d_mlp=0, steps=3000, batch_size=256, lr=3e-3,
                        weight_decay=0.01, init_std=0.1, thorough_when="qualification.train_acc >= 0.9",
                        stop_after=-1),
    "skip-trigram": dict(heads=1, d_head=8, d_model=32, d_mlp=0, steps=2000, batch_size=256, lr=3e-3,
                         weight_decay=0.01, init_std=0.1, thorough_when="qualification.train_acc >= 0.9",
                         stop_after=-1),
    # Nanda et al. (2023) shape (1 layer, ReLU MLP, no LayerNorm, full batch, AdamW wd 1.0), shrunk to run on a CPU
    # in minutes: p = 59, train fraction 0.35 (the task's defaults), d_model 64, d_mlp 256, lr 5e-3. Measured with
    # one thread: memorised (train acc >= 0.99) near step 250, test accuracy ~0.4 (commutativity: (b, a) of a train
    # pair is right) until ~900, then >= 0.9 by ~1300 and ~0.985 after; ~30 ms per step.
    "modular-addition": dict(heads=4, d_head=16, d_model=64, d_mlp=256, steps=4000, batch_size=0, lr=5e-3,
                             weight_decay=1.0, init_std=0.05, thorough_when="qualification.train_acc >= 0.99",
                             stop_after=300),
    "python": dict(heads=4, d_head=16, d_model=64, d_mlp=256, steps=2000, batch_size=256, lr=1e-3,
                   weight_decay=0.01, init_std=0.02, thorough_when="qualification.train_acc >= 0.9", stop_after=-1),
}
"""Settings a task uses where its config leaves them unset (None)."""


@dataclass
class ToyTrainConfig:
    """Train a toy transformer on a task, with cheap qualification evals all the time and thorough ones once the
    model qualifies."""

    task: str = "ov-coherent"
    """The task: ov-coherent, skip-trigram:k=4, modular-addition:p=59,train_fraction=0.3, or
    python:FILE.py:FUNCTION (settings after the colon are the task config's fields)."""
    n_layers: int = 1
    """Transformer blocks."""
    heads: int | None = None
    """Attention heads per block (unset: the task's default; ov-coherent 2)."""
    d_head: int | None = None
    """Width of each head (unset: the task's default; ov-coherent 5)."""
    d_model: int | None = None
    """Width of the residual stream (unset: the task's default)."""
    d_mlp: int | None = None
    """MLP width, 0 for an attention-only model (unset: the task's default: 0 for ov-coherent and skip-trigram,
    256 for modular-addition)."""
    act_fn: str = "relu"
    """MLP nonlinearity: relu, gelu or silu."""
    layer_norm: bool = False
    """LayerNorm before attention, MLP and unembedding (off: the residual stream stays linear in the read-outs)."""
    init_std: float | None = None
    """Standard deviation of the initial weights (unset: the task's default)."""
    steps: int | None = None
    """Training steps at most (unset: the task's default)."""
    batch_size: int | None = None
    """Sequences per step (unset: the task's default); modular addition always trains on its whole train split."""
    lr: float | None = None
    """AdamW learning rate after warmup (unset: the task's default)."""
    weight_decay: float | None = None
    """AdamW weight decay (unset: the task's default; 1.0 for modular-addition, as in Nanda et al. 2023)."""
    warmup: int = 50
    """Steps over which the learning rate rises linearly to lr."""
    qualify_every: int = 50
    """Steps between qualification (train accuracy and loss) and safety evals."""
    thorough_every: int = 50
    """Steps between thorough (held-out) evals while that phase is active."""
    thorough_when: str | None = None
    """Condition that starts the thorough phase (unset: the task's default, e.g. 'qualification.train_acc >= 0.9';
    'qualification.train_acc >= 0.99' for modular-addition, i.e. memorised)."""
    gate: str = "thorough.test_acc >= 0.99"
    """The thorough phase's gate: once it holds, the thorough phase ends."""
    stop_after: int | None = None
    """Steps to train on after the gate passed before stopping; negative: never stop early (unset: the task's
    default, 300 for modular-addition, never for the others)."""
    max_weight_norm: float = 1000.0
    """Safety gate: training aborts if the parameters' L2 norm exceeds this (or the loss is not finite)."""
    eval_examples: int = 4096
    """Held-out examples of the thorough evals (sampled tasks; modular addition uses its whole test split)."""
    checkpoint_every: int = 1000
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seed of the initialisation and of the data stream."""
    out: str = "toy-run"
    """Run folder: config.json, log.jsonl, model/, metrics.json, checkpoints/."""
    device: str | None = None
    """Device to train on (default: cuda if available, else cpu)."""
    progress: bool = True
    """Show a progress bar."""
    resume: bool = True
    """Continue the run already in OUT (it must have the same config); --no-resume refuses to touch it."""

    def resolved(self) -> ToyTrainConfig:
        """A copy with every unset field filled in from the task's defaults (validated)."""
        kind = "python" if self.task.startswith("python:") else self.task.partition(":")[0]
        defaults = TASK_DEFAULTS.get(kind, TASK_DEFAULTS["python"])
        cfg = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise on sizes below their minimum, a non-positive rate, scale or norm bound, or negative decay."""
        for name in ("n_layers", "heads", "d_head", "d_model", "steps", "warmup", "qualify_every", "thorough_every",
                     "eval_examples", "checkpoint_every", "batch_size", "d_mlp"):
            value = getattr(self, name)
            low = 0 if name in ("warmup", "batch_size", "d_mlp") else 1
            if value is not None and value < low:
                raise InterplabError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        for name in ("lr", "init_std", "max_weight_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InterplabError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise InterplabError(f"--weight-decay must be >= 0, got {self.weight_decay}")


@dataclass
class InspectToyConfig:
    """Circuit read-outs of a toy run: read-off attention, EQKE, EVOU, head ablations, Fourier view of the embedding."""

    run: str = ""
    """Run folder written by `interplab toy train` (config.json, model/, log.jsonl, checkpoints/)."""
    out: str = ""
    """Run folder: config.json, metrics.json, report.md and figures/ (default: RUN/inspect); a rerun with the same
    config reports it."""
    examples: int = 2000
    """Sampled task sequences the attention patterns and ablation accuracies average over."""
    seed: int = 0
    """Seed of the sampled sequences."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""

    def validate(self) -> None:
        """Check the fields; fills in the default `out` (RUN/inspect) so that callers can print where files went."""
        if not self.run:
            raise InterplabError("--run is required: the folder written by `interplab toy train --out DIR`")
        check_int("--examples", self.examples, 1)
        self.out = self.out or f"{self.run.rstrip('/')}/inspect"
