"""`interplab beliefs regress`: affine maps from a trained model's activations onto the belief states, with controls.

Points. Every sequence w of the run's context length (`all_sequences`; impossible ones dropped) and every position
j = 0 … ctx − 1 gives one point: the activation a_j(w) at a hook (or several hooks concatenated), and the belief
η_j(w) after tokens 0..j (`belief_states`). Mess3 at ctx 10: 3^10 = 59,049 × 10 = 590,490 points. With --sample N,
N sampled sequences instead. Each point weighs 1 (the paper's choice), or P(w) with --weighted.

Fit. Weighted least squares with an intercept, η̂ = a β + c, on all points at once:

    MSE = Σ_points w ‖η̂ − η‖² / (S Σ_points w)          (mean over points AND the S belief coordinates)
    R²  = 1 − Σ w ‖η̂ − η‖² / Σ w ‖η − η̄_w‖²              (pooled over coordinates)

The MSE is the mean over belief coordinates, as sklearn's mean_squared_error averages its outputs (Shai et al. fit
with sklearn's LinearRegression). The check: a fit that predicts nothing predicts the mean belief, whose MSE is the
per-coordinate variance of the beliefs, 0.1112 for Mess3 on the 590,490 points: the paper's shuffle control, 0.111.
(Summed over coordinates it would be 0.334; probability-weighted 0.161.)

Controls, at the final checkpoint: k-fold cross-validation (folds are random sets of whole sequences; all k fits
from one Gram matrix per fold) and the shuffle control: the beliefs permuted across all points and fitted, `shuffles`
times. Each permuted fit is scored twice: against the TRUE beliefs (`shuffle_mse`, the paper's control, ≈ the belief
variance), and against the permuted beliefs it was fitted to (`null_mse`, the permutation null of the real fit's
in-sample MSE). The p-value uses the latter, p = (1 + #{null MSE ≤ real MSE}) / (1 + shuffles): against the true
beliefs no affine map can beat the least-squares fit to them in-sample, so a p-value built on `shuffle_mse` would
be 1/(1 + shuffles) even for activations unrelated to the beliefs.

Next-token control. Beside every fit onto the beliefs, the same fit (same activations, same folds, CV at the last
checkpoint, no shuffles) onto the Bayes-optimal next-token probabilities p = P(· | η) (`next_token_r2`, pooled over
tokens). p is linear in η, so activations that hold the beliefs hold p too; the converse is the question. So
`next_token_control` asks how much of the beliefs a representation of p alone could give: the belief regression
with p as the activations (affine), and the conditional mean E[η | p] (any function of p), as R². For Mess3 p
determines η (its emission matrix is invertible: R² 1); for RRXOR several beliefs share one p (at ctx 8:
35 beliefs, 11 distinct p), so a belief R² above it shows the activations hold more than the next-token prediction.

Belief patching (`patch.py`, --patch-pairs, at the last checkpoint): the belief subspace of one sequence's last
position moved into another's, with the KLs to both Bayes-optimal predictions, beside a random-subspace control.

Speed. A point's activation and belief depend only on its prefix w_0..j, so the 590,490 points are 88,572 distinct
(prefix, position) rows (per fold) with multiplicities as weights: every sum above is computed on those, exactly.
Activations are standardised (a fixed affine change, so the fitted family is the same) and solved through the
eigendecomposition of the float64 Gram matrix, with directions below 1e-10 of the largest dropped (rank-deficient
hooks such as the embedding, 3 tokens × 10 positions, are fine).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig
from interplab.beliefs.figures import belief_figures
from interplab.beliefs.msp import MERGE_TOL, all_sequences, belief_states
from interplab.beliefs.patch import belief_patch
from interplab.beliefs.patch import summarise as summarise_patch
from interplab.beliefs.process import Process, make_process, next_token_probabilities, sample
from interplab.beliefs.train import load_config, saved_checkpoints
from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.models.toy import ToyTransformer
from interplab.runs import FIGURES

CONCAT = "concat"
"""Name of the target that concatenates every requested hook."""
EIG_CUTOFF = 1e-10
"""Eigenvalues of the (standardised) Gram matrix below this fraction of the largest are treated as 0."""
SAMPLE_SEED_OFFSET = 2_000_003
"""--sample draws with seed + this, a seed no training step uses."""


class Points(NamedTuple):
    """The distinct (fold, position, prefix) rows of a set of sequences, with the map from every point to them."""

    beliefs: Float[Tensor, "n s"]
    """η of each distinct row."""
    weight: Float[Tensor, " n"]
    """Total weight of the points the row stands for (their count, or their summed P(w))."""
    fold: Int[Tensor, " n"]
    """Cross-validation fold of the row."""
    sequence: Int[Tensor, " n"]
    """A sequence holding the row's prefix (to read its activation)."""
    position: Int[Tensor, " n"]
    """The row's position j."""
    point_row: Int[Tensor, " N"]
    """For every point (sequence i, position j), flattened, the distinct row it belongs to."""
    point_weight: Float[Tensor, " N"]
    """The weight of every point."""


