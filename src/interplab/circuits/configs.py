"""Configs of `interplab patch`, `interplab dla` and `interplab heads` (standard library only: the CLI builds its
options from them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from interplab.config import ModelFields
from interplab.errors import InterplabError, check_int

PROMPT_SETS = ("ioi", "induction", "factual")
"""Built-in prompt sets with clean/corrupted pairs (anything else is a JSONL file)."""
SWEEPS = ("resid", "layers", "heads", "heads-by-pos", "head-qkv", "path")
METHODS = ("activation", "attribution", "both")
METRICS = ("logit-diff", "prob", "kl")
DIRECTIONS = ("denoise", "noise")


def _check_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise InterplabError(f"--{option} {value!r} is not valid; choose from {', '.join(valid)}")


def check_prompts(value: str) -> None:
    """A built-in prompt set, or a path ending in .jsonl (the file itself is read and checked later)."""
    if value not in PROMPT_SETS and not value.endswith(".jsonl"):
        raise InterplabError(f"--prompts {value!r} is not valid; choose from {', '.join(PROMPT_SETS)}, "
                             "or give a .jsonl file of {\"clean\", \"corrupted\", \"answer\", \"wrong\"} lines")


@dataclass
class PatchConfig(ModelFields):
    """Activation and attribution patching over clean/corrupted prompt pairs, each effect beside its null."""

    prompts: str = "ioi"
    """ioi, induction, factual, or a .jsonl file with one {"clean", "corrupted", "answer", "wrong"} object a line
    (optional "null": another clean prompt of the same template)."""
    n_pairs: int = 16
    """Prompt pairs (the built-in sets generate this many; a file's first n_pairs lines are used)."""
    sweep: str = "heads"
    """resid (residual stream, layer × position), layers (attention and MLP outputs, layer × position), heads (every
    head's output, all positions), heads-by-pos, head-qkv (every head's query, key and value), path (every head as a
    sender to --receivers)."""
    method: str = "both"
    """activation (patch each node and rerun), attribution (gradient × activation difference, AtP*), or both (with
    their agreement: scatter, Spearman, top-k overlap)."""
    metric: str = "logit-diff"
    """logit-diff (answer − wrong at the last position), prob (of the answer) or kl (to the clean distribution);
    reported normalised so corrupted = 0 and clean = 1."""
    direction: str = "denoise"
    """denoise (run the corrupted prompt, patch in clean activations) or noise (run clean, patch in corrupted)."""
    receivers: str = ""
    """Path patching only: receiver heads and inputs as LAYER.HEAD:q|k|v, comma-separated (empty: the logits, i.e.
    each sender's direct path)."""
    grad_drop: bool = False
    """AtP*'s GradDrop: recompute attribution with each layer's residual gradient dropped (one backward pass per
    layer) and keep the estimate of largest magnitude."""
    batch_size: int = 16
    """Prompt pairs per forward pass."""
    seed: int = 0
    """Seed of the built-in prompt sets (names, random tokens) and of the null prompts."""
    out: str = "patch"
    """Output folder: config.json, metrics.json (every effect with its SEM and null), figures/, report.md."""

    def validate(self) -> None:
        """Refuse unknown choices and sizes out of range before any model is loaded."""
        check_prompts(self.prompts)
        _check_choice("sweep", self.sweep, SWEEPS)
        _check_choice("method", self.method, METHODS)
        _check_choice("metric", self.metric, METRICS)
        _check_choice("direction", self.direction, DIRECTIONS)
        check_int("--n-pairs", self.n_pairs, 2)
        check_int("--batch-size", self.batch_size, 1)
        if self.receivers and self.sweep != "path":
            raise InterplabError("--receivers is only used by --sweep path")
        if self.receivers:
            parse_receivers(self.receivers)


def parse_receivers(text: str) -> list[tuple[int, int, str]]:
    """`"9.6:q,9.9:k"` → `[(9, 6, "q"), (9, 9, "k")]` (ranges are checked against the model later)."""
    out = []
    for item in text.split(","):
        head, _, which = item.strip().partition(":")
        layer, _, index = head.partition(".")
        if not (layer.isdigit() and index.isdigit() and which in ("q", "k", "v")):
            raise InterplabError(f"--receivers item {item.strip()!r} is not valid; write LAYER.HEAD:q|k|v, "
                                 "e.g. 9.6:q,9.9:q")
        out.append((int(layer), int(index), which))
    return out


@dataclass
class DLAConfig(ModelFields):
    """Direct logit attribution: the final residual stream split into embedding, heads, MLPs and biases, each part
    read through the frozen final norm onto the answer − wrong logit direction."""

    prompts: str = "ioi"
    """ioi, induction, factual, or a .jsonl file (as for `interplab patch`); DLA uses the clean prompts."""
    n_pairs: int = 16
    """Prompts (pairs) to attribute; the report gives the mean and SEM of every part over them."""
    batch_size: int = 16
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the built-in prompt sets."""
    out: str = "dla"
    """Output folder: config.json, metrics.json, figures/, report.md."""

    def validate(self) -> None:
        check_prompts(self.prompts)
        check_int("--n-pairs", self.n_pairs, 1)
        check_int("--batch-size", self.batch_size, 1)


@dataclass
class HeadsConfig(ModelFields):
    """Head detectors (previous-token, duplicate-token, induction, copying) for every head, each beside its value on
    a control (shuffled positions, and a model of the same shape with random weights)."""

    n_seqs: int = 32
    """Random token sequences the detectors are measured on."""
    seq_len: int = 32
    """Length of each random half (induction sequences repeat it once: 2 × seq_len tokens after BOS)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the random sequences and of the random-weights control."""
    out: str = "heads"
    """Output folder: config.json, metrics.json (every score with its control), figures/, report.md."""

    def validate(self) -> None:
        check_int("--n-seqs", self.n_seqs, 2)
        check_int("--seq-len", self.seq_len, 2)
        check_int("--batch-size", self.batch_size, 1)
