"""SPD on TMS 5-2 and 40-10 (and APD on 5-2) against the papers' known answers, on this CPU.

    python benchmarks/decompose.py [--root DIR] [--seeds 3] [--seeds-40-10 1] [--apd-seeds 1] [--id] [--workers 2]

Runs SPD on TMS 40-10 and on TMS 5-2 (3 seeds, seed 0 with the random-model control), SPD on TMS 5-2+ID, APD on
TMS 5-2 and 5-2+ID; --id adds SPD on TMS 40-10+ID (long).

Targets (Bushnaq et al. 2025, Table 1; Braun et al. 2025, §3.1): SPD MMCS ≥ 0.999 and |ML2R − 1| ≤ 0.03 on the
embedding matrix W (`linear1`) of TMS 5-2 and 40-10; APD on TMS 5-2 MMCS ≈ 0.998 with ML2R ≈ 0.89 (shrinkage).
Controls: the same SPD on a re-initialised TMS of the same shape, scored against the trained model's columns, and a
random rank-1 basis. In 2 dimensions MMCS hardly separates anything from chance (any 5 directions in a plane lie
near the 5 columns), so the JSON also carries, for the trained model and the random-model control alike: ML2R, live
subcomponents against the true count, and the output MSE with only the important subcomponents kept / ablated
(relative to the target's own output MSE against 0).

Every run is an `interplab decompose` run folder under --root (a rerun reports finished ones); runs go to a pool of
--workers processes with one torch thread each. Settings: interplab.decompose.presets (a shortened CPU schedule;
the paper's is 40k steps of 4096). Reports wall time, the CPU time of every process, and the load average (the
CPU is shared). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from interplab.decompose.configs import DecomposeConfig
from interplab.decompose.figures import seed_spread
from interplab.decompose.run import run_decompose

Job = tuple[str, str, int, bool]
"""(toy, method, seed, with controls)."""


def one(root: str, job: Job) -> dict:
    """Run (or report) one decomposition in a worker process (one torch thread); return its metrics."""
    torch.set_num_threads(1)
    toy, method, seed, controls = job
    cfg = DecomposeConfig(toy=toy, method=method, seed=seed, controls=controls, progress=False,
                          out=str(Path(root) / f"{toy}-{method}-s{seed}"))
    start = time.perf_counter()
    metrics = run_decompose(cfg)
    metrics["bench_wall_s"] = time.perf_counter() - start
    return metrics


def describe(job: Job, metrics: dict) -> str:
    """One line per run: the headline scores, live counts, controls, time."""
    toy, method, seed, _ = job
    layer = metrics["scores"]["layers"]["linear1"]
    live = {name: v["live"] for name, v in metrics["scores"]["layers"].items()}
    line = (f"{method} {toy} seed {seed}: MMCS {layer['mmcs']:.4f} ML2R {layer['ml2r']:.4f} live {live} "
            f"(true {metrics['true_counts']}) random-basis MMCS {layer['random_basis_mmcs']:.4f}")
    if "random_model" in metrics:
        rm = metrics["random_model"]["layers"]["linear1"]
        line += f" | random model: MMCS {rm['mmcs']:.4f} ML2R {rm['ml2r']:.4f} live {rm['live']}"
    return line + f" [{metrics['bench_wall_s']:.0f} s wall]"


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f} (n={len(values)}, min {min(values):.4f})"


def relative_losses(scores: dict) -> dict[str, float]:
    """Output MSE with only the important subcomponents kept / ablated, over the target's own MSE against 0."""
    losses = scores["losses"]
    scale = losses["target_vs_zero"] or float("nan")
    return {"kept": round(losses["kept"] / scale, 4), "ablated": round(losses["ablated"] / scale, 4)}