def make_points(tokens: Int[Tensor, "m L"], beliefs: Float[Tensor, "m L s"], seq_weight: Float[Tensor, " m"],
                folds: int, seed: int) -> Points:
    """Group the m·L points by (fold, position, prefix): equal prefixes have equal activations and beliefs."""
    m, L = tokens.shape
    fold_of = torch.randperm(m, generator=torch.Generator().manual_seed(seed)) % folds
    rows: list[Tensor] = []
    point_row = torch.empty(m, L, dtype=torch.int64)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("beliefs", "weight", "fold", "sequence", "position")}
    offset = 0
    for j in range(L):
        key = torch.cat([fold_of[:, None], tokens[:, :j + 1]], 1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        n = int(inverse.max()) + 1
        first = torch.full((n,), m, dtype=torch.int64).scatter_reduce_(0, inverse, torch.arange(m), "amin")
        point_row[:, j] = inverse + offset
        parts["beliefs"].append(beliefs[first, j])
        parts["weight"].append(torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, seq_weight))
        parts["fold"].append(fold_of[first])
        parts["sequence"].append(first)
        parts["position"].append(torch.full((n,), j, dtype=torch.int64))
        rows.append(first)
        offset += n
    point_weight = seq_weight[:, None].expand(m, L).reshape(-1)
    return Points(*(torch.cat(parts[k]) for k in parts), point_row.reshape(-1), point_weight)  # type: ignore[arg-type]


@torch.no_grad()
def activations(model: ToyTransformer, tokens: Int[Tensor, "m L"], points: Points, hooks: list[str],
                batch: int = 4096) -> Float[Tensor, "n d"]:
    """The concatenated activations at `hooks` of every distinct row (float64), in the order of `hooks`."""
    caches: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(tokens), batch):
        cache = model.run_with_cache(tokens[i:i + batch], hooks).cache
        for h in hooks:
            caches[h].append(cache[h].float().cpu())
    full = torch.cat([torch.cat(caches[h]) for h in hooks], -1)              # [m, L, Σd]
    return full[points.sequence, points.position].double()


class Fit(NamedTuple):
    """The fit of one target (hook or concatenation), with its controls when computed."""

    mse: float
    r2: float
    cv_mse: float | None
    shuffle_mse: list[float]
    """MSE against the TRUE beliefs of each fit to permuted beliefs (the paper's control; ≈ the belief variance)."""
    null_mse: list[float]
    """In-sample MSE of each fit to permuted beliefs against those permuted beliefs: the permutation null of `mse`."""
    p_value: float | None
    """(1 + #{null_mse ≤ mse}) / (1 + shuffles)."""
    predicted: Float[Tensor, "n s"]
    """η̂ of every distinct row (in-sample)."""


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """The minimum-norm least-squares solution of gram β = rhs, dropping directions below EIG_CUTOFF."""
    vals, vecs = torch.linalg.eigh(gram)
    keep = vals > vals[-1].clamp_min(1e-300) * EIG_CUTOFF
    v = vecs[:, keep]
    return v @ ((v.T @ rhs) / vals[keep, None])


