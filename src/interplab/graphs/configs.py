"""Config of `interplab graph` (standard library only: the CLI builds its options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from interplab.config import ModelFields
from interplab.errors import InterplabError, check_int


def check_fraction(option: str, value: float, *, open_low: bool = False) -> None:
    """Raise unless `value` is a number in [0, 1] ((0, 1] when `open_low`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (open_low and value == 0.0):
        low = "(0" if open_low else "[0"
        raise InterplabError(f"--{option} must be a number in {low}, 1], got {value!r}")


@dataclass
class GraphConfig(ModelFields):
    """An attribution graph of one prompt through per-layer transcoders, beside a random-dictionary control."""

    transcoders: str = ""
    """Folder of one transcoder per layer (interplab's set folder, or circuit-tracer's `layer_{i}.safetensors` +
    config.yaml)."""
    prompt: str = ""
    """The prompt whose next-token prediction is attributed (the BOS token is prepended as the tokenizer does)."""
    node_threshold: float = 0.8
    """Pruning: keep the most influential nodes up to this share of the total influence on the logits
    (circuit-tracer's default)."""
    edge_threshold: float = 0.98
    """Pruning: keep the most influential edges up to this share of the total edge influence (circuit-tracer's
    default)."""
    max_logits: int = 10
    """Most logit nodes: the top predictions at the last position, up to cumulative probability --logit-prob."""
    logit_prob: float = 0.95
    """Keep top predictions as logit nodes until their probabilities sum to at least this."""
    batch_size: int = 256
    """Target nodes (features or logits) per backward pass (their gradients are held together: batch × positions ×
    d_model per layer)."""
    zero_bos: bool = True
    """Drop feature and error nodes at position 0 when it holds a special token (BOS), as circuit-tracer does: the
    BOS residual is a large constant that every attention head can read."""
    control_seed: int = 0
    """Seed of the random norm-matched dictionary of the control graph."""
    top_paths: int = 5
    """Paths to the top logit listed in report.md."""
    out: str = "graph"
    """Output folder: config.json, graph.json, metrics.json, report.md."""

    def validate(self) -> None:
        """Refuse missing inputs and values out of range before any model is loaded."""
        if not self.transcoders:
            raise InterplabError("--transcoders is required: a folder with one transcoder per layer")
        if not self.prompt:
            raise InterplabError("--prompt is required: the text whose next-token prediction is attributed")
        check_fraction("node-threshold", self.node_threshold)
        check_fraction("edge-threshold", self.edge_threshold)
        check_fraction("logit-prob", self.logit_prob, open_low=True)
        check_int("--max-logits", self.max_logits, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--top-paths", self.top_paths, 0)
