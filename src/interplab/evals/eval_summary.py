"""The numbers of an SAE evaluation: exact reconstruction moments, the per-variant KL/CE summary with the headline
scores (SAELens key names), the decoder-scale fine-tuning summary, and a printable table."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from interplab.errors import InterplabError
from interplab.evals.metrics import FiringCounts, ce_loss_recovered, mean_and_sem, ratio_with_sem, sparsity_metrics
from interplab.evals.scale_tune import ScaleTuneResult


class Moments:
    """Float64 sums over tokens from which the reconstruction metrics of all tokens follow exactly."""

    def __init__(self) -> None:
        self.n = 0
        self.s: dict[str, Any] = {}

    def add(self, x: Tensor, h: Tensor) -> None:
        x, h = x.double(), h.double()
        n_in, n_out = x.norm(dim=-1), h.norm(dim=-1)
        both_zero = (n_in <= 1e-12) & (n_out <= 1e-12)
        denom = n_in * n_out
        cos = torch.where(denom > 1e-12, (x * h).sum(-1) / denom.clamp_min(1e-12), 0.0)
        ratio = torch.where(n_in > 1e-12, n_out / n_in.clamp_min(1e-12), 0.0)
        parts = {"err2": (x - h).pow(2).sum(-1), "sq": x.pow(2).sum(-1), "cos": torch.where(both_zero, 1.0, cos),
                 "ratio": torch.where(both_zero, 1.0, ratio), "n_in": n_in, "n_out": n_out,
                 "dot": (x * h).sum(-1), "out2": n_out.pow(2)}
        for k, v in parts.items():
            self.s[k] = self.s.get(k, 0.0) + v.sum().item()
        self.s["sum_x"] = self.s.get("sum_x", 0.0) + x.sum(0)
        self.n += x.shape[0]

    def metrics(self) -> dict[str, float]:
        m = {k: v / self.n for k, v in self.s.items() if k != "sum_x"}
        mean = self.s["sum_x"] / self.n
        var = m["sq"] - mean.pow(2).sum().item()                     # mean_t ‖x_t − x̄‖²
        ev = 1.0 - m["err2"] / var if var > 1e-12 else (1.0 if m["err2"] <= 1e-12 else 0.0)
        return {"mse": m["err2"], "explained_variance": ev, "fvu": 1.0 - ev, "cossim": m["cos"],
                "l2_norm_in": m["n_in"], "l2_norm_out": m["n_out"], "l2_ratio": m["ratio"],
                "relative_reconstruction_bias": m["out2"] / m["dot"] if abs(m["dot"]) > 1e-12 else math.nan}


def summarise(kl_t: dict[str, Tensor], ce_t: dict[str, Tensor], moments: Moments,
              counts: FiringCounts | None, last_f: Tensor, l0_sum: float, l1_sum: float) -> dict[str, Any]:
    """The metrics dict from per-token KL and CE of every variant (1-D tensors over the evaluated tokens)."""
    kl_stats = {k: mean_and_sem(v)._asdict() for k, v in kl_t.items()}
    ce_stats = {k: mean_and_sem(v)._asdict() if v.numel() else {"mean": math.nan, "sem": math.nan}
                for k, v in ce_t.items()}
    try:
        ratio = ratio_with_sem(kl_t["sae"], kl_t["epsilon_random"])
        kl_ratio, kl_ratio_sem = ratio.mean, ratio.sem
    except InterplabError:  # ε-random KL is 0 (e.g. a perfect SAE): the ratio is undefined
        kl_ratio = kl_ratio_sem = math.nan
    ce_m = {k: v["mean"] for k, v in ce_stats.items()}
    kl_sae, kl_zero = kl_stats["sae"]["mean"], kl_stats["zero_ablation"]["mean"]
    sparsity = sparsity_metrics(last_f, counts)
    sparsity["l0"], sparsity["l1"] = l0_sum / moments.n, l1_sum / moments.n
    reconstruction = moments.metrics()
    performance = {
        "ce_loss_without_sae": ce_m["clean"],
        "ce_loss_with_sae": ce_m["sae"],
        "ce_loss_with_ablation": ce_m["zero_ablation"],
        "ce_loss_with_mean_ablation": ce_m["mean_ablation"],
        "ce_loss_score": ce_loss_recovered(ce_m["clean"], ce_m["sae"], ce_m["zero_ablation"]),
        "ce_loss_score_mean_ablation": ce_loss_recovered(ce_m["clean"], ce_m["sae"], ce_m["mean_ablation"]),
    }
    behavior = {
        "kl_div_with_sae": kl_sae,
        "kl_div_with_sae_sem": kl_stats["sae"]["sem"],
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": (kl_zero - kl_sae) / kl_zero if abs(kl_zero) > 1e-12 else math.nan,
        "kl_ratio": kl_ratio,
        "kl_ratio_sem": kl_ratio_sem,
    }
    return {
        "reconstruction": reconstruction,
        "sparsity": sparsity,
        "model_performance": performance,
        "model_behavior": behavior,
        "kl": kl_stats,
        "ce_loss": ce_stats,
        **saelens_groups(reconstruction, performance, behavior, moments.n),
    }


def saelens_groups(reconstruction: dict[str, float], performance: dict[str, float], behavior: dict[str, float],
                   n_tokens: int) -> dict[str, dict[str, float]]:
    """The metric groups of SAELens's `run_evals` (evals.py), with SAELens's key names, holding the same numbers as
    interplab's own groups, so that tools reading SAELens eval files read ours ("sparsity" {l0, l1} already shares
    SAELens's name). Left out: `explained_variance_legacy`, SAELens's superseded per-token formula whose mean it
    subtracts per evaluation batch, so that its value depends on the batch size (`explained_variance` is the correct
    one, present). Tokens are counted without BOS, which interplab leaves out of every statistic."""
    return {
        "reconstruction_quality": {k: reconstruction[k] for k in ("explained_variance", "mse", "cossim")},
        "shrinkage": {k: reconstruction[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio",
                                                      "relative_reconstruction_bias")},
        "model_performance_preservation": {k: performance[k] for k in ("ce_loss_score", "ce_loss_with_ablation",
                                                                        "ce_loss_with_sae", "ce_loss_without_sae")},
        "model_behavior_preservation": {k: behavior[k] for k in ("kl_div_score", "kl_div_with_ablation",
                                                                  "kl_div_with_sae")},
        "token_stats": {"total_tokens_eval_reconstruction": n_tokens, "total_tokens_eval_sparsity_variance": n_tokens},
    }


def scale_tuning_summary(tuned: ScaleTuneResult, kl_t: dict[str, Tensor], tuned_moments: Moments, *,
                          held_out: bool) -> dict[str, Any]:
    """What the learned decoder scales change on the evaluation tokens.

    gap_closed = (KL_sae − KL_tuned) / (KL_sae − KL_ε-random): 1 means scale alone explains the SAE's excess KL over
    an error of the same size; kl_ratio_tuned compares the tuned SAE with ε-random at ITS error norm.
    """
    means = {k: v.mean().item() for k, v in kl_t.items()}
    gap = means["sae"] - means["epsilon_random"]
    try:
        ratio = ratio_with_sem(kl_t["sae_scale_tuned"], kl_t["epsilon_random_scale_tuned"])
        ratio_mean, ratio_sem = ratio.mean, ratio.sem
    except InterplabError:
        ratio_mean = ratio_sem = math.nan
    s = tuned.scale.double()
    return {
        "per": tuned.per,
        "n_tokens_tuned": tuned.n_tokens,
        "held_out": held_out,
        "kl_tuning_tokens_before": tuned.kl_before,
        "kl_tuning_tokens_after": tuned.kl_after,
        "kl_history": tuned.history,
        "kl_div_with_sae": means["sae"],
        "kl_div_with_sae_scale_tuned": means["sae_scale_tuned"],
        "kl_div_epsilon_random": means["epsilon_random"],
        "gap_closed": (means["sae"] - means["sae_scale_tuned"]) / gap if abs(gap) > 1e-12 else math.nan,
        "kl_ratio_tuned": ratio_mean,
        "kl_ratio_tuned_sem": ratio_sem,
        "fvu_tuned": tuned_moments.metrics()["fvu"],
        "scale": {"mean": s.mean().item(), "std": s.std().item() if s.numel() > 1 else 0.0,
                  "min": s.min().item(), "max": s.max().item()},
    }


def format_summary(result: dict[str, Any]) -> str:
    """A short table: per variant mean KL ± SEM and CE, then the headline scores."""
    m = result["metrics"]

    def num(v: Any, fmt: str = ".4g") -> str:
        return "nan" if v is None else format(v, fmt)

    lines = [f"{result['config']['sae']} at {result['config']['hook']}: {result['n_tokens']:,} tokens (BOS excluded)",
             f"{'variant':<30}{'KL(clean||variant)':>24}{'CE loss':>12}"]
    lines.append(f"{'clean':<30}{'0':>24}{num(m['ce_loss']['clean']['mean']):>12}")
    for name in m["kl"]:
        k = m["kl"][name]
        lines.append(f"{name:<30}{num(k['mean']) + ' ± ' + num(k['sem'], '.2g'):>24}"
                     f"{num(m['ce_loss'][name]['mean']):>12}")
    b, p, r, s = m["model_behavior"], m["model_performance"], m["reconstruction"], m["sparsity"]
    lines.append(f"kl_ratio (sae / epsilon_random) {num(b['kl_ratio'])} ± {num(b['kl_ratio_sem'], '.2g')}   "
                 f"ce_loss_score {num(p['ce_loss_score'])} (mean-ablation {num(p['ce_loss_score_mean_ablation'])})")
    lines.append(f"explained_variance {num(r['explained_variance'])}  cossim {num(r['cossim'])}  "
                 f"l2_ratio {num(r['l2_ratio'])}  l0 {num(s['l0'], '.1f')}  dead {num(s['dead_fraction'], '.1%')}  "
                 f"dense {num(s['dense_fraction'], '.1%')}")
    typ = m.get("reconstruction_typical", {})
    if typ.get("n_massive"):
        lines.append(f"{typ['n_massive']:,} massive tokens (‖x‖ > {num(typ['norm_cut'])}, "
                     f"{num(typ['massive_fraction'], '.3%')}); without them: explained_variance "
                     f"{num(typ.get('explained_variance'))}, fvu {num(typ.get('fvu'))}")
    if "scale_tuning" in m:
        t = m["scale_tuning"]
        lines.append(f"decoder scales per {t['per']} (fitted on {t['n_tokens_tuned']:,} train tokens): KL "
                     f"{num(t['kl_div_with_sae'])} -> {num(t['kl_div_with_sae_scale_tuned'])}, gap to ε-random "
                     f"closed {num(t['gap_closed'], '.1%')}, kl_ratio_tuned {num(t['kl_ratio_tuned'])} "
                     f"± {num(t['kl_ratio_tuned_sem'], '.2g')}, fvu_tuned {num(t['fvu_tuned'])}")
    return "\n".join(lines)