class Design(NamedTuple):
    Z: Float[Tensor, "n D+1"]
    """Standardised activations with a ones column last."""
    grams: Float[Tensor, "k D+1 D+1"]
    """Z_fᵀ W_f Z_f for each fold f."""
    rhs: Float[Tensor, "k D+1 s"]
    """Z_fᵀ W_f η_f for each fold f."""


def design(X: Float[Tensor, "n d"], points: Points, folds: int) -> Design:
    w = points.weight
    mean = (w[:, None] * X).sum(0) / w.sum()
    std = ((w[:, None] * (X - mean) ** 2).sum(0) / w.sum()).sqrt()
    Z = torch.cat([(X - mean) / torch.where(std > 0, std, 1.0), torch.ones(len(X), 1, dtype=X.dtype)], 1)
    grams = torch.stack([(Z[rows] * w[rows, None]).T @ Z[rows] for rows in (points.fold == f for f in range(folds))])
    return Design(Z, grams, fold_rhs(Z, points, points.beliefs, folds))


def fold_rhs(Z: Float[Tensor, "n D"], points: Points, Y: Float[Tensor, "n k"], folds: int) -> Float[Tensor, "f D k"]:
    """Z_fᵀ W_f Y_f for each fold f: the right-hand sides of the normal equations for the target Y."""
    return torch.stack([(Z[rows] * points.weight[rows, None]).T @ Y[rows]
                        for rows in (points.fold == f for f in range(folds))])


def _mse(pred: Tensor, truth: Tensor, w: Tensor) -> float:
    return float((w[:, None] * (pred - truth) ** 2).sum() / (w.sum() * truth.shape[1]))


def fit_target(d: Design, cols: Tensor, points: Points, controls: bool, shuffles: int, seed: int,
               Y: Float[Tensor, "n k"] | None = None) -> Fit:
    """Fit Y (default: the beliefs) from the columns `cols` of Z (a target's hooks' columns and the ones column)."""
    B = (d.rhs if Y is None else fold_rhs(d.Z, points, Y, len(d.grams)))[:, cols]
    Z, Y, w = d.Z[:, cols], points.beliefs if Y is None else Y, points.weight
    G = d.grams[:, cols][:, :, cols]
    beta = _solve(G.sum(0), B.sum(0))
    pred = Z @ beta
    mse = _mse(pred, Y, w)
    mean = (w[:, None] * Y).sum(0) / w.sum()
    r2 = 1 - float((w[:, None] * (pred - Y) ** 2).sum() / (w[:, None] * (Y - mean) ** 2).sum())
    if not controls:
        return Fit(mse, r2, None, [], [], None, pred)
    sse = 0.0
    for f in range(len(G)):
        rows = points.fold == f
        beta_f = _solve(G.sum(0) - G[f], B.sum(0) - B[f])
        sse += float((w[rows, None] * (Z[rows] @ beta_f - Y[rows]) ** 2).sum())
    cv = sse / float(w.sum() * Y.shape[1])
    gen = torch.Generator().manual_seed(seed)
    point_beliefs = Y[points.point_row]
    shuffled, null = [], []
    total = float(w.sum() * Y.shape[1])
    for _ in range(shuffles):
        perm = torch.randperm(len(point_beliefs), generator=gen)
        # Σ over points of w a ηᵀ with η permuted, accumulated onto the distinct rows that hold the activations.
        agg = torch.zeros_like(Y).index_add_(0, points.point_row, points.point_weight[:, None] * point_beliefs[perm])
        pred_s = Z @ _solve(G.sum(0), Z.T @ agg)
        shuffled.append(_mse(pred_s, Y, w))
        # Its own in-sample error against the permuted beliefs: Σ w‖ŷ‖² − 2 Σ ŷ·(Σ w η_perm) + Σ w‖η_perm‖².
        own = (w * (pred_s ** 2).sum(1)).sum() - 2 * (pred_s * agg).sum() \
            + (points.point_weight * (point_beliefs[perm] ** 2).sum(1)).sum()
        null.append(float(own) / total)
    p = (1 + sum(s <= mse for s in null)) / (1 + shuffles) if shuffles else None
    return Fit(mse, r2, cv, shuffled, null, p, pred)


