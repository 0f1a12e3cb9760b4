"""Figures of a belief-state regression (`interplab beliefs regress`): the simplex, MSE vs training tokens, per layer.

    simplex      the true beliefs beside the regressed ones, in 2-D: for 3 states the probability simplex drawn
                 as a triangle (barycentric coordinates: η ↦ Σ_s η_s v_s, v_s the triangle's corners), coloured by
                 the true belief as RGB; for more states the plane of the first two principal components of the true
                 beliefs (weighted), coloured by the first three components scaled to [0, 1]. The regressed point of
                 each row takes the colour of its true belief, so the picture shows where each belief went.
    mse_curve    MSE of every target (each hook, the concatenation) against training tokens, log-log, with the
                 shuffle control of the final checkpoint as a dashed line
    per_layer    final-checkpoint MSE per target (bars), with its cross-validated MSE and the shuffle control
    r2           final-checkpoint R² per target onto the beliefs and onto the Bayes-optimal next-token probabilities
                 (bars), with the belief R² the next-token probabilities alone give (affine, and any function) as lines
    patch        belief patching: KL to A's and to B's Bayes-optimal prediction before and after each patch (belief
                 subspace, the readout's own subspace, a random one), with A's clean run as the floor; ± 1 SEM
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt
import torch

from interplab.plotting import new_figure, save_figure

MAX_POINTS = 60_000
"""The simplex scatter draws at most this many rows (the heaviest first) to keep the PNG quick to render."""


def simplex_coordinates(beliefs: np.ndarray, basis: np.ndarray | None = None,
                        mean: np.ndarray | None = None) -> np.ndarray:
    """2-D coordinates: barycentric for 3 states (corners at the vertices of an equilateral triangle), else the
    projection onto `basis` ([S, 2]) after subtracting `mean`."""
    if beliefs.shape[1] == 3 and basis is None:
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
        return beliefs @ corners
    assert basis is not None and mean is not None
    return (beliefs - mean) @ basis


def _pca(beliefs: np.ndarray, weight: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, [S, k] top principal directions) of the weighted beliefs."""
    w = weight / weight.sum()
    mean = w @ beliefs
    cov = (beliefs - mean).T @ ((beliefs - mean) * w[:, None])
    vals, vecs = np.linalg.eigh(cov)
    return mean, vecs[:, ::-1][:, :k]


