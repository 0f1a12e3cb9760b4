"""`interplab synth bench`: every SAE architecture trained on planted-feature generators, scored against the truth.

For each generator spec and architecture, one `train` call trains the sweep (widths × sparsity settings) on the
generator's stream (synthetic mode, identical batches for every SAE of the sweep). Each saved SAE is then scored on a
held-out sample drawn with a seed the training stream never uses:

    sparse    score_with_controls against the planted features: MMCS both ways, recovery at cos ≥ 0.9, Hungarian
              matching with F1 and correlation; the same for a random dictionary and PCA directions (controls)
    animals   the same against BOTH ontologies (animals + independent, attributes + independent), MMCS and recovery
              over each ontology's own features alone, and which one the SAE is closer to (higher own MMCS)

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (every row and the summary), OUT/bench.md
(the table), OUT/figures/mmcs_vs_l0.png and OUT/runs/ (the trained SAEs). An interrupted bench rerun with the same
config resumes: finished SAEs are not retrained. A complete one is reported, not recomputed; another config is
refused.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.runs import JSONDict, Run
from interplab.sae.base import SparseAutoencoder
from interplab.sae.files import load_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train
from interplab.synth.configs import ARCH_SPARSITY, SynthBenchConfig, SynthScoreConfig
from interplab.synth.figures import synth_scores
from interplab.synth.planted import read_planted_config
from interplab.synth.animals import Animals
from interplab.synth.score import max_cosines, score_with_controls
from interplab.synth.sources import synthetic_source
from interplab.synth.specs import Batch, Generator, make_generator

KIND = "synth bench"
"""The command, as recorded in config.json and metrics.json."""
EVAL_SEED_OFFSET = 1_000_003
"""The held-out sample is drawn with seed + this: a generator the training stream (seeded by batch index) never uses."""


def _train_config(cfg: SynthBenchConfig, spec: str, arch: str, out: str) -> TrainConfig:
    sparsity = ARCH_SPARSITY[arch]
    sweep = {name: getattr(cfg, name)[:1] for name in ("k", "l1_coefficient", "l0_coefficient")}
    sweep[sparsity] = getattr(cfg, sparsity)
    return TrainConfig(synthetic=spec, arch=arch, expansion=list(cfg.expansion), **sweep, tokens=cfg.tokens,
                       batch_size=cfg.batch_size, lr=cfg.lr, out=out, seed=cfg.seed, device=cfg.device,
                       checkpoint_every=0, resume=True)


def _held_out(gen: Generator, n: int, seed: int) -> Batch:
    return gen.sample(n, torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))


@torch.no_grad()
def _score(
    sae: SparseAutoencoder, gen: Generator, batch: Batch, threshold: float, seed: int
) -> list[dict[str, Any]]:
    """One row per ontology (one for `sparse`): the SAE's scores beside the random and PCA controls."""
    x = batch.x.float()
    codes = sae.encode(x)
    recon = sae.decode(codes)
    common = {"l0": float((codes != 0).sum(1).float().mean()),
              "fvu": float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())}
    truths = ({o: gen.truth(batch, o) for o in ("animals", "attributes")} if hasattr(gen, "truth")
              else {"features": (gen.features, batch.coeffs)})
    rows = []
    for ontology, (dictionary, coeffs) in truths.items():
        scores = score_with_controls(sae.W_dec, dictionary, x, codes=codes, coeffs=coeffs, threshold=threshold,
                                     seed=seed)
        rows.append({"ontology": ontology, **common, **scores, **_own_scores(sae, gen, ontology, threshold)})
    return rows


def _own_scores(sae: SparseAutoencoder, gen: Generator, ontology: str, threshold: float) -> dict[str, float]:
    """animals: MMCS and recovery over the ontology's own features alone (its animals or its attributes), leaving
    out the independent features both share, which otherwise dominate the 50 + 100 rows of the attribute truth."""
    if not isinstance(gen, Animals):
        return {}
    own = gen.animal_directions if ontology == "animals" else gen.attribute_directions
    best = max_cosines(sae.W_dec, own).true_max
    return {"own_mmcs": float(best.mean()), "own_recovery": float((best >= threshold).float().mean())}


def run_bench(cfg: SynthBenchConfig, *, progress: bool = True) -> JSONDict:
    """Train and score every (generator, arch, width, sparsity); write OUT/metrics.json, OUT/bench.md and
    OUT/figures/mmcs_vs_l0.png; return the metrics ({"kind", "config", "rows", "summary", "wall_s", "figures"}).

    A complete run with the same config in OUT is reported as done; a partial one resumes (each SAE sweep in
    OUT/runs/ resumes, finished SAEs are loaded, not retrained, and every SAE is scored again)."""
    cfg = cfg.resolved()
    cfg.validate()
    gens = {spec: make_generator(spec) for spec in cfg.generators}  # bad specs fail before --out is touched
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        start = time.perf_counter()
        rows = _train_and_score(cfg, gens, run, progress)
        result: dict[str, Any] = {"config": asdict(cfg), "rows": rows, "summary": summarise(rows),
                                  "wall_s": time.perf_counter() - start,
                                  "figures": {"mmcs_vs_l0": synth_scores(rows, run.figure("mmcs_vs_l0"))}}
        write_url_atomic(run.path("bench.md"), (format_table(result) + "\n").encode())
        run.write_metrics(result)
        return {"kind": KIND, **result}