def _fit_both(d: Design, cols: Tensor, points: Points, next_probs: Tensor, last: bool,
              cfg: BeliefRegressConfig) -> tuple[dict[str, Any], Fit]:
    """One target's fit onto the beliefs and onto the Bayes-optimal next-token probabilities (same activations, same
    folds; the shuffles only for the beliefs), as its JSON entry (with the controls when `last`) and the belief fit."""
    fit = fit_target(d, cols, points, last, cfg.shuffles, cfg.seed)
    nxt = fit_target(d, cols, points, last, 0, cfg.seed, Y=next_probs)
    entry: dict[str, Any] = {"mse": fit.mse, "r2": fit.r2, "next_token_mse": nxt.mse, "next_token_r2": nxt.r2}
    if last:
        shuffled = torch.tensor(fit.shuffle_mse, dtype=torch.float64)
        entry.update({"cv_mse": fit.cv_mse, "next_token_cv_mse": nxt.cv_mse, "dims": len(cols) - 1,
                      "shuffle_mse_mean": float(shuffled.mean()) if len(shuffled) else None,
                      "shuffle_mse_min": float(shuffled.min()) if len(shuffled) else None,
                      "shuffle_mse": fit.shuffle_mse, "null_mse": fit.null_mse, "p_value": fit.p_value})
    return entry, fit


def _distinct(x: Float[Tensor, "n k"]) -> Int[Tensor, " n"]:
    """Group index of every row, rows equal within MERGE_TOL sharing one."""
    return torch.unique(torch.round(x / MERGE_TOL).to(torch.int64), dim=0, return_inverse=True)[1]


def next_token_control(points: Points, next_probs: Float[Tensor, "n x"], folds: int) -> dict[str, Any]:
    """How much of the beliefs a representation holding only the Bayes-optimal next-token probabilities p = P(· | η)
    could give: the belief regression with p as the activations (affine, same points, weights and folds), and the
    best any function of p can do, the conditional mean E[η | p] (rows with equal p pooled), as R²."""
    fit = fit_target(design(next_probs, points, folds), torch.arange(next_probs.shape[1] + 1), points, True, 0, 0)
    group, w, Y = _distinct(next_probs), points.weight, points.beliefs
    n = int(group.max()) + 1
    sums = torch.zeros(n, Y.shape[1], dtype=Y.dtype).index_add_(0, group, w[:, None] * Y)
    mean_given_p = (sums / torch.zeros(n, dtype=w.dtype).index_add_(0, group, w)[:, None])[group]
    total = (w[:, None] * (Y - (w[:, None] * Y).sum(0) / w.sum()) ** 2).sum()
    r2_any = 1 - float((w[:, None] * (mean_given_p - Y) ** 2).sum() / total)
    return {"r2": fit.r2, "mse": fit.mse, "cv_mse": fit.cv_mse, "r2_any_function": r2_any,
            "n_distinct_next_token": n, "n_distinct_beliefs": int(_distinct(Y).max()) + 1}


