"""`interplab synth tms`: the two classic toy-model-of-superposition experiments, with their numbers in JSON.

    pictures  n = 5 features in m = 2 dimensions at increasing sparsity (importance 0.9^i): from two orthogonal
              features to a pentagon; reports the represented features (‖W_i‖ > 0.5) per sparsity
    sweep     n = 200, m = 20, equal importance, sparsity log-spaced in 1/(1 − S): D* (dimensions per feature) per
              instance, the range where D* sticks near 1/2, and the clusters of D_i at 1, 3/4, 2/3, 1/2, 2/5, 3/8

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (the numbers above) and
OUT/figures/pictures.png, OUT/figures/dimensionality.png. A rerun with the same config into OUT reports the saved
numbers; another config is refused.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from interplab.runs import JSONDict, Run
from interplab.synth.configs import TMSRunConfig
from interplab.synth.tms import TMSConfig, dimensionality_sweep_config, train_tms
from interplab.synth.tms_figures import dimensionality_sweep, superposition_pictures
from interplab.synth.tms_geometry import (
    FRACTION_NAMES,
    dimensions_per_feature,
    fraction_clusters,
    represented_features,
    sticky_range,
)

KIND = "synth tms"
"""The command, as recorded in config.json and metrics.json."""


def run_tms(cfg: TMSRunConfig, *, progress: bool = True) -> JSONDict:
    """Train what `cfg.parts` names; write OUT/metrics.json and the figures; return the metrics. A complete run with
    the same config in OUT is reported as done, not retrained."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not retrain
            return run.metrics
        out = _train_parts(cfg, run, progress)
        run.write_metrics(out)
        return {"kind": KIND, **out}


def _train_parts(cfg: TMSRunConfig, run: Run, progress: bool) -> dict[str, Any]:
    """The pictures and/or the sweep, as a JSON-ready dict; their figures drawn into the run's figures/."""
    steps = {} if cfg.steps is None else {"steps": cfg.steps}
    out: dict[str, Any] = {"config": asdict(cfg), "figures": {}}
    if "pictures" in cfg.parts:
        result = train_tms(replace(TMSConfig(seed=cfg.seed, device=cfg.device), **steps), progress=progress)
        out["pictures"] = {"sparsities": result.config.sparsities,
                           "represented": represented_features(result.W).tolist(),
                           "loss": result.loss.tolist(), "seconds": result.seconds}
        out["figures"]["pictures"] = superposition_pictures(result, run.figure("pictures"))
    if "sweep" in cfg.parts:
        sweep_cfg = dimensionality_sweep_config(cfg.sweep_instances, seed=cfg.seed, device=cfg.device, **steps)
        result = train_tms(sweep_cfg, progress=progress)
        inverse_density = [1 / (1 - s) for s in sweep_cfg.sparsities]
        d_star = dimensions_per_feature(result.W).tolist()
        best: dict[str, int] = {}
        for W in result.W:   # the largest cluster at each fraction over the sweep
            clusters = fraction_clusters(W)
            for name, count in zip(FRACTION_NAMES, clusters.counts):
                best[name] = max(best.get(name, 0), int(count))
        plateau = sticky_range(inverse_density, d_star)
        out["sweep"] = {"inverse_density": inverse_density, "d_star": d_star,
                        "plateau_half": None if plateau is None else dict(zip(("first", "last", "n_points"),
                                                                              plateau)),
                        "largest_cluster": best, "seconds": result.seconds}
        out["figures"]["sweep"] = dimensionality_sweep(result, run.figure("dimensionality"))
    return out


def format_summary(out: JSONDict) -> str:
    """The few lines `interplab synth tms` prints: represented features, the D* plateau, clusters, figures."""
    lines = []
    if "pictures" in out:
        p = out["pictures"]
        lines.append("n=5, m=2: represented features per sparsity " + ", ".join(
            f"S={s:g}: {r}" for s, r in zip(p["sparsities"], p["represented"])))
    if "sweep" in out:
        s = out["sweep"]
        plateau = s["plateau_half"]
        lines.append("n=200, m=20: D* within 0.1 of 1/2 for 1/(1-S) in "
                     + (f"[{plateau['first']:.2f}, {plateau['last']:.2f}] ({plateau['n_points']} points)"
                        if plateau else "no range"))
        lines.append("largest D_i cluster per fraction: " + ", ".join(f"{k}: {v}"
                                                                    for k, v in s["largest_cluster"].items()))
    lines += [f"figure: {path}" for path in out["figures"].values()]
    return "\n".join(lines)
