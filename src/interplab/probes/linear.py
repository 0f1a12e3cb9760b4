"""Linear probes for a binary label, each score beside its controls: difference of means and logistic regression.

Labels must be exactly the two classes {0, 1} (bools are fine). Multi-class labels are not supported: probe one
class against the rest by passing `labels == k`.

Both probes split the n examples into a train and a held-out test part, stratified by class (seeded), fit on train
and score on test; `test_fraction=0` scores in-sample, which in high dimension is optimistic — the shuffled-label
control then shows by how much.

Difference of means, with μ_c the train mean of class c:

    raw = μ1 − μ0,   u = raw / ‖raw‖,   p_i = x_i · u,   threshold t = u · (μ0 + μ1) / 2   (the midpoint's projection)
    accuracy = mean_i 1[(p_i > t) = y_i],   AUC = P(p_i > p_j | y_i = 1, y_j = 0)  (ties count ½; Mann–Whitney)

Logistic regression (scikit-learn, L2, lbfgs): each feature is standardised, z = (x − m) / s, with m and s the
train mean and standard deviation (so C means the same for every hook's scale). For each C of the sweep, a 5-fold
cross-validated AUC on train picks the best C (never the test split, so the held-out score stays unbiased); the
held-out accuracy, F1 and AUC of every C are reported too. The logit w·z + b is, in the original activation space,

    (w / s) · x + (b − w · (m / s)),   so the probe direction is u = (w / s) / ‖w / s‖.

Controls (`Control`: the score distribution, its mean, std, max and a p-value):

    shuffled   the same pipeline (same split, same C) on a random permutation of all labels, n_shuffles times:
               the score a probe gets when the labels carry no information about the activations
    random     held-out AUC and accuracy of random unit directions (threshold at the projected train midpoint).
               Only the direction matters to these scores, so "of the same norm" as raw changes nothing.

p-value = (1 + #{control scores >= observed}) / (1 + #controls): the chance of a score this high under the control.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError, check_int
from interplab.evals.controls import random_unit_vectors
from interplab.plotting import new_figure, save_figure

CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Default inverse regularisation strengths of the logistic sweep."""
CV_FOLDS = 5


class Control(NamedTuple):
    """One control's score distribution beside the observed score."""

    observed: float
    scores: list[float]
    mean: float
    std: float
    max: float
    p_value: float
    """(1 + #{scores >= observed}) / (1 + len(scores))."""


def _control(observed: float, scores: Sequence[float]) -> Control:
    a = np.asarray(scores, dtype=np.float64)
    p = (1 + int((a >= observed - 1e-12).sum())) / (1 + a.size)
    return Control(float(observed), a.tolist(), float(a.mean()), float(a.std()), float(a.max()), p)