def _train_and_score(cfg: SynthBenchConfig, gens: dict[str, Generator], run: Run, progress: bool
                     ) -> list[dict[str, Any]]:
    """One row per (generator, arch, SAE, ontology); each (generator, arch) sweep trains into OUT/runs/NAME."""
    rows: list[dict[str, Any]] = []
    for spec, gen in gens.items():
        batch = _held_out(gen, cfg.eval_samples, cfg.seed)
        for arch in cfg.archs:
            folder = run.path(f"runs/{spec.replace(':', '_').replace(',', '_').replace('=', '')}-{arch}")
            train_cfg = _train_config(cfg, spec, arch, folder)
            trained = train(train_cfg, source=synthetic_source(train_cfg), progress=progress)
            for name in trained.names:
                sae = load_sae(f"{folder}/{name}").float().eval()
                for row in _score(sae, gen, batch, cfg.threshold, cfg.seed):
                    rows.append({"generator": spec, "arch": arch, "sae": name, "d_sae": sae.cfg.d_sae, **row})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (generator, ontology): the best SAE by MMCS (true → learned) and its controls' MMCS."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = f"{r['generator']}/{r['ontology']}"
        if key not in best or r["learned"]["mmcs_true"] > best[key]["mmcs"]:
            best[key] = {"arch": r["arch"], "sae": r["sae"], "mmcs": r["learned"]["mmcs_true"],
                         "recovery": r["learned"]["recovery"], "l0": r["l0"],
                         "random_mmcs": r["random"]["mmcs_true"], "pca_mmcs": r["pca"]["mmcs_true"]}
    closer: dict[str, dict[str, int]] = {}
    by_sae: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["ontology"] in ("animals", "attributes"):
            by_sae.setdefault((r["generator"], r["sae"], r["arch"]), {})[r["ontology"]] = r.get(
                "own_mmcs", r["learned"]["mmcs_true"])
    for (spec, _, arch), m in by_sae.items():
        if len(m) == 2:
            counts = closer.setdefault(f"{spec}/{arch}", {"animals": 0, "attributes": 0})
            counts[max(m, key=m.__getitem__)] += 1
    return {"best": best, "closer_ontology": closer}


def format_table(result: dict[str, Any]) -> str:
    """The bench as a Markdown table, one row per (SAE, ontology), controls in the last columns."""
    def f(v: float | None, fmt: str = ".3f") -> str:
        return "–" if v is None else format(v, fmt)

    head = ["generator", "truth", "arch", "SAE", "L0", "FVU", "MMCS true→SAE", "MMCS SAE→true",
            f"recovery@{result['config']['threshold']:g}", "F1", "corr", "random MMCS", "PCA MMCS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        s = r["learned"]
        lines.append("| " + " | ".join([r["generator"], r["ontology"], r["arch"], r["sae"], f(r["l0"], ".1f"),
                                        f(r["fvu"]), f(s["mmcs_true"]), f(s["mmcs_learned"]), f(s["recovery"]),
                                        f(s.get("f1")), f(s.get("correlation")), f(r["random"]["mmcs_true"]),
                                        f(r["pca"]["mmcs_true"])]) + " |")
    lines.append("")
    for key, b in result["summary"]["best"].items():
        lines.append(f"best on {key}: {b['arch']} {b['sae']} MMCS {b['mmcs']:.3f}, recovery {b['recovery']:.1%} "
                     f"(random {b['random_mmcs']:.3f}, PCA {b['pca_mmcs']:.3f})")
    for key, c in result["summary"]["closer_ontology"].items():
        lines.append(f"{key}: closer to animals in {c['animals']} SAE(s), to attributes in {c['attributes']} "
                     "(MMCS over each ontology's own features, the shared independent ones left out)")
    for r in result["rows"]:
        if "own_mmcs" in r:
            lines.append(f"{r['generator']} {r['sae']} vs {r['ontology']} alone: MMCS {r['own_mmcs']:.3f}, "
                         f"recovery {r['own_recovery']:.1%}")
    return "\n".join(lines)


def generator_of(spec_or_folder: str) -> tuple[str, Generator]:
    """(spec, generator) from a generator spec or from a planted-model folder's config.json."""
    if (Path(spec_or_folder) / "config.json").is_file():
        spec_or_folder = read_planted_config(spec_or_folder).generator
    return spec_or_folder, make_generator(spec_or_folder)


def score_saved(cfg: SynthScoreConfig) -> list[dict[str, Any]]:
    """One row per (SAE, ontology), as in `synth bench`."""
    cfg.validate()
    spec, gen = generator_of(cfg.generator)
    batch = _held_out(gen, cfg.samples, cfg.seed)
    rows = []
    for path in cfg.sae:
        sae = load_sae(path).float().eval()
        if sae.cfg.d_in != gen.d:
            raise InterplabError(f"SAE {path} reads {sae.cfg.d_in}-dimensional activations but generator {spec} "
                                 f"makes {gen.d}-dimensional samples")
        for row in _score(sae, gen, batch, cfg.threshold, cfg.seed):
            rows.append({"generator": spec, "arch": sae.cfg.arch, "sae": path, "d_sae": sae.cfg.d_sae, **row})
    return rows