def default_hooks(n_layers: int) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def _load_run(cfg: BeliefRegressConfig) -> tuple[BeliefTrainConfig, list[tuple[int, Path]]]:
    """The config of the beliefs train run cfg.run and the (tokens, folder) of the checkpoints to regress at."""
    train = load_config(cfg.run)
    saved = saved_checkpoints(cfg.run)
    if not saved:
        raise InterplabError(f"{cfg.run} holds no trained model yet (no complete checkpoints/step-N/; "
                             "`interplab beliefs train --out RUN` writes them)")
    if cfg.checkpoint:
        have = dict(saved)
        missing = [t for t in cfg.checkpoint if t not in have]
        if missing:
            raise InterplabError(f"no checkpoint at {missing} tokens in {cfg.run}; saved: "
                                 f"{', '.join(str(t) for t, _ in saved)}")
        saved = [(t, have[t]) for t in sorted(set(cfg.checkpoint))]
    return train, saved


def sequences(process: Process, ctx: int, cfg: BeliefRegressConfig) -> tuple[Int[Tensor, "m ctx"], Float[Tensor, " m"]]:
    """(tokens [m, ctx], weight per sequence [m]): every possible sequence (weight 1 or P(w)), or sampled ones."""
    if cfg.sample:
        tokens = sample(process, cfg.sample, ctx, seed=cfg.seed + SAMPLE_SEED_OFFSET)
        return tokens, torch.ones(len(tokens), dtype=torch.float64)
    count = process.n_tokens ** ctx
    if count > cfg.max_sequences:
        raise InterplabError(f"{process.name} has {process.n_tokens}^{ctx} = {count:,} sequences of length {ctx}, "
                             f"more than --max-sequences {cfg.max_sequences:,} can enumerate; pass --sample N to "
                             "regress on N sampled sequences (e.g. --sample 20000), or raise --max-sequences")
    tokens, probs = all_sequences(process, ctx)
    keep = probs > 0
    return tokens[keep], (probs[keep] if cfg.weighted else torch.ones(int(keep.sum()), dtype=torch.float64))


def run_regress(cfg: BeliefRegressConfig, *, progress: bool = True) -> dict[str, Any]:
    """Regress at every requested checkpoint; controls and figures at the last; write the JSON; return it."""
    start = time.perf_counter()
    cfg.validate()
    train, saved = _load_run(cfg)
    process = make_process(train.process)
    ctx = train.ctx
    model = ToyTransformer.load(saved[-1][1])
    hooks = cfg.hooks or default_hooks(model.cfg.n_layers)
    model.check_hook_names(hooks)
    bad = [h for h in hooks if model.hook_dim(h) is None]
    if bad:
        raise InterplabError(f"{bad}: attention patterns are [batch, head, q, k], not one vector per position; "
                             "choose residual, attention-output or MLP hooks")
    if cfg.patch_pairs and cfg.patch_hook and cfg.patch_hook not in hooks:
        raise InterplabError(f"--patch-hook {cfg.patch_hook} is not among the regressed hooks {hooks}; choose one of "
                             "them (or leave it empty for the final layer)")
    concat = (not cfg.hooks) if cfg.concat is None else cfg.concat
    tokens, seq_weight = sequences(process, ctx, cfg)
    points = make_points(tokens, belief_states(process, tokens), seq_weight, cfg.folds, cfg.seed)
    widths = [model.hook_dim(h) for h in hooks]
    bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
    ones = bounds[-1]
    targets = {h: torch.tensor([*range(bounds[i], bounds[i + 1]), ones]) for i, h in enumerate(hooks)}
    if concat and len(hooks) > 1:
        targets[CONCAT] = torch.arange(ones + 1)
    next_probs = next_token_probabilities(process, points.beliefs)
    curve, final, predicted = [], {}, {}
    for n, (tokens_seen, path) in enumerate(tqdm(saved, desc="regress", disable=not progress)):
        last = n == len(saved) - 1
        model = ToyTransformer.load(path)
        d = design(activations(model, tokens, points, hooks), points, cfg.folds)
        row: dict[str, Any] = {"tokens": tokens_seen, "targets": {}}
        for name, cols in targets.items():
            row["targets"][name], fit = _fit_both(d, cols, points, next_probs, last, cfg)
            if last:
                final[name] = row["targets"][name]
                predicted[name] = fit.predicted
        curve.append(row)
    final_layer = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    headline = final_layer if final_layer in final else hooks[-1]
    result: dict[str, Any] = {
        "config": asdict(cfg), "process": process.name, "ctx": ctx, "n_sequences": len(tokens),
        "n_points": len(points.point_row), "n_distinct_rows": len(points.weight), "hooks": hooks,
        "mse_definition": "mean over points and belief coordinates of the squared error (sklearn "
                          "mean_squared_error); points weigh 1 each" + (" × P(w)" if cfg.weighted else ""),
        "final_checkpoint": saved[-1][0], "headline": headline, "final": final, "curve": curve,
        "next_token_control": next_token_control(points, next_probs, cfg.folds), "figures": {}}
    if cfg.patch_pairs:
        result["patch"] = summarise_patch(belief_patch(model, process, cfg.patch_hook or headline, ctx,
                                                       n_pairs=cfg.patch_pairs, seed=cfg.seed))
    if cfg.figures:
        result["figures"] = belief_figures(result, points.beliefs, predicted, points.weight,
                                           f"{cfg.run.rstrip('/')}/{FIGURES}")
    result["wall_s"] = time.perf_counter() - start
    out = cfg.out or f"{cfg.run.rstrip('/')}/regress.json"
    write_url_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    result["out"] = out
    return result


