"""`interplab demo`: the whole pipeline on the defaults, every step resumable.

    harvest (train split) → activation summary → TopK SAE sweep → evaluation of each SAE on held-out tokens with its
    controls (the first SAE also with decoder-scale fine-tuning) → perturbation sweep → figures → report.md →
    the main SAE's feature dashboard (a static site: open dashboard/index.html)

The model is loaded once and shared by every step. OUT is a run folder (`interplab.runs`): a foreign folder is refused,
config.json records the options, metrics.json (each SAE's L0, FVU and CE-loss score) marks the demo complete, and
each step keeps its own files below it (activations/, saes/, eval/, figures/, report.md, dashboard/).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from interplab.activations.configs import HarvestConfig
from interplab.activations.harvest import harvest
from interplab.activations.store import ActivationStore
from interplab.activations.summary import format_summary, summarize
from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.site import build_site, format_build, site_index
from interplab.demo_config import DemoConfig
from interplab.errors import InterplabError
from interplab.evals.configs import EvalConfig, PerturbConfig
from interplab.evals.figures import pareto, point_from_metrics
from interplab.evals.perturb import format_summary as format_perturb
from interplab.evals.perturb import perturbation_sweep
from interplab.evals.sae_eval import evaluate
from interplab.evals.sae_eval import format_summary as format_eval
from interplab.fileio import read_url
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.report.eval_report import write_eval_report
from interplab.runs import Run
from interplab.sae.base import SparseAutoencoder
from interplab.sae.files import load_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


def _done(path: str) -> dict[str, Any] | None:
    """A step's JSON result if a previous run finished it (results are written atomically, so present = complete)."""

    data = read_url(path)
    return None if data is None else json.loads(data)


class StepClock:
    """Wall-clock seconds of each demo step, printed at the end so that a slow machine shows where its time went."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step], self.last = now - self.last, now

    def summary(self) -> str:
        steps = ", ".join(f"{step} {s:.0f} s" for step, s in self.seconds.items())
        total = time.perf_counter() - self.start
        return f"time: {steps}; total {int(total // 60)} min {total % 60:.0f} s"


def run_demo(cfg: DemoConfig) -> None:
    """Run (or resume) every step into cfg.out, a run folder of kind "demo" (see the module docstring)."""
    if not cfg.k:
        raise InterplabError("--k needs at least one value, e.g. 32,16,64")
    with Run.open(cfg.out, "demo", asdict(cfg)) as run:
        points = _run_steps(cfg)
        run.write_metrics({"saes": points, **{k: points[0][k] for k in ("fvu", "ce_loss_score", "l0")}})


def _run_steps(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Every step of the demo; each skips what a previous run finished. Returns each SAE's Pareto point."""
    root = cfg.out.rstrip("/")
    store = f"{root}/activations"
    clock = StepClock()
    model = load_model(cfg.model, device=cfg.device)
    clock.done("model")
    print(f"interplab demo: harvesting {cfg.hook} of {cfg.model} on {cfg.corpus} ({cfg.tokens:,} tokens) -> {store}")
    result = harvest(HarvestConfig(model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus, tokens=cfg.tokens,
                                   ctx_len=cfg.ctx_len, batch_size=cfg.batch_size, out=store, device=cfg.device,
                                   resume=True), model=model)
    if not result.already_complete:
        print(f"harvested at {result.tokens_per_s:,.0f} tokens/s (forward pass and writes)")
    print(format_summary(summarize(ActivationStore(store))))
    clock.done("harvest")

    print(f"training TopK SAEs (k={','.join(map(str, cfg.k))}, {cfg.expansion}x) on the store -> {root}/saes")
    trained = train(TrainConfig(store=store, arch="topk", k=list(cfg.k), expansion=[cfg.expansion],
                                batch_size=cfg.sae_batch_size, out=f"{root}/saes", device=cfg.device, resume=True))
    for name, m in trained.metrics.items():
        print(f"{name}: training FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%} "
              f"-> {root}/saes/{name}")
    names = [f"topk-k{k}-x{cfg.expansion}" for k in cfg.k]
    clock.done("SAE training")

    evals = [_evaluate(cfg, f"{root}/saes/{name}", f"{root}/eval/{name}.json", model, main=i == 0)
             for i, name in enumerate(names)]
    figures = dict(evals[0].get("figures", {}))
    points = [point_from_metrics(r) for r in evals]
    figures["pareto"] = pareto(points, f"{root}/figures/pareto.png")
    clock.done("evaluation")
    perturb = _perturb(cfg, load_sae(f"{root}/saes/{names[0]}"), model) if cfg.perturb_contexts > 0 else None
    if perturb is not None:
        figures.update(perturb.get("figures", {}))
        clock.done("perturbation sweep")

    print(format_eval(evals[0]))
    if perturb is not None:
        print(format_perturb(perturb))
    report = write_eval_report(f"{root}/report.md", evals, figures=figures, perturb=perturb,
                               title="interplab demo", preamble=[f"`interplab demo` on {cfg.model} ({cfg.corpus})."])
    print(f"report: {report}")
    if cfg.dashboard_tokens > 0:
        print(_dashboard(cfg, f"{root}/saes/{names[0]}", model))
        clock.done("dashboard")
    print(clock.summary())
    return points


def _dashboard(cfg: DemoConfig, sae: str, model: HookedModel) -> str:
    """Build the main SAE's dashboard (skipped when a previous run finished it: its meta.js is written last)."""

    out = f"{cfg.out.rstrip('/')}/dashboard"
    if read_url(f"{out}/data/meta.js") is not None and read_url(f"{out}/index.html") is not None:
        return format_build({"index": site_index(out)})
    print(f"building the feature dashboard of {sae} on {cfg.dashboard_tokens:,} tokens -> {out}")
    return format_build(build_site(DashboardConfig(sae=sae, model=cfg.model, hook=cfg.hook, corpus=cfg.corpus,
                                                   tokens=cfg.dashboard_tokens, ctx_len=cfg.ctx_len, out=out,
                                                   device=cfg.device), model=model))


def _evaluate(cfg: DemoConfig, sae: str, out: str, model: HookedModel, *, main: bool) -> dict[str, Any]:

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


def _perturb(cfg: DemoConfig, sae: SparseAutoencoder, model: HookedModel) -> dict[str, Any]:

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
