"""`interplab patch`: activation and/or attribution patching over clean/corrupted prompt pairs, every effect beside
its null control and standard error.

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (per grid: mean, SEM, null mean and
SEM, within-noise flags; attribution estimates and their agreement with activation patching; the clean and
corrupted baselines and the model's accuracy on the prompts), OUT/figures/*.png and OUT/report.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from interplab.circuits.agreement import Agreement, agreement
from interplab.circuits.agreement_figures import agreement_scatter
from interplab.circuits.attribution import attribution_patch
from interplab.circuits.configs import PatchConfig, parse_receivers
from interplab.circuits.effects import Effects, mean_sem, summarise
from interplab.circuits.figures import effect_heatmap
from interplab.circuits.metrics import Baseline, MetricTargets, PairMetric, make_metric, normalise, null_effect
from interplab.circuits.nodes import sweep_grids
from interplab.circuits.path import Receiver, check_receivers, path_patch
from interplab.circuits.patching import Runs, activation_patch, direction_runs
from interplab.circuits.prompts import PairBatch, clean_accuracy, load_pairs
from interplab.circuits.summary import cell_labels, position_labels, write_patch_report
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run

KIND = "patch"
"""The command, as recorded in config.json and metrics.json."""


def run_patch(cfg: PatchConfig, *, model: HookedModel | None = None, progress: bool = True) -> JSONDict:
    """Patch every node of the sweep, write the run folder, return the metrics (a complete run is not redone)."""
    cfg.validate()
    receivers = parse_receivers(cfg.receivers) if cfg.receivers else []
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        batch = load_pairs(model, cfg.prompts, cfg.n_pairs, cfg.seed)
        check_receivers(model, receivers)
        result = measure(cfg, model, batch, receivers, progress)
        labels = position_labels(model, batch.clean[0])
        for name, grid in result["grids"].items():
            effects = Effects(*(np.array(grid[k], dtype=float) for k in ("mean", "sem", "null_mean", "null_sem")),
                              np.array(grid["within_noise"]))
            title = f"{cfg.sweep} patching ({cfg.direction}, {cfg.metric}): {name}"
            result["figures"][name] = effect_heatmap(effects, tuple(grid["axes"]), title, run.figure(name), labels)
        for name, agreed in result.get("agreement", {}).items():
            means = [torch.tensor(np.array(table[name]["mean"], dtype=float)) for table in
                     (result["grids"], result["attribution"])]
            result["figures"][f"agreement_{name}"] = agreement_scatter(
                *means, Agreement(**agreed), run.figure(f"agreement_{name}"),
                title=f"{name}: activation vs attribution patching")
        write_patch_report(run.path("report.md"), result)
        run.write_metrics(result)
        return {"kind": KIND, **result}


@torch.no_grad()
def baseline_metric(model: HookedModel, batch: PairBatch, metric_name: str, batch_size: int
                    ) -> tuple[PairMetric, Baseline]:
    """The metric for these pairs and its values on the unpatched clean and corrupted runs."""
    def last_logits(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.forward(tokens[i:i + batch_size])[:, -1:].float().cpu()
                          for i in range(0, tokens.shape[0], batch_size)])

    clean, corrupted = last_logits(batch.clean), last_logits(batch.corrupted)
    metric = make_metric(metric_name, MetricTargets(batch.answer, batch.wrong, clean[:, -1]))
    return metric, Baseline(metric(clean), metric(corrupted))


def baseline_json(baseline: Baseline) -> JSONDict:
    """The clean and corrupted means, their gap with its SEM over pairs, and whether the gap stands out of it (if
    not, the model hardly tells the prompts apart and every normalised effect is noise over a tiny denominator)."""
    gap_sem = float(mean_sem(baseline.clean - baseline.corrupted)[1])
    return {"clean_mean": float(baseline.clean.mean()), "corrupted_mean": float(baseline.corrupted.mean()),
            "gap": baseline.gap, "gap_sem": gap_sem, "gap_reliable": abs(baseline.gap) >= 2 * gap_sem}


def measure(cfg: PatchConfig, model: HookedModel, batch: PairBatch, receivers: list[Receiver], progress: bool
            ) -> JSONDict:
    """Every effect of the sweep (normalised, with its null), attribution estimates and their agreement."""
    metric, baseline = baseline_metric(model, batch, cfg.metric, cfg.batch_size)
    runs = direction_runs(cfg.direction, batch.clean, batch.corrupted)
    null_runs = Runs(batch.clean, batch.null)
    result: JSONDict = {
        "config": asdict(cfg), "model": model.info.to_dict(),
        "n_pairs": int(batch.clean.shape[0]), "n_pos": int(batch.clean.shape[1]),
        "accuracy": clean_accuracy(model, batch),
        "baseline": baseline_json(baseline),
        "grids": {}, "figures": {}, "seconds": {}}
    kwargs = dict(batch_size=cfg.batch_size, progress=progress)
    if cfg.sweep == "path":
        start = time.perf_counter()
        effect = normalise(path_patch(model, runs, receivers, metric, **kwargs), baseline)
        null = null_effect(path_patch(model, null_runs, receivers, metric, **kwargs), baseline)
        result["seconds"]["path"] = time.perf_counter() - start
        result["receivers"] = [f"{l}.{h}:{w}" for l, h, w in receivers] or ["logits"]
        result["grids"]["path"] = summarise(effect, null).to_json(("layer", "head"))
        return result
    grids = sweep_grids(model.info, cfg.sweep, batch.clean.shape[1])
    activation: dict[str, torch.Tensor] = {}
    if cfg.method in ("activation", "both"):
        start = time.perf_counter()
        activation = activation_patch(model, runs, grids, metric, **kwargs)
        result["seconds"]["activation"] = time.perf_counter() - start
        nulls = activation_patch(model, null_runs, grids, metric, **kwargs)
        result["seconds"]["null"] = time.perf_counter() - start - result["seconds"]["activation"]
    if cfg.method in ("attribution", "both"):
        start = time.perf_counter()
        estimates = attribution_patch(model, runs.target, runs.source, grids, metric, grad_drop=cfg.grad_drop)
        result["seconds"]["attribution"] = time.perf_counter() - start
        if not activation:  # attribution only: its null is estimated the same way
            nulls = attribution_patch(model, null_runs.target, null_runs.source, grids, metric,
                                      grad_drop=cfg.grad_drop)
        result["attribution"] = {}
        for grid in grids:
            est = normalise(estimates[grid.name], baseline)
            result["attribution"][grid.name] = {"mean": est.mean(0).tolist(), "axes": list(grid.axes)}
    for grid in grids:
        main = activation[grid.name] if activation else estimates[grid.name]
        effects = summarise(normalise(main, baseline), null_effect(nulls[grid.name], baseline))
        result["grids"][grid.name] = effects.to_json(grid.axes)
    if activation and "attribution" in result:
        result["agreement"] = {
            grid.name: agreement(normalise(activation[grid.name], baseline).mean(0),
                                 normalise(estimates[grid.name], baseline).mean(0),
                                 cell_labels(list(grid.axes), grid.shape))._asdict()
            for grid in grids}
    return result



def format_summary(result: JSONDict) -> str:
    """Baselines, then per grid how many nodes are outside noise and the largest effect; the agreement if any."""
    base = result["baseline"]
    lines = [f"clean {base['clean_mean']:.4f}, corrupted {base['corrupted_mean']:.4f} ({result['n_pairs']} pairs)"]
    if not base["gap_reliable"]:
        lines.append(f"warning: the clean − corrupted gap {base['gap']:.4f} is within 2 SEM ({base['gap_sem']:.4f}): "
                     "the model hardly tells these prompts apart, so normalised effects are unreliable")
    for name, grid in result["grids"].items():
        mean = np.array(grid["mean"], dtype=float)
        best = int(np.nanargmax(np.abs(mean))) if np.isfinite(mean).any() else 0
        label = cell_labels(grid["axes"], mean.shape)[best]
        lines.append(f"{name}: {grid['n_outside_noise']} of {mean.size} nodes outside noise; largest {label} "
                     f"{mean.ravel()[best]:+.3f}")
    for name, agreed in result.get("agreement", {}).items():
        lines.append(f"{name}: attribution vs activation Spearman {agreed['spearman']:.3f}, top-{agreed['k']} "
                     f"overlap {agreed['top_k_overlap']:.2f}")
    return "\n".join(lines)
