"""`interplab perturb`: activation plateaus and sensitive directions (Heimersheim 2024, "Activation plateaus").

At a hook, the activation x at the LAST position of a context is moved a distance s along a unit direction d̂:

    x'(s) = x + s · d̂,      d̂ = (t − x) / ‖t − x‖   for a target t       (so x'(‖t − x‖) = t)

and we record, at that position, KL(P(x) ‖ P(x'(s))) of the next-token distribution and the change
‖r_later(x') − r_later(x)‖ of a later hook's activation (also divided by ‖r_later(x)‖). Target kinds:

    isotropic    d̂ uniform on the unit sphere, fresh per pair
    mean_cov     t ~ N(μ, Σ), μ and Σ the mean and covariance of the real activations at the hook
    real         t = the activation at the same (last) position of another context of the sample
    sae_decoder  d̂ = W_dec[i] / ‖W_dec[i]‖, i uniform among the SAE latents that fire on the sample (needs --sae)

Control: the same sweeps started from a synthetic x_syn ~ N(μ, Σ) spliced at the same position (the base
distribution is then P(x_syn)). A plateau is the flat start of KL(s): per pair, the smallest step at which KL first
exceeds the threshold. μ, Σ and the step unit (the median ‖x‖) come from the non-BOS positions of the sampled
contexts. Each context runs its prefix once (`run_prefix`); each (start, kind, step) is one `run_suffix` per batch.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import asdict, replace
from typing import Any, NamedTuple, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.evals.configs import TARGET_KINDS, PerturbConfig
from interplab.evals.controls import error_covariance_factor, random_unit_vectors
from interplab.evals.metrics import kl_per_token
from interplab.evals.perturb_figures import perturbation_curves
from interplab.evals.perturb_stats import curve_summary, plateau_summary
from interplab.evals.outputs import check_figures_folder, check_result_file, write_result
from interplab.fileio import join
from interplab.models.hooked import HookedModel, Prefix
from interplab.models.hooks import parse_block_hook
from interplab.models.load import load_model
from interplab.sae.base import SparseAutoencoder
from interplab.sae.loading import load_sae_and_model

__all__ = ["KIND", "STARTS", "check_outputs", "format_summary", "perturbation_sweep"]

STARTS = ("real", "synthetic")
KIND = "perturb"
"""The "kind" of the result JSON (as in a run folder's metrics.json)."""
FIGURES = ("perturbation_curves.png",)


# ---- input checks, all before the first forward pass -----------------------------------------------------------
def _kinds_to_run(cfg: PerturbConfig, has_sae: bool) -> list[str]:
    """The target kinds to run, each once (sae_decoder dropped, with a note, without an SAE)."""
    kinds = list(dict.fromkeys(cfg.targets))  # dedupe, keep order
    if "sae_decoder" in kinds and not has_sae:
        print("note: target sae_decoder skipped: it needs --sae")
        kinds.remove("sae_decoder")
    if not kinds:
        raise InterplabError(f"no target kinds to run; choose from {', '.join(TARGET_KINDS)}")
    return kinds


def check_outputs(cfg: PerturbConfig) -> None:
    """Refuse --out and --figures unless this sweep may write there (evals/outputs.py), before any work; a later hook
    not given is compared once resolved (`perturbation_sweep` calls this again then)."""
    check_result_file(cfg.out, KIND, asdict(cfg), resolved_later=("later_hook",),
                      is_legacy=lambda saved: "plateau" in saved and "curves" in saved)
    check_figures_folder(cfg.figures, FIGURES)


def _layer(name: str) -> float:
    """Block index of a hook; −1 for the embeddings, +inf for ln_final."""
    parsed = parse_block_hook(name)
    return parsed[0] if parsed else (math.inf if name.startswith("ln_final") else -1)


def _resolve(cfg: PerturbConfig, model: HookedModel, kinds: list[str]) -> PerturbConfig:
    """Model-dependent checks; fill in the later hook and the kinds actually run."""
    if model.hook_dim(cfg.hook) is None:  # hook_dim also checks the name
        raise InterplabError(f"cannot perturb {cfg.hook}: attention patterns are not one vector per token")
    later = cfg.later_hook
    if later is None:  # the last residual if it comes after the hook (it need not, e.g. at the last block)
        last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
        later = last if _layer(last) > _layer(cfg.hook) else "ln_final.hook_out"
    model.check_hook_names([later])
    if model.hook_dim(later) is None:
        raise InterplabError(f"--later-hook {later}: attention patterns are not one vector per token")
    # A later BLOCK (not just a later point in the same block): the suffix pass reaches it whatever the hook kind.
    if not _layer(later) > _layer(cfg.hook):
        raise InterplabError(f"--later-hook {later} must lie in a later layer than --hook {cfg.hook}")
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows ({model.info.n_ctx})")
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")
    return replace(cfg, later_hook=later, targets=kinds)


# ---- statistics of the real activations and the directions -----------------------------------------------------
class ActStats(NamedTuple):
    """The real activations' distribution at the hook (non-BOS positions of the sample)."""

    mean: Float[Tensor, " d"]
    cov_factor: Float[Tensor, "d d"]
    """L with L Lᵀ = Σ + λI (eigen factor, small ridge λ, so it exists even for a singular Σ)."""
    step_unit: float
    """median ‖x‖: the unit of the steps."""

    def sample(self, n: int, gen: torch.Generator) -> Float[Tensor, "n d"]:
        """n draws of μ + L z, z ~ N(0, I), i.e. N(μ, Σ + λI)."""
        z = torch.randn(n, self.mean.shape[0], generator=gen, dtype=torch.float64)
        return (self.mean.double() + z @ self.cov_factor.double().T).float()


def activation_stats(acts: Float[Tensor, "n d"], ridge: float = 1e-6) -> ActStats:
    """μ, a factor of Σ + λI (λ = ridge · tr Σ / d) and the median norm of the rows of `acts` (on the CPU)."""
    acts = acts.detach().double().cpu()
    factor = error_covariance_factor(acts, ridge=ridge)  # the same centred estimate, here of activations
    return ActStats(acts.mean(0), factor, acts.norm(dim=-1).median().item())


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    """A random permutation without fixed points: a random cycle through all n items."""
    order = torch.randperm(n, generator=gen)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


def sample_directions(kind: str, base: Float[Tensor, "n d"], gen: torch.Generator, *, stats: ActStats | None = None,
                      real: Float[Tensor, "n d"] | None = None,
                      sae_dirs: Float[Tensor, "k d"] | None = None) -> Float[Tensor, "n d"]:
    """Unit directions d̂ per pair (row of `base`), for one target kind; drawn on the CPU from `gen`.

    isotropic: g/‖g‖; mean_cov: (t − x)/‖t − x‖ with t ~ N(μ, Σ) (needs `stats`); real: t = real[π(i)] with π a
    random derangement (needs `real`, the last-position activations of the sample); sae_decoder: a uniformly drawn
    row of `sae_dirs` (unit decoder rows of the latents that fire). A zero t − x gives the zero vector (no move).
    """
    base = base.detach().double().cpu()
    n, d = base.shape
    if kind == "isotropic":
        return random_unit_vectors((n, d), gen, torch.float64).float()
    if kind == "sae_decoder":
        assert sae_dirs is not None
        return sae_dirs.float().cpu()[torch.randint(sae_dirs.shape[0], (n,), generator=gen)]
    if kind == "mean_cov":
        assert stats is not None
        target = stats.sample(n, gen).double()
    elif kind == "real":
        assert real is not None
        target = real.detach().double().cpu()[_derangement(n, gen)]
    else:
        raise InterplabError(f"unknown target kind {kind!r}; valid kinds: {', '.join(TARGET_KINDS)}")
    delta = target - base
    return (delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


def alive_decoder_directions(sae: SparseAutoencoder, acts: Float[Tensor, "n d"],
                             chunk: int = 1024) -> Float[Tensor, "k d"]:
    """Unit-normalised W_dec rows of the latents that fire (≠ 0) on at least one row of `acts`."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=acts.device)
    for rows in acts.split(chunk):  # chunks: [n, d_sae] at once can be large
        fired |= (sae.encode(rows) != 0).any(0)
    if not fired.any():
        raise InterplabError("no SAE latent fires on the sampled activations, so sae_decoder has no directions")
    w = sae.W_dec.detach()[fired].float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---- the sweep ------------------------------------------------------------------------------------------------
def run_suffix_capture(model: HookedModel, prefix: Prefix, replacement: Tensor, later_hook: str,
                       ) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "batch pos d_later"]]:
    """`model.run_suffix(prefix, replacement)` and the activation at `later_hook` read during that pass."""
    captured: dict[str, Tensor] = {}

    def read(act: Tensor, _name: str) -> None:
        captured["act"] = act.detach()

    with model.hooks([(later_hook, read)]):
        logits = model.run_suffix(prefix, replacement)
    if "act" not in captured:
        raise InterplabError(f"{later_hook} was not reached by the suffix pass after {prefix.hook}")
    return logits, captured["act"]


def _splice_last(prefix: Prefix, x_last: Float[Tensor, "batch d"]) -> Tensor:
    """The prefix's clean activation with its last position replaced by `x_last`."""
    replacement = prefix.act.clone()
    replacement[:, -1] = x_last.to(replacement.dtype)
    return replacement


class Reference(NamedTuple):
    logits: Float[Tensor, "batch d_vocab"]
    """Last-position logits with the base activation spliced in: P(x)."""
    later: Float[Tensor, "batch d_later"]
    """Last-position activation at the later hook, same pass."""


def reference_runs(model: HookedModel, prefixes: Sequence[Prefix], base: Float[Tensor, "n d"],
                   later_hook: str) -> list[Reference]:
    """One suffix pass per batch with the base activations spliced in (shared by every kind started there)."""
    refs, i = [], 0
    for prefix in prefixes:
        b = prefix.act.shape[0]
        logits, later = run_suffix_capture(model, prefix, _splice_last(prefix, base[i:i + b]), later_hook)
        refs.append(Reference(logits[:, -1], later[:, -1]))
        i += b
    return refs


class Sweep(NamedTuple):
    kl: Float[Tensor, "n s"]
    """KL(P(x) ‖ P(x + s d̂)) at the perturbed position, nats (float64, CPU)."""
    l2: Float[Tensor, "n s"]
    """‖r_later(x + s d̂) − r_later(x)‖ at the perturbed position."""
    later_norm: Float[Tensor, " n"]
    """‖r_later(x)‖, to make l2 relative."""


@torch.no_grad()
def sweep(model: HookedModel, prefixes: Sequence[Prefix], base: Float[Tensor, "n d"],
          directions: Float[Tensor, "n d"], steps: Float[Tensor, " s"] | Float[Tensor, "n s"], later_hook: str, *,
          references: Sequence[Reference] | None = None, bar: tqdm | None = None) -> Sweep:
    """KL and later-layer change along x' = x + s·d̂ for every pair (row) and step s (absolute units).

    `prefixes` hold the contexts in order (their batch sizes sum to n); row i of `base` is spliced at the last
    position of context i. `steps` is shared [s] or per pair [n s]. `references` (from `reference_runs` on the same
    base) may be passed to share them between sweeps.
    """
    n = base.shape[0]
    device = prefixes[0].act.device
    base, directions = base.float().to(device), directions.float().to(device)
    steps = steps.float().to(device)
    steps = steps.expand(n, -1) if steps.ndim == 1 else steps
    refs = references if references is not None else reference_runs(model, prefixes, base, later_hook)
    kl = torch.empty(n, steps.shape[1], dtype=torch.float64)
    l2 = torch.empty_like(kl)
    later_norm = torch.empty(n, dtype=torch.float64)
    i = 0
    for prefix, ref in zip(prefixes, refs):
        rows = slice(i, i + prefix.act.shape[0])
        later_norm[rows] = ref.later.double().norm(dim=-1).cpu()
        for j in range(steps.shape[1]):
            moved = base[rows] + steps[rows, j:j + 1] * directions[rows]                   # [b d]
            logits, later = run_suffix_capture(model, prefix, _splice_last(prefix, moved), later_hook)
            # kl_per_token computes p (log p − log q) termwise, so identical logits give exactly 0
            kl[rows, j] = kl_per_token(ref.logits[:, None], logits[:, -1:])[:, 0].double().cpu()
            l2[rows, j] = (later[:, -1].double() - ref.later.double()).norm(dim=-1).cpu()
            if bar is not None:
                bar.update(1)
        i = rows.stop
    return Sweep(kl, l2, later_norm)


def _seed(*parts: object) -> int:
    """A generator seed per purpose, stable across runs and independent of which other kinds run."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


# ---- the command ----------------------------------------------------------------------------------------------
@torch.no_grad()
def perturbation_sweep(cfg: PerturbConfig, *, model: HookedModel | None = None,
                       sae: SparseAutoencoder | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every (target kind, start) sweep and return the JSON-able result (also written to cfg.out, and the figure
    to cfg.figures, if set). `model` and `sae` may be passed already loaded (cfg.model / cfg.sae then only label).

        config, model, n_pairs      the resolved config (later_hook filled in), the model's shape facts, pairs per kind
        step_unit, steps            median ‖x‖, and the steps in that unit (absolute step = steps[j] · step_unit)
        curves[kind][start]         start ∈ {real, synthetic}: "kl", "l2", "l2_relative", each {mean, sem, p10..p90}
        plateau[kind][start]        plateau_summary: median, mean ± sem over crossing pairs, fraction_never_crossing
    """
    cfg.validate()
    kinds = _kinds_to_run(cfg, has_sae=sae is not None or bool(cfg.sae))
    check_outputs(replace(cfg, targets=kinds))  # the kinds run, as the result records them
    if sae is not None or cfg.sae:  # the SAE must read --hook of this model
        loaded = load_sae_and_model(cfg.sae or "", cfg.model, cfg.hook, cfg.device, loaded_sae=sae,
                                    loaded_model=model, same_hook=True)
        sae, model = loaded.sae, loaded.model
    elif model is None:
        model = load_model(cfg.model, device=cfg.device)
    cfg = _resolve(cfg, model, kinds)
    check_outputs(cfg)  # again with the later hook resolved, still before the first forward pass
    later_hook = cfg.later_hook
    assert later_hook is not None

    contexts = list(itertools.islice(iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split,
                                                   seed=cfg.seed, test_fraction=cfg.test_fraction), cfg.n_contexts))
    if len(contexts) < 2:
        raise InterplabError(f"corpus '{cfg.corpus}' ({cfg.split} split) yields {len(contexts)} context(s) of "
                             f"{cfg.ctx_len} tokens; need at least 2")
    if len(contexts) < cfg.n_contexts:
        tqdm.write(f"note: the corpus ran out after {len(contexts)} of {cfg.n_contexts} contexts")
    tokens = torch.stack(contexts).to(model.device)                                        # [n T]
    prefixes = [model.run_prefix(batch, cfg.hook) for batch in tokens.split(cfg.batch_size)]
    acts = torch.cat([p.act for p in prefixes]).float()                                     # [n T d]
    x = acts[:, -1]                                                                         # [n d], perturbed
    non_bos = acts[:, 1:].reshape(-1, acts.shape[-1])
    stats = activation_stats(non_bos)
    sae_dirs = None
    if "sae_decoder" in cfg.targets:
        assert sae is not None  # _kinds_to_run drops sae_decoder without an SAE
        sae = sae.float()
        sae_dirs = alive_decoder_directions(sae, non_bos).cpu()

    steps = torch.linspace(0.0, cfg.max_step, cfg.n_steps, dtype=torch.float64)            # in step units
    steps_abs = (steps * stats.step_unit).float()
    bases = {"real": x, "synthetic": stats.sample(len(contexts), torch.Generator().manual_seed(
        _seed(cfg.seed, "synthetic-base"))).to(model.device)}
    n_passes = len(prefixes) * len(STARTS) * (1 + len(cfg.targets) * cfg.n_steps)
    bar = tqdm(total=n_passes, unit="pass", desc="perturb", disable=not progress)
    curves: dict[str, dict[str, Any]] = {k: {} for k in cfg.targets}
    plateau: dict[str, dict[str, Any]] = {k: {} for k in cfg.targets}
    for start, base in bases.items():
        refs = reference_runs(model, prefixes, base, later_hook)
        bar.update(len(prefixes))
        for kind in cfg.targets:
            gen = torch.Generator().manual_seed(_seed(cfg.seed, kind, start))
            dirs = sample_directions(kind, base, gen, stats=stats, real=x, sae_dirs=sae_dirs)
            s = sweep(model, prefixes, base, dirs, steps_abs, later_hook, references=refs, bar=bar)
            curves[kind][start] = {"kl": curve_summary(s.kl), "l2": curve_summary(s.l2),
                                   "l2_relative": curve_summary(s.l2 / s.later_norm[:, None].clamp_min(1e-12))}
            plateau[kind][start] = plateau_summary(s.kl, steps, cfg.kl_threshold)
    bar.close()

    result: dict[str, Any] = {
        "kind": KIND, "config": asdict(cfg), "model": model.info.to_dict(), "n_pairs": len(contexts),
        "step_unit": stats.step_unit, "step_unit_is": "median L2 norm of the non-BOS activations at the hook",
        "steps": steps.tolist(), "curves": curves, "plateau": plateau,
    }
    if cfg.figures:
        result["figures"] = {"perturbation_curves": perturbation_curves(
            result, join(cfg.figures, "perturbation_curves.png"))}
    if cfg.out:
        write_result(cfg.out, result)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A short table: per kind and start, the plateau median, the fraction never crossing and KL at a few steps."""
    cfg, steps = result["config"], result["steps"]
    cols = sorted({len(steps) // 4, len(steps) // 2, len(steps) - 1})

    def num(v: float | None, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{cfg['hook']} of {cfg['model']}: {result['n_pairs']} pairs per kind, step unit (median ‖x‖) "
             f"{result['step_unit']:.4g}, KL threshold {cfg['kl_threshold']:g} nats, later hook {cfg['later_hook']}",
             f"{'kind':<13}{'start':<11}{'plateau median':>15}{'never cross':>13}"
             + "".join(f"{'KL@' + format(steps[j], '.2g'):>11}" for j in cols)]
    for kind, by_start in result["plateau"].items():
        for start, p in by_start.items():
            kl_mean = result["curves"][kind][start]["kl"]["mean"]
            lines.append(f"{kind:<13}{start:<11}{num(p['median']):>15}{p['fraction_never_crossing']:>13.0%}"
                         + "".join(f"{num(kl_mean[j]):>11}" for j in cols))
    lines.append("plateau: first step with KL > threshold (step units, median over crossing pairs); "
                 "KL@s: mean KL(P(x) ‖ P(x')) at step s")
    return "\n".join(lines)
