"""`interplab decompose`: SPD (or APD) on a ground-truth toy, scored against the truth beside its controls.

Writes the run folder (interplab.runs): OUT/config.json; OUT/target/ (the trained toy, so a resume decomposes the
same weights); OUT/checkpoints/{main,random-model}.pt (resumable); OUT/metrics.json (every score, see
interplab.decompose.evaluate); OUT/figures/ (importance matrices, max cosines); OUT/report.md.

Controls: (1) the same decomposition of a randomly re-initialised model of the same shape (every module's
reset_parameters with a fixed seed), scored against the *trained* model's mechanisms: what a decomposition unrelated
to them scores; (2) a random rank-1 basis of the same size (in evaluate.score).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from interplab.decompose.apd import run_apd
from interplab.decompose.components import check_masks_apply, make_components, target_modules
from interplab.decompose.configs import DecomposeConfig
from interplab.decompose.evaluate import score
from interplab.decompose.figures import importance_matrices, max_cosines
from interplab.decompose.lm import LMTarget, load_lm_target
from interplab.decompose.presets import Settings, resolve
from interplab.decompose.report import write_report
from interplab.decompose.spd import Decomposition, run_spd
from interplab.decompose.toys import TOYS
from interplab.decompose.truth import GroundTruthModel, ToyRequest
from interplab.errors import InterplabError
from interplab.runs import JSONDict, Run

KIND = "decompose"
"""The command, as recorded in config.json and metrics.json."""
RANDOM_SEED_OFFSET = 7919
"""The random-model control is re-initialised with seed + this."""


@dataclass
class ReinitTruth:
    """A ground-truth model with its network re-initialised (same shape and inputs, the trained truth kept)."""

    base: GroundTruthModel
    model: nn.Module

    @property
    def name(self) -> str:
        return self.base.name + "-random"

    @property
    def targets(self) -> list[str]:
        return self.base.targets

    @property
    def output_loss(self) -> str:
        return getattr(self.base, "output_loss", "mse")

    def sample(self, batch: int, gen: torch.Generator) -> Tensor:
        return self.base.sample(batch, gen)

    def true_components(self) -> dict[str, Tensor]:
        return self.base.true_components()

    def one_hot_inputs(self) -> Tensor:
        return self.base.one_hot_inputs()


def reinitialised(truth: GroundTruthModel, seed: int) -> ReinitTruth:
    """A copy of truth.model with every module's parameters reset (torch's default init, seeded)."""
    model = copy.deepcopy(truth.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return ReinitTruth(truth, model.requires_grad_(False))


def decompose(truth: GroundTruthModel, cfg: DecomposeConfig, settings: Settings, *, checkpoint: Path | None,
              desc: str) -> Decomposition:
    """Run cfg.method on `truth` with `settings` (resuming from `checkpoint` if it exists)."""
    if cfg.method == "apd":
        return run_apd(truth, settings, seed=cfg.seed, coeffs=(cfg.faithfulness, cfg.recon_coeff),
                       checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress, desc=desc)
    return run_spd(truth, settings, seed=cfg.seed, ci_hidden=cfg.ci_hidden,
                   coeffs=(cfg.faithfulness, cfg.recon_coeff, cfg.recon_layerwise_coeff),
                   warmup_steps=cfg.warmup_steps, warmup_weight_decay=cfg.warmup_weight_decay,
                   delta_component=cfg.delta_component, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every,
                   progress=cfg.progress, desc=desc)


def run_decompose(cfg: DecomposeConfig) -> JSONDict:
    """Decompose, score, draw and report (see the module docstring); a complete run in OUT is reported as is."""
    cfg.validate()
    if cfg.model is None and cfg.toy not in TOYS:
        raise InterplabError(f"--toy {cfg.toy!r} is not known; valid: {', '.join(TOYS)}")
    settings = resolve(cfg, cfg.toy or "")
    lm = None if cfg.model is None else _lm_target(cfg, settings)   # every check before anything is written
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        if run.status == "partial" and not cfg.resume:
            raise InterplabError(f"{run.out} already holds a partial run; pass --resume to continue it, or use a "
                                 "new --out")
        truth = lm if lm is not None else _build_target(cfg, Path(run.out), fresh=run.status == "new")
        metrics = _decompose_and_score(cfg, settings, truth, run)
        write_report(run, metrics)
        run.write_metrics(metrics)
        return {"kind": KIND, **metrics}


def _build_target(cfg: DecomposeConfig, out: Path, fresh: bool) -> GroundTruthModel:
    """Train (or load from OUT/target) the toy and check --layers against it; a bad layer leaves nothing behind in a
    new run."""
    try:
        truth = TOYS[cfg.toy](ToyRequest(cfg.seed, out / "target", cfg.device, cfg.progress))
        if cfg.layers:
            target_modules(truth.model, cfg.layers)
            truth.targets = list(cfg.layers)  # type: ignore[misc]
    except InterplabError:
        if fresh:
            shutil.rmtree(out / "target", ignore_errors=True)
        raise
    return truth


def _lm_target(cfg: DecomposeConfig, settings: Settings) -> LMTarget:
    """Load --model, check --layers and that its forward reaches them (one forward with all masks 1)."""
    target = load_lm_target(cfg.model or "", list(cfg.layers or []), corpus=cfg.corpus, ctx_len=cfg.ctx_len,
                            n_contexts=cfg.n_contexts, seed=cfg.seed, device=cfg.device)
    probe = make_components(target.model, target.targets, settings.C, torch.Generator(cfg.device).manual_seed(0))
    check_masks_apply(target.model, probe, target.targets, target.contexts[:1])
    return target


def _decompose_and_score(cfg: DecomposeConfig, settings: Settings, truth: GroundTruthModel, run: Run) -> JSONDict:
    checkpoints = Path(run.out) / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    main = decompose(truth, cfg, settings, checkpoint=checkpoints / "main.pt", desc=f"{cfg.method} {truth.name}")
    has_truth = getattr(truth, "has_truth", True)
    scores = score(main, truth, threshold=cfg.live_threshold, eval_batch=cfg.eval_batch, seed=cfg.seed,
                   has_truth=has_truth)
    metrics: JSONDict = {"model": truth.name, "method": cfg.method, "settings": settings._asdict(),
                         "targets": list(truth.targets),
                         "true_counts": {t: int(v.shape[0]) for t, v in truth.true_components().items()},
                         "scores": scores, "history": main.history, "figures": {}}
    series = {cfg.method: _first_max_cos(scores)}
    if cfg.controls:
        control_truth = reinitialised(truth, cfg.seed + RANDOM_SEED_OFFSET)
        control = decompose(control_truth, cfg, settings, checkpoint=checkpoints / "random-model.pt",
                            desc=f"{cfg.method} random {truth.name}")
        control_scores = score(control, control_truth, threshold=cfg.live_threshold, eval_batch=cfg.eval_batch,
                               seed=cfg.seed, has_truth=has_truth)
        metrics["random_model"] = control_scores
        series["random model"] = _first_max_cos(control_scores)
        first = scores["layers"][truth.targets[0]]  # type: ignore[index]
        if has_truth:
            series["random rank-1 basis"] = [first["random_basis_mmcs"]] * len(series[cfg.method])  # type: ignore[index]
    rows = "one feature on" if has_truth else "each token of one context"
    metrics["figures"] = {
        "importance": importance_matrices({t: layer["ci_one_hot"] for t, layer in scores["layers"].items()},
                                          run.figure("importance"), f"{cfg.method} on {truth.name}: importance "
                                          f"of each subcomponent, {rows}")}
    if has_truth:
        metrics["figures"]["max_cosines"] = max_cosines(series, run.figure("max_cosines"),  # type: ignore[index]
                                                        f"{truth.targets[0]}: best cosine per true mechanism")
    return metrics


def _first_max_cos(scores: JSONDict) -> list[float]:
    """The per-mechanism best cosines of the first target that has rank-1 truth."""
    for layer in scores["layers"].values():  # type: ignore[union-attr]
        if layer.get("max_cos") is not None:
            return layer["max_cos"]
    return []