def format_summary(result: dict[str, Any]) -> str:
    names = list(result["final"])
    lines = [f"{result['process']}, ctx {result['ctx']}: {result['n_sequences']:,} sequences × {result['ctx']} = "
             f"{result['n_points']:,} points ({result['n_distinct_rows']:,} distinct)",
             "MSE at each checkpoint (tokens: " + ", ".join(names) + ")"]
    for row in result["curve"]:
        lines.append(f"  {row['tokens']:>11,}: " + "  ".join(f"{row['targets'][n]['mse']:.5f}" for n in names))
    lines.append(f"at {result['final_checkpoint']:,} tokens:")
    for name, f in result["final"].items():
        shuffle = (f"shuffle {f['shuffle_mse_mean']:.4f} (min {f['shuffle_mse_min']:.4f}, p = {f['p_value']:.3g})"
                   if f["shuffle_mse_mean"] is not None else "no shuffle control")
        lines.append(f"  {name:<26} MSE {f['mse']:.5f}  R² {f['r2']:.4f}  CV MSE {f['cv_mse']:.5f}  {shuffle}  "
                     f"next-token R² {f['next_token_r2']:.4f}")
    c = result["next_token_control"]
    lines.append(f"beliefs from the Bayes-optimal next-token probabilities alone: R² {c['r2']:.4f} (affine), "
                 f"{c['r2_any_function']:.4f} (any function; {c['n_distinct_next_token']} distinct next-token "
                 f"distributions for {c['n_distinct_beliefs']} beliefs)")
    if "patch" in result:
        pa = result["patch"]
        lines.append(f"belief patching at {pa['hook']} ({pa['n_pairs']} pairs, {pa['dim']}-dim subspace): "
                     "KL(p_A ‖ q) / KL(p_B ‖ q), nats")
        for name in ("before", "belief", "readout", "random", "clean_a"):
            moved = f"  moved {pa[name]['moved']:.3f}, variance {pa[name]['variance']:.3f}" if "moved" in pa[name] \
                else ""
            lines.append(f"  {name:<8} {pa[name]['kl_to_a']['mean']:.4f} ± {pa[name]['kl_to_a']['sem']:.4f} / "
                         f"{pa[name]['kl_to_b']['mean']:.4f} ± {pa[name]['kl_to_b']['sem']:.4f}{moved}")
    lines += [f"figure: {p}" for p in result["figures"].values()]
    return "\n".join(lines)
