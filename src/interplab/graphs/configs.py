"""Config of `interplab graph` (standard library only: the CLI builds its options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from interplab.config import ModelFields
from interplab.errors import InterplabError, check_int

SPLITS = ("train", "test", "all")
"""The corpus splits (as `interplab.data.corpus.SPLITS`, which imports torch)."""


def check_fraction(option: str, value: float, *, open_low: bool = False) -> None:
    """Raise unless `value` is a number in [0, 1] ((0, 1] when `open_low`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (open_low and value == 0.0):
        low = "(0" if open_low else "[0"
        raise InterplabError(f"--{option} must be a number in {low}, 1], got {value!r}")


@dataclass
class GraphConfig(ModelFields):
    """An attribution graph of one prompt through per-layer or cross-layer transcoders, beside a random-dictionary
    control."""

    transcoders: str = ""
    """Folder of one transcoder per layer (interplab's set folder, or circuit-tracer's `layer_{i}.safetensors` +
    config.yaml) or of a cross-layer transcoder (circuit-tracer's `W_enc_{i}`/`W_dec_{i}.safetensors` + config.yaml)."""
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
    examples_contexts: int = 64
    """Contexts of --corpus read once to find each kept feature's top activations, shown in the viewer (0: none;
    skipped, with a note in metrics.json, for a model without a tokenizer)."""
    examples_features: int = 200
    """Most features (distinct layer and index) given top activations: the most influential kept ones first."""
    examples_k: int = 5
    """Top activating contexts kept per feature (ranked by their largest activation)."""
    examples_window: int = 8
    """Tokens shown on each side of a top context's most activating token."""
    examples_batch_size: int = 8
    """Contexts per forward pass of the top-activation search."""
    corpus: str = "python-docs"
    """Text corpus of the top activations: 'python-docs', a .txt/.jsonl/.parquet file or folder, a saved HF
    dataset, or hf:NAME."""
    split: str = "train"
    """Corpus split: train, test (held out) or all."""
    test_fraction: float = 0.05
    """Share of documents held out as the test split (a hash of each text decides; as in harvesting)."""
    ctx_len: int = 128
    """Tokens per context of the top-activation search (BOS included); at most the model's context length."""
    seed: int = 0
    """Seed of the corpus's document shuffle."""
    out: str = "graph"
    """Output folder: config.json, graph.json, metrics.json, report.md."""

    def validate(self) -> None:
        """Refuse missing inputs and values out of range before any model is loaded."""
        if not self.transcoders:
            raise InterplabError("--transcoders is required: a folder with one transcoder per layer or a cross-layer "
                                 "transcoder")
        if not self.prompt:
            raise InterplabError("--prompt is required: the text whose next-token prediction is attributed")
        check_fraction("node-threshold", self.node_threshold)
        check_fraction("edge-threshold", self.edge_threshold)
        check_fraction("logit-prob", self.logit_prob, open_low=True)
        check_int("--max-logits", self.max_logits, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--top-paths", self.top_paths, 0)
        check_int("--examples-contexts", self.examples_contexts, 0)
        check_int("--examples-features", self.examples_features, 1)
        check_int("--examples-k", self.examples_k, 1)
        check_int("--examples-window", self.examples_window, 0)
        check_int("--examples-batch-size", self.examples_batch_size, 1)
        check_int("--ctx-len", self.ctx_len, 2)
        check_int("--seed", self.seed, 0)
        if self.split not in SPLITS:
            raise InterplabError(f"--split {self.split!r} is not valid; valid splits: {', '.join(SPLITS)}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not 0 <= self.test_fraction < 1:
            raise InterplabError(f"--test-fraction must be a number with 0 <= f < 1, got {self.test_fraction!r}")
