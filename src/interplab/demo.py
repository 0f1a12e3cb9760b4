"""`interplab demo`: the whole pipeline on the defaults, every step resumable.

    harvest (train split) → activation summary → TopK SAE sweep → evaluation of each SAE on held-out tokens with its
    controls (the first SAE also with decoder-scale fine-tuning) → perturbation sweep → figures → report.md →
    the main SAE's feature dashboard (a static site: open dashboard/index.html)

The model is loaded once and shared by every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from interplab.errors import InterplabError


@dataclass
class DemoConfig:
    """The main job on the defaults: SmolLM2-135M on the Python-docs corpus, from activations to a report."""

    model: str = "smollm2-135m"
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
    scale_tune_tokens: int = 4096
    """Train-split tokens the main SAE's decoder scales are fine-tuned on, in 2 epochs (0: skip the fine-tuning)."""
    perturb_contexts: int = 16
    """(activation, target) pairs per target kind in the perturbation sweep (0: skip the sweep)."""
    perturb_steps: int = 11
    """Step lengths per perturbation path (0 to the median activation norm)."""
    dashboard_tokens: int = 32_768
    """Train-split tokens the main SAE's feature dashboard is built from (0: skip the dashboard)."""
    out: str = "interplab-demo"
    """Run directory: activations/, saes/, eval/, figures/ and report.md go there (an interrupted demo resumes)."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""


def _done(path: str) -> dict[str, Any] | None:
    """A step's JSON result if a previous run finished it (results are written atomically, so present = complete)."""
    from interplab.fileio import read_url

    data = read_url(path)
    return None if data is None else json.loads(data)


def run_demo(cfg: DemoConfig) -> None:
    from interplab.activations.harvest import HarvestConfig, harvest
    from interplab.activations.store import ActivationStore
    from interplab.activations.summary import format_summary, summarize
    from interplab.models import load_model
    from interplab.sae import TrainConfig, load_sae, train

    if not cfg.k:
        raise InterplabError("--k needs at least one value, e.g. 32,16,64")
    root = cfg.out.rstrip("/")
    store = f"{root}/activations"
    model = load_model(cfg.model, device=cfg.device)
    print(f"interplab demo: harvesting {cfg.hook} of {cfg.model} on {cfg.corpus} ({cfg.tokens:,} tokens) -> {store}")
    result = harvest(HarvestConfig(model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus, tokens=cfg.tokens,
                                   ctx_len=cfg.ctx_len, batch_size=cfg.batch_size, out=store, device=cfg.device,
                                   resume=True), model=model)
    if not result.already_complete:
        print(f"harvested at {result.tokens_per_s:,.0f} tokens/s (forward pass and writes)")
    print(format_summary(summarize(ActivationStore(store))))

    print(f"training TopK SAEs (k={','.join(map(str, cfg.k))}, {cfg.expansion}x) on the store -> {root}/saes")
    trained = train(TrainConfig(store=store, arch="topk", k=list(cfg.k), expansion=[cfg.expansion],
                                batch_size=cfg.sae_batch_size, out=f"{root}/saes", device=cfg.device, resume=True))
    for name, m in trained.metrics.items():
        print(f"{name}: training FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%} "
              f"-> {root}/saes/{name}")
    names = [f"topk-k{k}-x{cfg.expansion}" for k in cfg.k]

    evals = [_evaluate(cfg, f"{root}/saes/{name}", f"{root}/eval/{name}.json", model, main=i == 0)
             for i, name in enumerate(names)]
    figures = dict(evals[0].get("figures", {}))
    from interplab.evals.figures import pareto, point_from_metrics

    figures["pareto"] = pareto([point_from_metrics(r) for r in evals], f"{root}/figures/pareto.png")
    perturb = _perturb(cfg, load_sae(f"{root}/saes/{names[0]}"), model) if cfg.perturb_contexts > 0 else None
    if perturb is not None:
        figures.update(perturb.get("figures", {}))

    from interplab.evals.perturb import format_summary as format_perturb
    from interplab.evals.sae_eval import format_summary as format_eval
    from interplab.report.eval_report import write_eval_report

    print(format_eval(evals[0]))
    if perturb is not None:
        print(format_perturb(perturb))
    report = write_eval_report(f"{root}/report.md", evals, figures=figures, perturb=perturb,
                               title="interplab demo", preamble=[f"`interplab demo` on {cfg.model} ({cfg.corpus})."])
    print(f"report: {report}")
    if cfg.dashboard_tokens > 0:
        print(_dashboard(cfg, f"{root}/saes/{names[0]}", model))


def _dashboard(cfg: DemoConfig, sae: str, model: Any) -> str:
    """Build the main SAE's dashboard (skipped when a previous run finished it: its meta.js is written last)."""
    from interplab.dashboard.data import DashboardConfig
    from interplab.dashboard.site import build_site, format_build, site_index
    from interplab.fileio import read_url

    out = f"{cfg.out.rstrip('/')}/dashboard"
    if read_url(f"{out}/data/meta.js") is not None and read_url(f"{out}/index.html") is not None:
        return format_build({"index": site_index(out)})
    print(f"building the feature dashboard of {sae} on {cfg.dashboard_tokens:,} tokens -> {out}")
    return format_build(build_site(DashboardConfig(sae=sae, model=cfg.model, hook=cfg.hook, corpus=cfg.corpus,
                                                   tokens=cfg.dashboard_tokens, ctx_len=cfg.ctx_len, out=out,
                                                   device=cfg.device), model=model))


def _evaluate(cfg: DemoConfig, sae: str, out: str, model: Any, *, main: bool) -> dict[str, Any]:
    from interplab.evals.sae_eval import EvalConfig, evaluate

    previous = _done(out)
    if previous is not None:
        print(f"{out} exists: evaluation of {sae} already done")
        return previous
    tune = "latent" if main and cfg.scale_tune_tokens > 0 else "none"
    tokens = cfg.eval_tokens if main else cfg.other_eval_tokens
    print(f"evaluating {sae} on {tokens:,} held-out tokens with its controls"
          + (" and decoder-scale fine-tuning" if tune != "none" else ""))
    return evaluate(EvalConfig(sae=sae, model=cfg.model, corpus=cfg.corpus, tokens=tokens, ctx_len=cfg.ctx_len,
                               device=cfg.device, out=out, figures=f"{cfg.out.rstrip('/')}/figures" if main else None,
                               scale_tune=tune, scale_tune_tokens=max(cfg.scale_tune_tokens, cfg.ctx_len),
                               scale_tune_epochs=2), model=model)


def _perturb(cfg: DemoConfig, sae: Any, model: Any) -> dict[str, Any]:
    from interplab.evals.perturb import PerturbConfig, perturbation_sweep

    root = cfg.out.rstrip("/")
    out = f"{root}/eval/perturb.json"
    previous = _done(out)
    if previous is not None:
        print(f"{out} exists: perturbation sweep already done")
        return previous
    print(f"perturbation sweep at {cfg.hook}: {cfg.perturb_contexts} pairs per target kind")
    return perturbation_sweep(PerturbConfig(model=cfg.model, hook=cfg.hook, corpus=cfg.corpus,
                                            n_contexts=cfg.perturb_contexts, n_steps=cfg.perturb_steps,
                                            device=cfg.device, out=out,
                                            figures=f"{root}/figures"), model=model, sae=sae)
