"""The options of `interplab demo` (standard library only, so `interplab demo --help` imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from interplab.config import DEFAULT_MODEL


@dataclass
class DemoConfig:
    """The main job on the defaults: SmolLM2-135M on the Python-docs corpus, from activations to a report."""

    model: str = DEFAULT_MODEL
    """Model spec: 'smollm2-135m', a .gguf file, a local HF or toy-model folder, or an HF hub id."""
    corpus: str = "python-docs"
    """Text corpus (see `interplab harvest --help`)."""
    hook: str = "blocks.6.hook_resid_post"
    """The hook point to harvest, train on and evaluate at."""
    tokens: int = 131_072
    """Tokens to harvest (train split) and train the SAEs on."""
    ctx_len: int = 128
    """Tokens per context."""
    batch_size: int = 16
    """Contexts per forward pass of the harvest."""
    k: list[int] = field(default_factory=lambda: [32, 16, 64])
    """Active latents per token of the TopK SAEs, comma-separated; the first is the main SAE of the report."""
    expansion: int = 16
    """Width of the SAEs as a multiple of the activation width."""
    sae_batch_size: int = 1024
    """Activations per SAE training step."""
    eval_tokens: int = 4096
    """Held-out (test split) tokens the main (first) SAE is evaluated on."""
    other_eval_tokens: int = 2048
    """Held-out tokens each other SAE of the sweep is evaluated on (for the Pareto plot)."""
    scale_tune_tokens: int = 2048
    """Train-split tokens the main SAE's decoder scales are fine-tuned on, in 2 epochs (0: skip the fine-tuning)."""
    perturb_contexts: int = 8
    """(activation, target) pairs per target kind in the perturbation sweep (0: skip the sweep)."""
    perturb_steps: int = 11
    """Step lengths per perturbation path (0 to the median activation norm)."""
    dashboard_tokens: int = 32_768
    """Train-split tokens the main SAE's feature dashboard is built from (0: skip the dashboard)."""
    out: str = "interplab-demo"
    """Run directory: activations/, saes/, eval/, figures/ and report.md go there (an interrupted demo resumes)."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""
