"""`interplab synth tms`: the two classic toy-model-of-superposition experiments, with their numbers in JSON.

    pictures  n = 5 features in m = 2 dimensions at increasing sparsity (importance 0.9^i): from two orthogonal
              features to a pentagon; reports the represented features (‖W_i‖ > 0.5) per sparsity
    sweep     n = 200, m = 20, equal importance, sparsity log-spaced in 1/(1 − S): D* (dimensions per feature) per
              instance, the range where D* sticks near 1/2, and the clusters of D_i at 1, 3/4, 2/3, 1/2, 2/5, 3/8
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from interplab.errors import InterplabError

PARTS = ("pictures", "sweep")


@dataclass
class TMSRunConfig:
    """Toy models of superposition (Elhage et al. 2022): the n=5, m=2 pictures and the n=200, m=20 sweep."""

    parts: list[str] = field(default_factory=lambda: list(PARTS))
    """What to run, comma-separated: pictures, sweep."""
    sweep_instances: int = 24
    """Sparsity values in the n=200, m=20 sweep (1/(1−S) log-spaced from 1 to 10); about 2.5 s each on one core."""
    steps: int | None = None
    """Training steps (default: 6000 for the pictures, 3000 for the sweep)."""
    out: str = "tms"
    """Output folder: tms.json and the PNG figures."""
    seed: int = 0
    """Seed of the initialisation and the data."""
    device: str = "cpu"
    """Device to train on."""


def run_tms(cfg: TMSRunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train what `cfg.parts` names; write OUT/tms.json and the figures; return the JSON dict."""
    from interplab.fileio import write_url_atomic
    from interplab.synth.tms_figures import dimensionality_sweep, superposition_pictures
    from interplab.synth.tms import TMSConfig, dimensionality_sweep_config, train_tms
    from interplab.synth.tms_geometry import (
        FRACTION_NAMES,
        dimensions_per_feature,
        fraction_clusters,
        represented_features,
        sticky_range,
    )

    unknown = [p for p in cfg.parts if p not in PARTS]
    if unknown or not cfg.parts:
        raise InterplabError(f"--parts {cfg.parts} is not valid; choose from {', '.join(PARTS)}")
    if cfg.sweep_instances < 2:
        raise InterplabError(f"--sweep-instances must be >= 2, got {cfg.sweep_instances}")
    root = cfg.out.rstrip("/")
    steps = {} if cfg.steps is None else {"steps": cfg.steps}
    out: dict[str, Any] = {"config": asdict(cfg), "figures": {}}
    if "pictures" in cfg.parts:
        result = train_tms(replace(TMSConfig(seed=cfg.seed, device=cfg.device), **steps), progress=progress)
        out["pictures"] = {"sparsities": result.config.sparsities,
                           "represented": represented_features(result.W).tolist(),
                           "loss": result.loss.tolist(), "seconds": result.seconds}
        out["figures"]["pictures"] = superposition_pictures(result, f"{root}/tms_pictures.png")
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
        out["figures"]["sweep"] = dimensionality_sweep(result, f"{root}/tms_dimensionality.png")
    write_url_atomic(f"{root}/tms.json", (json.dumps(out, indent=2) + "\n").encode())
    return out


def format_summary(out: dict[str, Any]) -> str:
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
