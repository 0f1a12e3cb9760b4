"""`interplab synth bench`: every SAE architecture trained on planted-feature generators, scored against the truth.

For each generator spec and architecture, one `train` call trains the sweep (widths × sparsity settings) on the
generator's stream (synthetic mode, identical batches for every SAE of the sweep). Each saved SAE is then scored on a
held-out sample drawn with a seed the training stream never uses:

    sparse    score_with_controls against the planted features: MMCS both ways, recovery at cos ≥ 0.9, Hungarian
              matching with F1 and correlation; the same for a random dictionary and PCA directions (controls)
    animals   the same against BOTH ontologies (animals + independent, attributes + independent), and which one the
              SAE is closer to (higher MMCS true→learned)

Outputs in OUT: bench.json (every row and the summary), bench.md (the table), runs/ (the trained SAEs; an
interrupted bench resumes, finished runs are not retrained).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from interplab.errors import InterplabError

ARCH_SPARSITY = {"relu": "l1_coefficient", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coefficient",
                 "matryoshka": "k"}
"""The sweep field that sets each architecture's sparsity."""
EVAL_SEED_OFFSET = 1_000_003
"""The held-out sample is drawn with seed + this: a generator the training stream (seeded by batch index) never uses."""


@dataclass
class SynthBenchConfig:
    """Train every SAE architecture on planted-feature generators and score each against the planted truth."""

    generators: list[str] = field(default_factory=lambda: ["sparse", "animals"])
    """Generator specs, comma-separated (sparse, animals, or with settings: sparse:mean_active=10)."""
    archs: list[str] = field(default_factory=lambda: list(ARCH_SPARSITY))
    """Architectures to train: relu, topk, batchtopk, jumprelu, matryoshka."""
    expansion: list[int] = field(default_factory=lambda: [4])
    """Dictionary widths as multiples of the data dimension d (e.g. 2,4,8 for a width sweep; each width costs time).
    4 is 1,024 latents for the default generators: twice the 512 planted features of `sparse`."""
    k: list[int] = field(default_factory=lambda: [5, 10])
    """topk/batchtopk/matryoshka: active latents per sample (the default generator has 5 features active on average)."""
    l1_coefficient: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """relu: L1 coefficients."""
    l0_coefficient: list[float] = field(default_factory=lambda: [0.3, 1.0])
    """jumprelu: L0 coefficients."""
    tokens: int = 1_000_000
    """Training samples per SAE (ReLU/L1 at 4x reaches MMCS 0.99 on the default sparse generator by 1M; TopK is
    still improving at 4M)."""
    batch_size: int = 256
    """Samples per training step (more, smaller steps learn these features faster than batches of 1024)."""
    lr: float = 3e-3
    """Adam learning rate."""
    eval_samples: int = 8192
    """Held-out samples each SAE is scored on."""
    threshold: float = 0.9
    """Cosine at which a planted feature counts as recovered."""
    quick: bool = False
    """A seconds-long smoke version (small generators, one width and sparsity, 20k samples): for CI, not for figures."""
    out: str = "synth-bench"
    """Output folder: bench.json, bench.md, runs/."""
    seed: int = 0
    """Seed of the generators, the training runs and the held-out sample."""
    device: str | None = None
    """Device to train on (default: cuda if available, else cpu)."""

    def resolved(self) -> "SynthBenchConfig":
        """The settings actually run: `quick` shrinks everything."""
        if not self.quick:
            return self
        small = {"sparse": "sparse:n_features=64,d=32,mean_active=3",
                 "animals": "animals:n_animals=60,n_attributes=12,attributes_per_animal=3,n_independent=16,d=48"}
        return SynthBenchConfig(**{**asdict(self), "generators": [small.get(g, g) for g in self.generators],
                                   "expansion": self.expansion[:1], "k": self.k[:1],
                                   "l1_coefficient": self.l1_coefficient[:1], "l0_coefficient": self.l0_coefficient[:1],
                                   "tokens": min(self.tokens, 20_000), "batch_size": min(self.batch_size, 256),
                                   "eval_samples": min(self.eval_samples, 1024), "quick": False})

    def validate(self) -> None:
        unknown = [a for a in self.archs if a not in ARCH_SPARSITY]
        if unknown:
            raise InterplabError(f"unknown --archs {unknown}; valid: {', '.join(ARCH_SPARSITY)}")
        if not self.generators or not self.archs:
            raise InterplabError("--generators and --archs each need at least one value")
        if self.tokens < self.batch_size or self.eval_samples < 2:
            raise InterplabError(f"--tokens ({self.tokens}) must hold one --batch-size ({self.batch_size}) and "
                                 f"--eval-samples ({self.eval_samples}) must be >= 2")