def control_summary(metrics: dict, prefix: str) -> dict[str, object]:
    """The numbers that separate a decomposition of the trained model from chance."""
    layer = metrics["scores"]["layers"]["linear1"]
    rel = relative_losses(metrics["scores"])
    return {f"{prefix}mmcs": round(layer["mmcs"], 4), f"{prefix}ml2r": round(layer["ml2r"], 4),
            f"{prefix}live": {k: v["live"] for k, v in metrics["scores"]["layers"].items()},
            f"{prefix}kept_rel_mse": rel["kept"], f"{prefix}ablated_rel_mse": rel["ablated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="folder of the run folders (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, default=3, help="SPD seeds on TMS 5-2")
    parser.add_argument("--seeds-40-10", type=int, default=1, help="SPD seeds on TMS 40-10")
    parser.add_argument("--apd-seeds", type=int, default=1, help="APD seeds on TMS 5-2")
    parser.add_argument("--id", action="store_true", help="also SPD on TMS 40-10+ID (5-2+ID, SPD and APD, always run)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one torch thread each)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="decompose-bench-"))
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"{args.workers} workers x 1 torch thread, {os.cpu_count()} CPUs, load {load_before:.1f}; runs in {root}",
          flush=True)

    plan: list[Job] = [("tms-40-10", "spd", s, False) for s in range(args.seeds_40_10)]   # the longest first
    plan += [("tms-5-2", "spd", s, s == 0) for s in range(args.seeds)]
    plan += [("tms-5-2", "apd", s, False) for s in range(args.apd_seeds)]
    plan += [("tms-5-2-id", "spd", 0, False), ("tms-5-2-id", "apd", 0, False)]
    if args.id:
        plan.insert(1, ("tms-40-10-id", "spd", 0, False))
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [(job, pool.submit(one, str(root), job)) for job in plan]
        done = [(job, future.result()) for job, future in futures]
    results: dict[str, list[dict]] = {}
    rows: list[dict] = []
    for job, metrics in done:
        print(describe(job, metrics), flush=True)
        toy, method = job[0], job[1]
        results.setdefault(f"{method} {toy}", []).append(metrics)
        layer = metrics["scores"]["layers"]["linear1"]
        rows.append({"label": f"{method} {toy}", "mmcs": layer["mmcs"], "ml2r": layer["ml2r"]})
        if "random_model" in metrics:
            rm = metrics["random_model"]["layers"]["linear1"]
            rows.append({"label": f"random model {toy}", "mmcs": rm["mmcs"], "ml2r": rm["ml2r"]})
        rows.append({"label": f"random basis {toy}", "mmcs": layer["random_basis_mmcs"],
                     "ml2r": layer["random_basis_ml2r"]})
    figure = seed_spread(rows, str(root / "seed_spread.png"))

    def values(key: str, field: str) -> list[float]:
        return [m["scores"]["layers"]["linear1"][field] for m in results.get(key, [])]

    def stat(key: str, field: str) -> float:
        found = values(key, field)
        return round(statistics.mean(found), 4) if found else float("nan")

    for key in results:
        print(f"{key}: MMCS {spread(values(key, 'mmcs'))}, ML2R {spread(values(key, 'ml2r'))}", flush=True)
    print(f"figure: {figure}", flush=True)
    ok = [m for m in results.get("spd tms-5-2", []) if "random_model" in m]
    report: dict[str, object] = {
        "bench": "decompose",
        "tms_5_2_mmcs": stat("spd tms-5-2", "mmcs"), "tms_5_2_ml2r": stat("spd tms-5-2", "ml2r"),
        "tms_40_10_mmcs": stat("spd tms-40-10", "mmcs"), "tms_40_10_ml2r": stat("spd tms-40-10", "ml2r"),
        "apd_tms_5_2_mmcs": stat("apd tms-5-2", "mmcs"), "apd_tms_5_2_ml2r": stat("apd tms-5-2", "ml2r"),
        "random_model_mmcs": round(ok[0]["random_model"]["layers"]["linear1"]["mmcs"], 4) if ok else float("nan"),
    }
    if ok:
        report.update(control_summary(ok[0], "tms_5_2_seed0_"))
        report.update(control_summary({"scores": ok[0]["random_model"]}, "random_model_"))
        report["control_note"] = ("MMCS barely separates in 2-D; compare ML2R, live counts and kept/ablated relative "
                                  "MSE of the trained model (tms_5_2_seed0_*) with the random-model control")
    for key in results:
        report[f"{key.replace(' ', '_').replace('-', '_')}_mmcs_per_seed"] = [round(v, 4) for v in values(key, "mmcs")]
        report[f"{key.replace(' ', '_').replace('-', '_')}_ml2r_per_seed"] = [round(v, 4) for v in values(key, "ml2r")]
    for key in ("spd tms-5-2-id", "apd tms-5-2-id", "spd tms-40-10-id", "apd tms-5-2", "spd tms-40-10"):
        if key in results:
            report[f"{key.replace(' ', '_').replace('-', '_')}_live"] = {
                name: layer["live"] for name, layer in results[key][0]["scores"]["layers"].items()}
    report["random_basis_mmcs_5_2"] = stat("spd tms-5-2", "random_basis_mmcs")
    report["random_basis_mmcs_40_10"] = stat("spd tms-40-10", "random_basis_mmcs")
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    report.update({"cpu_s": round(cpu, 1), "load_avg_start": round(load_before, 1),
                   "load_avg_end": round(os.getloadavg()[0], 1), "wall_s": round(time.perf_counter() - start, 1)})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
