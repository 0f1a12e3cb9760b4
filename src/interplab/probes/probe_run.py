"""`interplab probe`: probes for one labelled dataset at one hook, every score beside its controls.

    data        a CSV/JSONL file of texts and labels, or a built-in vocabulary dataset (`uppercase-tokens`: every
                token, labelled by whether it starts with an uppercase letter, read alone after BOS)
    activations collected once per (model, hook, position, dataset) and cached in OUT/acts/ (reused when an
                interrupted run resumes)
    methods     diff-means  difference of means, with shuffled-label and random-direction controls, and the
                            projection histogram of both classes
                logistic    L2 logistic regression with a regularisation sweep (C chosen by CV on train), same controls
                ksparse     k-sparse probing (Gurnee et al. 2023) for k = 1, 2, 4, ..., with the shuffled-label and
                            random-rotation controls, and the F1-vs-k curve

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json and OUT/figures/. Every probe is fitted
on a train split and scored on held-out examples.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.probes.configs import ProbeConfig
from interplab.probes.data import LabelledTexts, cached_activations, load_labelled, vocabulary_dataset
from interplab.probes.ksparse import ksparse_curve, ksparse_probe
from interplab.probes.linear import diff_of_means, logistic_probe, projection_histogram
from interplab.runs import JSONDict, Run

KIND = "probe"
"""The command, as recorded in config.json and metrics.json."""


def load_data(cfg: ProbeConfig, tokenizer: Any) -> LabelledTexts:
    """The labelled texts `cfg.data` names (`tokenizer`: the model's transformers tokenizer); `cfg.validate()` has
    checked that it is a built-in or a .csv/.jsonl file."""
    if cfg.data == "uppercase-tokens":
        return vocabulary_dataset(tokenizer, lambda text: text.strip()[:1].isupper())
    return load_labelled(cfg.data, text_field=cfg.text_field, label_field=cfg.label_field)


def subsample(data: LabelledTexts, max_examples: int, seed: int) -> LabelledTexts:
    """At most max_examples examples, each class cut in proportion (seeded), in their original order."""
    n = len(data.texts)
    if n <= max_examples:
        return data
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values.tolist()
    pick = lambda values: None if values is None else [values[i] for i in order]  # noqa: E731
    return LabelledTexts(pick(data.texts), pick(data.labels), positions=pick(data.positions),
                         token_ids=pick(data.token_ids))


def run_probe(cfg: ProbeConfig, *, model: HookedModel | None = None) -> JSONDict:
    """Collect (or reuse) the activations, fit every method with its controls, write OUT/metrics.json and the
    figures; return the metrics. A complete run with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        position = cfg.parsed_position()
        model = model or load_model(cfg.model, device=cfg.device)
        model.check_hook_names([cfg.hook])
        data = subsample(load_data(cfg, model.tokenizer), cfg.max_examples, cfg.seed)
        start = time.perf_counter()
        acts = cached_activations(run.path("acts"), model, data, cfg.hook, position, batch_size=cfg.batch_size)
        result: dict[str, Any] = {"config": asdict(cfg), "n_examples": len(acts.labels),
                                  "n_positive": int(acts.labels.sum()), "d": acts.acts.shape[1],
                                  "collect_s": time.perf_counter() - start, "figures": {}}
        result.update(fit_methods(cfg, acts.acts, acts.labels, run, result["figures"]))
        run.write_metrics(result)
        return {"kind": KIND, **result}


def fit_methods(cfg: ProbeConfig, acts: Float[Tensor, "n d"], labels: Int[Tensor, " n"], run: Run,
                figures: dict[str, str]) -> dict[str, Any]:
    """Every requested method on (acts, labels), with its controls, as JSON-able dicts; figures into the run's
    figures/ (their paths added to `figures`)."""
    out: dict[str, Any] = {}
    common = dict(test_fraction=cfg.test_fraction, seed=cfg.seed, n_shuffles=cfg.shuffles)
    if "diff-means" in cfg.methods:
        start = time.perf_counter()
        dom = diff_of_means(acts, labels, **common)
        out["diff_means"] = {"scores": dom.scores, "controls": _controls(dom.controls),
                             "seconds": time.perf_counter() - start}
        figures["projection_histogram"] = projection_histogram(dom, run.figure("diff_means_projection"))
    if "logistic" in cfg.methods:
        start = time.perf_counter()
        lr = logistic_probe(acts, labels, **common)
        out["logistic"] = {"C": lr.C, "scores": lr.scores, "sweep": lr.sweep, "controls": _controls(lr.controls),
                           "seconds": time.perf_counter() - start}
    if "ksparse" in cfg.methods:
        start = time.perf_counter()
        ks = ksparse_probe(acts, labels, ks=cfg.ks or None, test_fraction=cfg.test_fraction,
                           shuffles=min(cfg.shuffles, 3), seed=cfg.seed)
        out["ksparse"] = {**ks.to_json(), "seconds": time.perf_counter() - start}
        figures["ksparse_curve"] = ksparse_curve(ks, run.figure("ksparse_f1"))
    return out


def _controls(controls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{control: {metric: summary}} without the per-repeat scores."""
    return {name: {metric: {k: v for k, v in c._asdict().items() if k != "scores"} for metric, c in per.items()}
            for name, per in controls.items()}


def format_summary(result: Mapping[str, Any]) -> str:
    """A few lines for the terminal: the dataset, then each method's held-out scores beside its controls."""
    cfg = result["config"]
    lines = [f"{cfg['data']} at {cfg['hook']} ({cfg['position']}): {result['n_examples']} examples, "
             f"{result['n_positive']} positive, d = {result['d']}"]
    for name in ("diff_means", "logistic"):
        if name in result:
            s, c = result[name]["scores"], result[name]["controls"]
            ctrl = ", ".join(f"{k} {v['auc']['mean']:.3f} (max {v['auc']['max']:.3f}, p = {v['auc']['p_value']:.3g})"
                             for k, v in c.items())
            lines.append(f"{name}: held-out AUC {s['auc']:.3f}, F1 {s['f1']:.3f}, accuracy {s['accuracy']:.3f}; "
                         f"controls (AUC): {ctrl}")
    if "ksparse" in result:
        rows = result["ksparse"]["rows"]
        best = {}
        for r in rows:
            key = (r["condition"], r["method"], r["k"])
            best.setdefault(key, []).append(r["f1"])
        for method in result["ksparse"]["methods"]:
            curve = [(k, sum(best[("plain", method, k)]) / len(best[("plain", method, k)]))
                     for k in result["ksparse"]["ks"] if ("plain", method, k) in best]
            lines.append(f"ksparse {method}: F1 " + ", ".join(f"k={k}: {f:.3f}" for k, f in curve))
        for condition in ("rotated", "shuffled"):
            curve = [(k, sum(v) / len(v)) for (c, m, k), v in best.items() if c == condition and m == "mean_diff"]
            if curve:
                lines.append(f"  control {condition} (mean_diff): " + ", ".join(f"k={k}: {f:.3f}" for k, f in curve))
    lines += [f"figure: {p}" for p in result["figures"].values()]
    return "\n".join(lines)