def check_binary(acts: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """acts as float64 [n, d] and labels as int64 [n] in {0, 1} with both classes present; raise otherwise."""
    if not isinstance(acts, Tensor) or acts.ndim != 2 or acts.shape[0] == 0 or acts.shape[1] == 0:
        shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
        raise InterplabError(f"acts must be a non-empty tensor [n, d], got {shape}")
    labels = torch.as_tensor(labels)
    if labels.shape != (acts.shape[0],):
        raise InterplabError(f"labels must be [n] = [{acts.shape[0]}] like acts, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point and not bool((labels == labels.round()).all()):
        raise InterplabError("labels must be integers or booleans, got non-integer floats")
    labels = labels.long()
    classes = sorted(set(labels.tolist()))
    if not set(classes) <= {0, 1}:
        raise InterplabError(f"labels must be binary 0/1, got classes {classes[:10]}; multi-class probes are not "
                             "supported: probe one class against the rest with labels == k")
    if len(classes) < 2:
        raise InterplabError(f"labels hold only class {classes[0]} ({len(labels)} examples); a binary probe needs "
                             "examples of both 0 and 1")
    if not bool(torch.isfinite(acts).all()):
        raise InterplabError("acts hold NaN or inf values")
    return acts.detach().double().cpu(), labels.cpu()


def split(labels: Int[Tensor, " n"], test_fraction: float, seed: int,
          min_train: int = 1) -> tuple[Tensor, Tensor]:
    """(train indices, test indices), stratified: round(test_fraction · n_c) of each class c go to test, at least 1
    and at most n_c − min_train when test_fraction > 0. test_fraction = 0 gives train = test = everything."""
    if not 0 <= test_fraction < 1:
        raise InterplabError(f"test_fraction must be in [0, 1), got {test_fraction}")
    everything = torch.arange(len(labels))
    if test_fraction == 0:
        return everything, everything
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in (0, 1):
        idx = everything[labels == c]
        if len(idx) < min_train + 1:
            raise InterplabError(f"class {c} has {len(idx)} example(s); a held-out split needs at least "
                                 f"{min_train + 1} per class ({min_train} to fit, 1 to test), or test_fraction=0 to "
                                 "score in-sample")
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(1, round(test_fraction * len(idx))), len(idx) - min_train)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def roc_auc(scores: Float[Tensor, "n ..."], labels: Int[Tensor, " n"]) -> Float[Tensor, "..."]:
    """AUC of each column of scores for labels in {0, 1}: the Mann–Whitney statistic with average ranks for ties."""
    s = np.asarray(scores.detach().cpu().double())
    y = np.asarray(labels.cpu()).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise InterplabError("AUC needs examples of both classes")
    ranks = rankdata(s, axis=0)
    return torch.as_tensor((ranks[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0))


def binary_scores(scores: Float[Tensor, " n"], labels: Int[Tensor, " n"], threshold: float) -> dict[str, float]:
    """Accuracy, F1 (0 when there is no true positive) and AUC of predicting 1 where scores > threshold."""
    pred, y = scores > threshold, labels.bool()
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {"accuracy": float((pred == y).double().mean()),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "auc": float(roc_auc(scores, labels))}


# ---- difference of means ---------------------------------------------------------------------------------------
class DiffMeansResult(NamedTuple):
    """A difference-of-means probe, its held-out scores and controls."""

    direction: Float[Tensor, " d"]
    """u = raw / ‖raw‖ (float32)."""
    raw: Float[Tensor, " d"]
    """μ1 − μ0 on the train split (float32)."""
    threshold: float
    """u · (μ0 + μ1) / 2: projections above it are predicted 1."""
    projections: dict[int, Float[Tensor, " m"]]
    """Held-out projections x · u per class {0: ..., 1: ...}, for a histogram."""
    scores: dict[str, float]
    """Held-out accuracy, f1, auc."""
    controls: dict[str, dict[str, Control]]
    """{"shuffled": {"auc", "accuracy"}, "random": {"auc", "accuracy"}}."""
    n_train: int
    n_test: int


def _dom_fit(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    mu1, mu0 = x[y == 1].mean(0), x[y == 0].mean(0)
    return mu1 - mu0, (mu0 + mu1) / 2


def _dom_scores(x: Tensor, y: Tensor, train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, float, dict[str, float]]:
    raw, mid = _dom_fit(x[train], y[train])
    norm = float(raw.norm())
    if norm == 0:
        raise InterplabError("the class means are identical on the train split, so there is no direction")
    u = raw / norm
    t = float(mid @ u)
    return raw, u, t, binary_scores(x[test] @ u, y[test], t)


def _random_control(x: Tensor, y: Tensor, train: Tensor, test: Tensor, observed: dict[str, float],
                    n_random: int, seed: int) -> dict[str, Control]:
    g = torch.Generator().manual_seed(seed)
    dirs = random_unit_vectors((n_random, x.shape[1]), g, torch.float64).T              # [d k], unit columns
    _, mid = _dom_fit(x[train], y[train])
    proj = x[test] @ dirs                                                               # [m k]
    acc = ((proj > mid @ dirs) == y[test, None].bool()).double().mean(0)
    return {"auc": _control(observed["auc"], roc_auc(proj, y[test]).tolist()),
            "accuracy": _control(observed["accuracy"], acc.tolist())}


def diff_of_means(acts: Float[Tensor, "n d"], labels: Int[Tensor, " n"], *, test_fraction: float = 0.25,
                  seed: int = 0, n_shuffles: int = 10, n_random: int = 100) -> DiffMeansResult:
    """Difference-of-means direction μ1 − μ0, scored held-out, with shuffled-label and random-direction controls."""
    check_int("n_shuffles", n_shuffles, 1)
    check_int("n_random", n_random, 1)
    x, y = check_binary(acts, labels)
    train, test = split(y, test_fraction, seed)
    raw, u, t, scores = _dom_scores(x, y, train, test)
    g = torch.Generator().manual_seed(seed + 1)
    shuffled: dict[str, list[float]] = {"auc": [], "accuracy": []}
    for _ in range(n_shuffles):
        ys = y[torch.randperm(len(y), generator=g)]
        if ys[train].unique().numel() < 2 or ys[test].unique().numel() < 2:
            s = {"auc": 0.5, "accuracy": 0.5}  # a shuffle left a class out of a split: chance
        else:
            s = _dom_scores(x, ys, train, test)[3]
        for k in shuffled:
            shuffled[k].append(s[k])
    controls = {"shuffled": {k: _control(scores[k], v) for k, v in shuffled.items()},
                "random": _random_control(x, y, train, test, scores, n_random, seed + 2)}
    proj = x[test] @ u
    return DiffMeansResult(u.float(), raw.float(), t, {c: proj[y[test] == c].float() for c in (0, 1)}, scores,
                           controls, len(train), len(test))


def projection_histogram(result: DiffMeansResult, path: str, bins: int = 40) -> str:
    """Overlaid histograms of the held-out projections of both classes on the direction, with the threshold."""
    fig, ax = new_figure(7, 4.5)
    both = torch.cat([result.projections[0], result.projections[1]]).numpy()
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-9, bins + 1)
    for c, color in ((0, "tab:blue"), (1, "tab:red")):
        p = result.projections[c].numpy()
        ax.hist(p, bins=edges, alpha=0.5, color=color, label=f"label {c} (n={p.size:,})")
    ax.axvline(result.threshold, color="black", linestyle="--", linewidth=1, label="midpoint threshold")
    shuffled, random = result.controls["shuffled"]["auc"], result.controls["random"]["auc"]
    ax.set_title(f"AUC {result.scores['auc']:.3f}  (shuffled labels {shuffled.mean:.3f} ± {shuffled.std:.3f}, "
                 f"random directions {random.mean:.3f} ± {random.std:.3f})", fontsize=9)
    ax.set_xlabel("projection on the difference-of-means direction (held out)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---- logistic regression ---------------------------------------------------------------------------------------
class LogisticResult(NamedTuple):
    """A logistic probe at the best C, its held-out scores, the C sweep, and controls."""

    direction: Float[Tensor, " d"]
    """u = (w / s) / ‖w / s‖: the probe's direction in the original activation space (float32)."""
    coef: Float[Tensor, " d"]
    """w / s: the logit's weights on the raw activations (float32)."""
    intercept: float
    """b − w · (m / s): logit = coef · x + intercept."""
    C: float
    """The C picked by cross-validated AUC on the train split."""
    scores: dict[str, float]
    """Held-out accuracy, f1, auc at C."""
    sweep: list[dict[str, float]]
    """Per C: {"C", "cv_auc", "accuracy", "f1", "auc"} (the last three held out)."""
    controls: dict[str, dict[str, Control]]
    """{"shuffled": {"accuracy", "f1", "auc"}, "random": {"auc", "accuracy"}}."""
    n_train: int
    n_test: int
    estimator: Any
    """The fitted scikit-learn Pipeline(StandardScaler, LogisticRegression), for predict / predict_proba."""


def _pipeline(C: float, seed: int) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def _logit_scores(est: Any, x: np.ndarray, y: Tensor) -> dict[str, float]:
    return binary_scores(torch.as_tensor(est.decision_function(x)), y, 0.0)


def logistic_probe(acts: Float[Tensor, "n d"], labels: Int[Tensor, " n"], *, Cs: Sequence[float] = CS,
                   test_fraction: float = 0.25, seed: int = 0, n_shuffles: int = 10,
                   n_random: int = 100) -> LogisticResult:
    """L2 logistic regression on standardised activations, C picked by CV on train, scored held out, with controls."""
    check_int("n_shuffles", n_shuffles, 1)
    check_int("n_random", n_random, 1)
    Cs = [float(c) for c in Cs]
    if not Cs or not all(math.isfinite(c) and c > 0 for c in Cs):
        raise InterplabError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    x, y = check_binary(acts, labels)
    train, test = split(y, test_fraction, seed)
    xn, yn = x.numpy(), y.numpy()
    folds = min(CV_FOLDS, int(y[train].bincount().min()))
    if folds < 2:
        raise InterplabError("cross-validating C needs at least 2 train examples of each class")
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    sweep, fitted = [], []
    for C in Cs:
        cv_auc = float(cross_val_score(_pipeline(C, seed), xn[train], yn[train], cv=cv, scoring="roc_auc").mean())
        est = _pipeline(C, seed).fit(xn[train], yn[train])
        sweep.append({"C": C, "cv_auc": cv_auc, **_logit_scores(est, xn[test], y[test])})
        fitted.append(est)
    best = max(range(len(Cs)), key=lambda i: sweep[i]["cv_auc"])  # ties: the first, i.e. the strongest regulariser
    est = fitted[best]
    scaler, lr = est[0], est[-1]
    w = torch.as_tensor(lr.coef_[0])
    coef = w / torch.as_tensor(scaler.scale_)
    intercept = float(lr.intercept_[0]) - float(coef @ torch.as_tensor(scaler.mean_))
    scores = {k: v for k, v in sweep[best].items() if k in ("accuracy", "f1", "auc")}

    g = torch.Generator().manual_seed(seed + 1)
    shuffled: dict[str, list[float]] = {k: [] for k in scores}
    for _ in range(n_shuffles):
        ys = y[torch.randperm(len(y), generator=g)]
        if ys[train].unique().numel() < 2 or ys[test].unique().numel() < 2:
            s = {"accuracy": 0.5, "f1": 0.0, "auc": 0.5}  # a shuffle left a class out of a split: chance
        else:
            s = _logit_scores(_pipeline(Cs[best], seed).fit(xn[train], ys.numpy()[train]), xn[test], ys[test])
        for k in shuffled:
            shuffled[k].append(s[k])
    controls = {"shuffled": {k: _control(scores[k], v) for k, v in shuffled.items()},
                "random": _random_control(x, y, train, test, scores, n_random, seed + 2)}
    return LogisticResult((coef / coef.norm().clamp_min(1e-300)).float(), coef.float(), intercept, Cs[best], scores,
                          sweep, controls, len(train), len(test), est)
