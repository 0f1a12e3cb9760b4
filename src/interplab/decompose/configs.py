"""The config of `interplab decompose` (standard library only, so building the command line imports no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from interplab.errors import InterplabError, check_int

METHODS = ("spd", "apd")
"""Decomposition methods: stochastic (Bushnaq et al. 2025) and attribution-based (Braun et al. 2025)."""
OUTPUT_LOSSES = ("mse", "kl")
"""How the decomposed model's output is compared with the target's."""


@dataclass
class DecomposeConfig:
    """Decompose a model's weights into rank-1 subcomponents (SPD, or the APD baseline), scored against the truth."""

    toy: str | None = None
    """A built-in model with known mechanisms (interplab.decompose.toys.TOYS): tms-5-2, tms-5-2-id, tms-40-10,
    tms-40-10-id, and those other files register (resid-mlp-1, ...). Trained with --seed, cached in OUT/target."""
    model: str | None = None
    """Instead of --toy: a language model (interplab.models.load_model spec: HF folder or hub id, GGUF, a toy
    transformer folder) whose --layers are decomposed on --corpus contexts, the output loss being KL(target's
    next-token distributions ‖ the masked model's); no truth: scored by live counts, importance sparsity and the
    kept/ablated losses beside random subsets of the same size. SPD only."""
    layers: list[str] | None = None
    """Names of the weights to decompose: nn.Linear / Conv1D / nn.Embedding modules (HF: names of the HF model's
    named_modules(), e.g. model.layers.0.mlp.up_proj), or a toy transformer's W_E, W_U, blocks.L.mlp.W_in,
    blocks.L.mlp.W_out (default: the toy's own targets; required with --model)."""
    corpus: str = "python-docs"
    """--model: the text the token contexts come from (interplab.data corpus spec); a model without a tokenizer
    (a toy transformer) gets uniformly random token ids instead."""
    ctx_len: int = 32
    """--model: tokens per context."""
    n_contexts: int = 512
    """--model: contexts read once from the corpus; batches are drawn from them (seeded) and the scores use a
    held-out draw."""
    method: str = "spd"
    """spd (causal-importance masks) or apd (gradient attributions, batch top-k, Schatten-p simplicity)."""
    C: int | None = None
    """Subcomponents per weight matrix (SPD) or components in all (APD); default: the paper's for the toy (SPD:
    20 for TMS 5-2, 200 for 40-10; APD: n_features), else 64."""
    steps: int | None = None
    """Training steps (default: the toy's shortened CPU schedule, see interplab.decompose.presets)."""
    lr: float | None = None
    """Peak Adam learning rate (cosine decay to 0; default: the preset's)."""
    batch_size: int | None = None
    """Inputs per step (default: the preset's)."""
    importance_coeff: float | None = None
    """SPD: coefficient β₃ of the importance-minimality penalty Σ_l Σ_c |g|^p (default: the preset's, 3e-3 for TMS
    5-2, 1e-4 for 40-10)."""
    p: float | None = None
    """SPD: the exponent p of the importance-minimality penalty (default 1 for TMS 5-2, 2 for 40-10);
    APD: the Schatten p of the simplicity penalty (default 1)."""
    faithfulness_coeff: float | None = None
    """Coefficient of the faithfulness loss (mean_(l,i,j) (W − Σ_c U_c V_cᵀ)², SPD and APD). Default: 1, but 0
    for SPD with the delta component (the residual is then carried by that component, as in the reference code)."""
    delta_component: bool = True
    """SPD: add each layer's residual Δ = W − Σ_c U_c V_cᵀ to the masked forward with its own random mask
    m_Δ ~ U(0, 1) per input (the reference implementation since Sept. 2025, replacing the faithfulness loss: a
    residual that is randomly scaled raises the reconstruction losses, so it is driven to 0).
    --no-delta-component: the paper's form (faithfulness loss, no residual in the forward)."""
    recon_coeff: float = 1.0
    """SPD: β₁, stochastic reconstruction with every layer masked at once. APD: the minimality (top-k) loss."""
    recon_layerwise_coeff: float = 1.0
    """SPD: β₂, stochastic reconstruction with one layer masked at a time (averaged over layers)."""
    simplicity_coeff: float | None = None
    """APD: coefficient of the Schatten-p simplicity loss of the active components (default: the preset's, 0.7)."""
    top_k: float | None = None
    """APD: batch top-k, the mean number of active components per input (default: the preset's, 0.211 for TMS 5-2)."""
    ci_hidden: int = 16
    """SPD: hidden GELU width of each subcomponent's causal-importance MLP."""
    warmup_steps: int = 200
    """SPD: faithfulness-only steps (at lr 0.01) before training, as the reference code does, so the components
    start near the target weights."""
    warmup_weight_decay: float = 0.1
    """SPD: AdamW weight decay during the faithfulness warm-up (the reference's 0.1: the superfluous subcomponents
    start small)."""
    live_threshold: float = 0.1
    """A subcomponent is live if its causal importance exceeds this on some held-out input."""
    eval_batch: int = 4096
    """Held-out inputs for the scores."""
    controls: bool = True
    """Also decompose a randomly re-initialised model of the same shape, and score a random rank-1 basis."""
    seed: int = 0
    """Seed of the target model, the decomposition's initialisation, its data and masks."""
    checkpoint_every: int = 500
    """Steps between checkpoints (OUT/checkpoints/*.pt); a rerun resumes from the newest."""
    out: str = "decompose"
    """Run folder: config.json, metrics.json, report.md, figures/, target/ (the trained toy), checkpoints/."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show progress bars."""
    resume: bool = True
    """Continue the run already in OUT (same config); --no-resume refuses to touch it."""

    def validate(self) -> None:
        """Raise InterplabError naming the first bad field and what is valid (no torch, nothing read)."""
        if (self.toy is None) == (self.model is None):
            raise InterplabError("give exactly one of --toy NAME or --model SPEC")
        if self.method not in METHODS:
            raise InterplabError(f"--method {self.method!r} is not known; valid: {', '.join(METHODS)}")
        if self.model is not None and not self.layers:
            raise InterplabError("--model needs --layers: the nn.Linear / nn.Embedding names to decompose")
        if self.model is not None and self.method != "spd":
            raise InterplabError("--model takes --method spd only (APD here needs [batch, d] outputs: the toys)")
        check_int("--ctx-len", self.ctx_len, 2)
        check_int("--n-contexts", self.n_contexts, 1)
        for name in ("C", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"--{name.replace('_', '-')}", value, 1)
        check_int("--ci-hidden", self.ci_hidden, 1)
        check_int("--warmup-steps", self.warmup_steps, 0)
        check_int("--eval-batch", self.eval_batch, 1)
        check_int("--checkpoint-every", self.checkpoint_every, 1)
        for name in ("lr", "importance_coeff", "p", "simplicity_coeff", "top_k"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InterplabError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        for name in ("faithfulness_coeff", "recon_coeff", "recon_layerwise_coeff", "warmup_weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InterplabError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0 < self.live_threshold < 1:
            raise InterplabError(f"--live-threshold must be in (0, 1), got {self.live_threshold}")

    @property
    def faithfulness(self) -> float:
        """The faithfulness coefficient in use (see faithfulness_coeff)."""
        if self.faithfulness_coeff is not None:
            return self.faithfulness_coeff
        return 0.0 if self.method == "spd" and self.delta_component else 1.0

    @property
    def source(self) -> str:
        """What is decomposed: "toy:NAME" or "model:SPEC"."""
        return f"model:{self.model}" if self.model is not None else f"toy:{self.toy}"

