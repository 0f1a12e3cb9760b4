"""Configs of `interplab probe` and `interplab refusal` (standard library only: the CLI builds its options from them
without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from interplab.config import DEFAULT_MODEL, ModelFields
from interplab.errors import InterplabError

METHODS = ("diff-means", "logistic", "ksparse")
BUILTIN_DATA = {"uppercase-tokens": "every vocabulary token, label 1 if its text starts with an uppercase letter"}

REFUSAL_START_WORDS = ("I", "Sorry", "As", "Unfortunately")
"""Words whose FIRST token counts as a refusal start. Arditi et al. used "I" (and "As") for most chat models; for
SmolLM2 "I", "Sorry", "As", "Unfortunately" are single tokens. "I" also starts compliant answers ("I'm glad you
asked…"), so the score is a proxy measured on the first token only; the substring refusal rate is measured on
generations."""


@dataclass
class ProbeConfig(ModelFields):
    """Fit probes for a labelled dataset at one hook point, each beside its controls."""

    hook: str = "blocks.15.hook_resid_post"
    """Hook point to read (e.g. blocks.6.mlp.hook_post for neurons, the usual place for k-sparse probing)."""
    data: str = "uppercase-tokens"
    """A .csv/.jsonl file of labelled texts, or a built-in: uppercase-tokens."""
    text_field: str = "text"
    """Column or key holding the text (files only)."""
    label_field: str = "label"
    """Column or key holding the 0/1 label (files only)."""
    position: str = "last"
    """Token whose activation is read: last, mean (over the text's tokens), or an index (negative from the end)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Probes to fit, comma-separated: diff-means, logistic, ksparse."""
    ks: list[int] = field(default_factory=list)
    """ksparse: probe sizes (default 1, 2, 4, ... up to 64)."""
    max_examples: int = 6000
    """At most this many examples (a seeded, class-stratified subsample), to keep the fits quick."""
    shuffles: int = 10
    """Label permutations of the shuffled-label control (ksparse uses at most 3: each refits every k)."""
    test_fraction: float = 0.25
    """Share of each class held out for scoring."""
    batch_size: int = 32
    """Texts per forward pass when collecting activations."""
    out: str = "probe"
    """Output folder: config.json, metrics.json, figures/, acts/ (the cached activations)."""
    seed: int = 0
    """Seed of the subsample, the splits and the controls."""

    def validate(self) -> None:
        """Refuse unknown methods and out-of-range sizes before anything is loaded or written."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InterplabError(f"--methods {self.methods} is not valid; choose from {', '.join(METHODS)}")
        if self.max_examples < 4 or self.shuffles < 1 or not 0 < self.test_fraction < 1:
            raise InterplabError(f"need --max-examples >= 4, --shuffles >= 1 and 0 < --test-fraction < 1; got "
                                 f"{self.max_examples}, {self.shuffles}, {self.test_fraction}")
        self.parsed_position()
        if self.data not in BUILTIN_DATA and not self.data.endswith((".csv", ".jsonl", ".ndjson")):
            raise InterplabError(f"--data {self.data!r} is neither a .csv/.jsonl file nor a built-in dataset "
                                 f"({', '.join(BUILTIN_DATA)})")

    def parsed_position(self) -> str | int:
        """--position as "last", "mean" or a token index."""
        if self.position in ("last", "mean"):
            return self.position
        try:
            return int(self.position)
        except ValueError:
            raise InterplabError(f"--position {self.position!r} is not last, mean or an integer") from None


@dataclass
class RefusalConfig(ModelFields):
    """Find the refusal direction (Arditi et al. 2024): difference-of-means candidates, selection by ablation /
    addition / KL on validation prompts, and a test with generations against a random direction of the same norm."""

    model: str = DEFAULT_MODEL
    """Model spec (must have a tokenizer; its chat template is used, else SmolLM2's ChatML)."""
    out: str = "refusal"
    """Output folder (local): config.json, metrics.json, direction.safetensors, report.md, figures/."""
    harmful: str | None = None
    """JSONL of harmful instructions with fields instruction, category, split (default: the packaged set)."""
    harmless: str | None = None
    """JSONL of harmless instructions, same fields (default: the packaged set)."""
    layers: list[int] | None = None
    """Layers to build candidates at (default: every --layer-stride-th layer from 0)."""
    layer_stride: int = 2
    """Stride over layers when --layers is not given."""
    val_size: int = 16
    """Validation prompts per set used for the selection (0: all)."""
    test_size: int = 0
    """Test prompts per set used for the evaluation (0: all)."""
    kl_limit: float = 0.1
    """Selection filter: mean KL(original ‖ ablated) on harmless val prompts (last position) must be below this."""
    max_layer_fraction: float = 0.8
    """Selection filter: candidates at layers >= this fraction of the model's depth are discarded."""
    refusal_words: list[str] = field(default_factory=lambda: list(REFUSAL_START_WORDS))
    """Words whose first token counts as a refusal start in the refusal score."""
    max_new_tokens: int = 48
    """Greedy generation length on the test prompts."""
    n_examples: int = 3
    """Example generations per condition in the report."""
    corpus: str = "python-docs"
    """Text corpus for the CE-loss change under ablation."""
    ce_tokens: int = 4096
    """Corpus tokens for the CE loss (0: skip)."""
    ce_ctx_len: int = 128
    """Tokens per corpus context."""
    orthogonalize: bool = True
    """Also write the orthogonalised weights to OUT/orthogonalized-model and compare them with the hook ablation."""
    batch_size: int = 32
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the random control direction and of the corpus shuffle."""

    def validate(self) -> None:
        """The checks that need no model (the layer range is checked once the model is loaded)."""
        if self.layer_stride < 1:
            raise InterplabError(f"--layer-stride must be >= 1, got {self.layer_stride}")
        if self.val_size < 0 or self.test_size < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise InterplabError("--val-size and --test-size must be >= 0, --max-new-tokens and --batch-size >= 1")
        if not 0 < self.max_layer_fraction <= 1:
            raise InterplabError(f"--max-layer-fraction must lie in (0, 1], got {self.max_layer_fraction}")
        if not self.refusal_words:
            raise InterplabError("--refusal-words needs at least one word")