def _train_config(cfg: SynthBenchConfig, spec: str, arch: str, out: str) -> Any:
    from interplab.sae.train_config import TrainConfig

    sparsity = ARCH_SPARSITY[arch]
    sweep = {name: getattr(cfg, name)[:1] for name in ("k", "l1_coefficient", "l0_coefficient")}
    sweep[sparsity] = getattr(cfg, sparsity)
    return TrainConfig(synthetic=spec, arch=arch, expansion=list(cfg.expansion), **sweep, tokens=cfg.tokens,
                       batch_size=cfg.batch_size, lr=cfg.lr, out=out, seed=cfg.seed, device=cfg.device,
                       checkpoint_every=0, resume=True)


def _held_out(gen: Any, n: int, seed: int) -> Any:
    return gen.sample(n, torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))


@torch.no_grad()
def _score(sae: Any, gen: Any, batch: Any, threshold: float, seed: int) -> list[dict[str, Any]]:
    """One row per ontology (one for `sparse`): the SAE's scores beside the random and PCA controls."""
    from interplab.synth.score import score_with_controls

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
        rows.append({"ontology": ontology, **common, **scores})
    return rows


def run_bench(cfg: SynthBenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train and score every (generator, arch, width, sparsity); write OUT/bench.json and OUT/bench.md."""
    import time

    from interplab.fileio import write_url_atomic
    from interplab.sae import load_sae
    from interplab.sae.trainer import train
    from interplab.synth.specs import make_generator

    cfg = cfg.resolved()
    cfg.validate()
    gens = {spec: make_generator(spec) for spec in cfg.generators}  # bad specs fail before any training
    root = cfg.out.rstrip("/")
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for spec, gen in gens.items():
        batch = _held_out(gen, cfg.eval_samples, cfg.seed)
        for arch in cfg.archs:
            run = f"{root}/runs/{spec.replace(':', '_').replace(',', '_').replace('=', '')}-{arch}"
            result = train(_train_config(cfg, spec, arch, run), progress=progress)
            for name in result.names:
                sae = load_sae(f"{run}/{name}").float().eval()
                for row in _score(sae, gen, batch, cfg.threshold, cfg.seed):
                    rows.append({"generator": spec, "arch": arch, "sae": name, "d_sae": sae.cfg.d_sae, **row})
    result = {"config": asdict(cfg), "rows": rows, "summary": summarise(rows),
              "wall_s": time.perf_counter() - start}
    write_url_atomic(f"{root}/bench.json", (json.dumps(result, indent=2) + "\n").encode())
    write_url_atomic(f"{root}/bench.md", (format_table(result) + "\n").encode())
    return result


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
            by_sae.setdefault((r["generator"], r["sae"], r["arch"]), {})[r["ontology"]] = r["learned"]["mmcs_true"]
    for (spec, _, arch), m in by_sae.items():
        if len(m) == 2:
            counts = closer.setdefault(f"{spec}/{arch}", {"animals": 0, "attributes": 0})
            counts[max(m, key=m.__getitem__)] += 1
    return {"best": best, "closer_ontology": closer}


def format_table(result: dict[str, Any]) -> str:
    """The bench as a Markdown table, one row per (SAE, ontology), controls in the last columns."""
    def f(v: Any, fmt: str = ".3f") -> str:
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
        lines.append(f"{key}: closer to animals in {c['animals']} SAE(s), to attributes in {c['attributes']}")
    return "\n".join(lines)


@dataclass
class SynthScoreConfig:
    """Score saved SAEs against a generator's planted truth, beside random and PCA controls."""

    sae: list[str] = field(default_factory=list)
    """SAE folders (comma-separated), e.g. trained by `sae train` on a store harvested from a planted model."""
    generator: str = "sparse"
    """The truth: a generator spec (sparse:mean_active=5) or a planted-model folder (its generator is read)."""
    samples: int = 8192
    """Held-out samples drawn from the generator to score codes and controls on."""
    threshold: float = 0.9
    """Cosine at which a planted feature counts as recovered."""
    seed: int = 0
    """Seed of the held-out sample (offset so that no training stream uses it) and of the random control."""


def generator_of(spec_or_folder: str) -> tuple[str, Any]:
    """(spec, generator) from a generator spec or from a planted-model folder's config.json."""
    from pathlib import Path

    from interplab.models.load import PLANTED_MARKER
    from interplab.synth.specs import make_generator

    config_file = Path(spec_or_folder) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("interplab_model") != PLANTED_MARKER:
            raise InterplabError(f"{spec_or_folder} is not a planted model (written by `interplab synth model`), "
                                 "so it names no generator; pass a generator spec such as sparse:mean_active=5")
        spec_or_folder = config["config"]["generator"]
    return spec_or_folder, make_generator(spec_or_folder)


def score_saved(cfg: SynthScoreConfig) -> list[dict[str, Any]]:
    """One row per (SAE, ontology), as in `synth bench`."""
    from interplab.sae import load_sae

    if not cfg.sae:
        raise InterplabError("--sae needs at least one SAE folder")
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