def simplex(true: npt.ArrayLike, predicted: npt.ArrayLike | None, weight: npt.ArrayLike, path: str,
            title: str = "") -> str:
    """Ground-truth belief geometry beside the regressed one (see the module docstring); with predicted None, the
    ground truth alone."""
    true = np.asarray(true, dtype=np.float64)
    predicted = true if predicted is None else np.asarray(predicted, dtype=np.float64)
    panels = 1 if predicted is true else 2
    weight = np.asarray(weight, dtype=np.float64)
    order = np.argsort(-weight, kind="stable")[:MAX_POINTS]
    true, predicted, weight = true[order], predicted[order], weight[order]
    S = true.shape[1]
    if S == 3:
        colors = np.clip(true, 0, 1)
        xy_true, xy_pred = simplex_coordinates(true), simplex_coordinates(predicted)
        labels = ("", "")
    else:
        mean, basis = _pca(true, weight, min(3, S))
        proj = (true - mean) @ basis
        lo, hi = proj.min(0), proj.max(0)
        colors = np.zeros((len(true), 3))
        colors[:, :proj.shape[1]] = (proj - lo) / np.where(hi > lo, hi - lo, 1)
        xy_true = simplex_coordinates(true, basis[:, :2], mean)
        xy_pred = simplex_coordinates(predicted, basis[:, :2], mean)
        labels = ("PC 1 of the true beliefs", "PC 2")
    # A process with few distinct beliefs (RRXOR: 36) needs big markers to be seen; a fractal (Mess3) small ones.
    n_distinct = len(np.unique(np.round(true, 6), axis=0))
    size = float(np.clip(2000 / n_distinct, 0.6, 40))
    fig, axes = new_figure(5.5 * panels, 5.2, ncols=panels)
    axes = np.atleast_1d(axes)
    for ax, xy, name in zip(axes, (xy_true, xy_pred), ("ground truth (Bayesian belief)", "regressed from activations")):
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=size if xy is xy_true else min(size, 2.0), linewidths=0,
                   rasterized=True)
        if S == 3:
            tri = simplex_coordinates(np.eye(3))
            ax.plot(*np.vstack([tri, tri[:1]]).T, color="0.6", linewidth=0.8)
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        if S == 3:
            ax.set_axis_off()
    # Both panels share the true panel's limits (plus a margin), so a collapsed or spread fit looks so.
    lo, hi = xy_true.min(0), xy_true.max(0)
    pad = 0.08 * (hi - lo).max()
    for ax in axes:
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def mse_curve(result: Mapping[str, Any], path: str) -> str:
    """MSE vs training tokens for every target, log-log, with the final shuffle control."""
    fig, ax = new_figure(7, 4.5)
    names = list(result["final"])
    tokens = [row["tokens"] for row in result["curve"]]
    for name in names:
        ax.plot(tokens, [row["targets"][name]["mse"] for row in result["curve"]], marker="o", markersize=3,
                label=name, linewidth=2.2 if name == result.get("headline") else 1.2)
    shuffle = [f["shuffle_mse_mean"] for f in result["final"].values() if f.get("shuffle_mse_mean") is not None]
    if shuffle:
        ax.axhline(float(np.mean(shuffle)), color="0.4", linestyle="--", linewidth=1,
                   label=f"shuffle control ({np.mean(shuffle):.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("belief regression MSE (mean over points and coordinates)")
    ax.set_title(f"{result['process']}: belief regression MSE during training")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def per_layer(result: Mapping[str, Any], path: str) -> str:
    """Final-checkpoint MSE per target as bars, with the cross-validated MSE and the shuffle control."""
    names = list(result["final"])
    final = [result["final"][n] for n in names]
    fig, ax = new_figure(max(6.0, 1.1 * len(names) + 2), 4.5)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [f["mse"] for f in final], width=0.4, label="MSE (all points)", color="tab:blue")
    ax.bar(x + 0.2, [f["cv_mse"] if f["cv_mse"] is not None else np.nan for f in final], width=0.4,
           label="cross-validated MSE", color="tab:orange")
    shuffle = [f.get("shuffle_mse_mean") for f in final]
    if any(s is not None for s in shuffle):
        ax.scatter(x, [np.nan if s is None else s for s in shuffle], marker="_", s=300, color="k",
                   label="shuffle control", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace("blocks.", "").replace(".hook_", " ") for n in names], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("MSE")
    ax.set_title(f"{result['process']} at {result['final_checkpoint']:,} tokens: MSE per layer")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def r2_per_layer(result: Mapping[str, Any], path: str) -> str:
    """R² onto beliefs and onto next-token probabilities per target, with the next-token-only belief R² as lines."""
    names = list(result["final"])
    final = [result["final"][n] for n in names]
    fig, ax = new_figure(max(6.0, 1.1 * len(names) + 2), 4.5)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [f["r2"] for f in final], width=0.4, label="R² onto the beliefs", color="tab:blue")
    ax.bar(x + 0.2, [f["next_token_r2"] for f in final], width=0.4, label="R² onto next-token probabilities",
           color="tab:green")
    control = result["next_token_control"]
    ax.axhline(control["r2"], color="k", linestyle="--", linewidth=1,
               label=f"belief R² from next-token probs, affine ({control['r2']:.3f})")
    ax.axhline(control["r2_any_function"], color="0.5", linestyle=":", linewidth=1.2,
               label=f"belief R² from next-token probs, any function ({control['r2_any_function']:.3f})")
    ax.set_ylim(min(0.0, *(f["r2"] for f in final)), 1.05)
    ax.set_xticks(x, [n.replace("blocks.", "").replace(".hook_", " ") for n in names], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("R² (pooled over coordinates)")
    ax.set_title(f"{result['process']} at {result['final_checkpoint']:,} tokens: beliefs vs next-token probabilities")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


PATCH_CONDITIONS = (("before", "B clean"), ("belief", "belief subspace"), ("readout", "readout subspace (col W)"),
                    ("random", "random subspace"), ("clean_a", "A clean (floor)"))


def patch_figure(patch: Mapping[str, Any], title: str, path: str) -> str:
    """KL(p_A ‖ q) and KL(p_B ‖ q) for B before and after each patch, and A's clean run, with ± 1 SEM."""
    fig, ax = new_figure(7.5, 4.5)
    x = np.arange(len(PATCH_CONDITIONS))
    for offset, key, label, color in ((-0.2, "kl_to_a", "KL(p_A ‖ q)", "tab:red"),
                                      (0.2, "kl_to_b", "KL(p_B ‖ q)", "tab:blue")):
        ax.bar(x + offset, [patch[c][key]["mean"] for c, _ in PATCH_CONDITIONS], width=0.4, label=label, color=color,
               yerr=[patch[c][key]["sem"] for c, _ in PATCH_CONDITIONS], capsize=3)
    ticks = [f"{name}\nmoved {patch[c]['moved']:.2f}" if patch[c].get("moved") is not None else name
             for c, name in PATCH_CONDITIONS]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("KL from the Bayes-optimal prediction (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def belief_figures(result: Mapping[str, Any], true: torch.Tensor, predicted: Mapping[str, torch.Tensor],
                   weight: torch.Tensor, folder: str) -> dict[str, str]:
    """The figures into `folder`: a simplex for the headline target (the final layer) and, when fitted, for the
    concatenation of all hooks; MSE vs tokens; MSE and R² per layer; belief patching when run. Returns
    {name: path}."""
    root = folder.rstrip("/")
    paths = {}
    for name, file in ((result["headline"], "belief_simplex.png"), ("concat", "belief_simplex_concat.png")):
        if name in predicted and name in result["final"]:
            f = result["final"][name]
            title = (f"{result['process']}, {name} at {result['final_checkpoint']:,} tokens: "
                     f"MSE {f['mse']:.4g}, R² {f['r2']:.4f}")
            key = "simplex" if name == result["headline"] else "simplex_concat"
            paths[key] = simplex(true.numpy(), predicted[name].numpy(), weight.numpy(), f"{root}/{file}", title)
    paths["mse_curve"] = mse_curve(result, f"{root}/belief_mse_vs_tokens.png")
    paths["per_layer"] = per_layer(result, f"{root}/belief_mse_per_layer.png")
    paths["r2"] = r2_per_layer(result, f"{root}/belief_r2_vs_next_token.png")
    if "patch" in result:
        pa = result["patch"]
        title = (f"{result['process']}: belief patching at {pa['hook']}, {result['final_checkpoint']:,} tokens\n"
                 f"({pa['n_pairs']} pairs, {pa['dim']}-dim subspaces; last position of B gets A's component)")
        paths["patch"] = patch_figure(pa, title, f"{root}/belief_patching.png")
    return paths
