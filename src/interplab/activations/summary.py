"""A first look at a store: the statistics a researcher checks before training anything on it.

Per hook: norms (with the BOS position apart, since its norm is often far from the rest: "massive activations"),
how anisotropic the cloud is (‖mean‖ / mean ‖x‖), its effective dimensionality (participation ratio of the
covariance spectrum, (Σλ)² / Σλ²), the variance share of the top principal components, and the outlier dimensions.
"""

from __future__ import annotations

import torch

from interplab.activations.store import ActivationStore


class _Moments:
    """Streaming first and second moments in float64."""

    def __init__(self, d: int):
        self.n = 0
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.outer = torch.zeros(d, d, dtype=torch.float64)
        self.norm_sum = 0.0
        self.norm_max = 0.0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        norms = rows.norm(dim=-1)
        self.n += rows.shape[0]
        self.sum += rows.sum(0)
        self.outer += rows.T @ rows
        self.norm_sum += norms.sum().item()
        self.norm_max = max(self.norm_max, norms.max().item())


def summarize(store: ActivationStore, top_pcs: int = 10) -> dict[str, dict[str, float | list]]:
    """Statistics of every hook in `store` (positions after the first only, except the BOS norm)."""
    hooks = store.hooks
    body = {h: _Moments(store.d(h)) for h in hooks}
    first = {h: _Moments(store.d(h)) for h in hooks}
    for context in store.iter_contexts(hooks):
        for h in hooks:
            acts = context[h]  # [n, ctx_len, d]
            first[h].add(acts[:, 0])
            body[h].add(acts[:, 1:].reshape(-1, acts.shape[-1]))
    return {h: _statistics(body[h], first[h], top_pcs) for h in hooks}


def _statistics(body: _Moments, first: _Moments, top_pcs: int) -> dict[str, float | list]:
    mean = body.sum / body.n
    cov = body.outer / body.n - torch.outer(mean, mean)
    eig = torch.linalg.eigvalsh(cov).clamp(min=0).flip(0)  # descending
    mean_abs_dims = (body.sum / body.n).abs()
    outliers = torch.topk(mean_abs_dims, k=min(5, mean_abs_dims.numel()))
    return {
        "tokens": body.n + first.n,
        "mean_norm": body.norm_sum / body.n,
        "max_norm": body.norm_max,
        "bos_mean_norm": first.norm_sum / first.n,
        "anisotropy": (mean.norm().item()) / (body.norm_sum / body.n),
        "participation_ratio": (eig.sum() ** 2 / (eig**2).sum()).item(),
        f"top{top_pcs}_pc_variance": (eig[:top_pcs].sum() / eig.sum()).item(),
        "outlier_dims": outliers.indices.tolist(),
        "outlier_dim_means": mean[outliers.indices].tolist(),
    }


def format_summary(stats: dict[str, dict[str, float | list]]) -> str:
    """The statistics as an aligned text block."""
    lines = []
    for hook, s in stats.items():
        pcs = next(k for k in s if k.endswith("_pc_variance"))
        lines += [
            f"{hook}: {s['tokens']:,} tokens",
            f"  mean norm {s['mean_norm']:.2f} (max {s['max_norm']:.2f}); "
            f"BOS position mean norm {s['bos_mean_norm']:.2f}",
            f"  anisotropy ‖mean‖/mean‖x‖ = {s['anisotropy']:.3f}; participation ratio = {s['participation_ratio']:.1f}"
            f" dims; {pcs.removesuffix('_pc_variance')} PCs explain {100 * s[pcs]:.1f}% of variance",
            "  outlier dims (mean value): "
            + ", ".join(f"{d} ({m:+.2f})" for d, m in zip(s["outlier_dims"], s["outlier_dim_means"])),
        ]
    return "\n".join(lines)
