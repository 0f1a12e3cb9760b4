"""k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack"): rank neurons, probe the top k, with controls.

Activations x [n, d] and binary labels y ∈ {0, 1}. A stratified split (seeded) gives train and test rows; every
statistic below — the z-scoring, each ranking and each probe — is computed on the train rows only, and the probes are
scored on the test rows. Columns are z-scored with the train mean and std (a constant column becomes 0), as the
paper's `normalize_activations` does, so rankings and the L1 path do not favour high-variance neurons.

Rankings of the d neurons (train rows, z-scored x; score s_j, higher first, ties to the lower index):

    mean_diff    s_j = |μ1_j − μ0_j|                 class means of z-scored x: |Δμ| / σ_j with σ_j the total std
    f_stat       s_j = ANOVA F (sklearn f_classif)   for two classes F = t², t the pooled-variance t-statistic
    mutual_info  s_j = Î(x_j; y)                     KSG nearest-neighbour estimate (sklearn mutual_info_classif,
                                                     3 neighbours, seeded) on at most `mi_max_rows` train rows
    l1_path      order of entry on the L1-logistic path (balanced weights) as the penalty relaxes:
                 C_i = C_min · 10^(3i/(G−1)), i < G, C_min = 1 / max_j |Σ_r w_r (y_r − ½) x_rj|, the C below which
                 every coefficient is 0; e_j = first i with β_j(C_i) ≠ 0 and
                     s_j = (G − e_j) + ½ |β_j(C_{e_j})| / max_l |β_l(C_{e_j})|      (ties within a step: by |β|)
                 Never-entered neurons get s_j = ½ |g_j| / max |g| < 1 (g_j the gradient at 0 in C_min).

The paper's code ranks by the same raw mean difference (on std-normalised activations), f_classif, mutual_info_classif
and one L1 logistic fit (C = 0.1, by |β|); here the L1 ranking follows the path instead, which needs no choice of C.

For each k, a balanced L2 logistic probe (class_weight="balanced", C = 1, as the paper's probes) on the top-k neurons
is scored on the test rows: F1, MCC, precision, recall (positive class 1), PR-AUC (average precision of the decision
function) and accuracy. A dense probe on all d neurons (method "all") is the reference.

Controls, each row labelled by its `condition`:

    rotated    x Q with Q a seeded Haar-random orthogonal d×d matrix: the same k-curve. A probe on all coordinates is
               unchanged up to the z-scoring, but a signal carried by a few neurons is spread over every coordinate,
               so the small-k probes lose their advantage; a sparse basis, not just a linear signal, is what a
               plain curve well above the rotated one shows.
    shuffled   train labels permuted (`shuffles` times, seeded), ranked and fitted on them, scored on the true test
               labels: what ranking + probing finds in noise. Chance F1 of a coin flip is p / (p + ½), p = test
               prevalence of class 1, and MCC is ≈ 0. It is a distribution, not one number: a shuffle that happens
               to rank a truly informative neuron high (chance ≈ k·#informative/d) gives a probe that reads real
               signal with a random sign, |MCC| well above 0 on the true test labels; compare with its median/range.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
import sklearn
import torch
from jaxtyping import Float, Int
from sklearn import metrics as skm
from sklearn.feature_selection import f_classif, mutual_info_classif
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from interplab.errors import InterplabError, check_int
from interplab.plotting import new_figure, save_figure
from interplab.probes.linear import check_binary, split
from interplab.synth.sparse import derive_seed

METHODS = ("mean_diff", "f_stat", "mutual_info", "l1_path")
"""The ranking methods, in the order they are reported."""
METRICS = ("f1", "mcc", "precision", "recall", "pr_auc", "accuracy")
"""The test metrics of every row."""
L1_GRID = 30
"""G: number of C values on the L1 path (3 decades above C_min)."""
MI_MAX_ROWS = 2000
"""Mutual information is a k-NN estimate, O(n log n) per neuron: ranked on at most this many train rows."""

# Keys of `derive_seed`: one independent random stream per purpose.
_SPLIT, _ROTATION, _SHUFFLE, _MI = 10, 11, 12, 13


class KSparseRow(NamedTuple):
    """One probe's test scores."""

    condition: str
    """"plain", "rotated" (activations x Q) or "shuffled" (ranked and fitted on permuted train labels)."""
    method: str
    """The ranking method (see METHODS), or "all" for the dense probe on every neuron."""
    k: int
    """Number of neurons the probe reads."""
    shuffle: int
    """Index of the label permutation for condition "shuffled", else −1."""
    neurons: tuple[int, ...]
    """The columns it reads, best-ranked first (columns of x Q for "rotated")."""
    f1: float
    mcc: float
    precision: float
    recall: float
    pr_auc: float
    """Average precision of the probe's decision function."""
    accuracy: float


class KSparseResult(NamedTuple):
    """All rows of a k-sparse probing run and the train rankings behind them."""

    rows: list[KSparseRow]
    rankings: dict[str, Int[Tensor, " d"]]
    """Per method: the neurons, best first, ranked on the (plain) train rows."""
    rotated_rankings: dict[str, Int[Tensor, " d"]]
    """The same on the rotated activations."""
    train_idx: Int[Tensor, " n_train"]
    test_idx: Int[Tensor, " n_test"]
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    d: int
    prevalence: float
    """Fraction of class 1 among the test rows."""
    seed: int

    @property
    def chance_f1(self) -> float:
        """F1 of predicting class 1 by a fair coin: precision p, recall ½."""
        return self.prevalence / (self.prevalence + 0.5)

    def select(self, condition: str, method: str) -> list[KSparseRow]:
        """The rows of one condition and method, by k then shuffle."""
        return sorted((r for r in self.rows if r.condition == condition and r.method == method),
                      key=lambda r: (r.k, r.shuffle))

    def score(self, condition: str, method: str, k: int, metric: str = "f1") -> float:
        """One metric at one k (the mean over shuffles for "shuffled")."""
        vals = [getattr(r, metric) for r in self.select(condition, method) if r.k == k]
        if not vals:
            raise InterplabError(f"no {condition!r} row for method {method!r} at k={k}; ks are {list(self.ks)} "
                                 f"(and d={self.d} for method 'all')")
        return float(np.mean(vals))

    def to_json(self) -> dict[str, Any]:
        """Plain lists and floats (JSON-able)."""
        return {"rows": [r._asdict() | {"neurons": list(r.neurons)} for r in self.rows],
                "rankings": {m: r.tolist() for m, r in self.rankings.items()},
                "rotated_rankings": {m: r.tolist() for m, r in self.rotated_rankings.items()},
                "n_train": len(self.train_idx), "n_test": len(self.test_idx), "ks": list(self.ks),
                "methods": list(self.methods), "d": self.d, "prevalence": self.prevalence,
                "chance_f1": self.chance_f1, "seed": self.seed}


def _logreg(C: float, l1: bool, seed: int) -> LogisticRegression:
    """A balanced logistic regression; L1 via `l1_ratio` on scikit-learn >= 1.8, where `penalty` is deprecated."""
    if not l1:
        return LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    new = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)
    kw: dict[str, Any] = {"l1_ratio": 1.0} if new else {"penalty": "l1"}
    return LogisticRegression(C=C, class_weight="balanced", solver="liblinear", random_state=seed, **kw)


def check_data(acts: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """acts as float64 [n, d] and labels as int64 [n] with values 0/1 and both classes, or an InterplabError."""
    x, y = check_binary(torch.as_tensor(acts), torch.as_tensor(labels))
    return x.numpy(), y.numpy()


def neuron_scores(acts: Any, labels: Any, method: str, *, seed: int = 0, mi_max_rows: int = MI_MAX_ROWS,
                  l1_grid: int = L1_GRID, stop_after: int | None = None) -> Float[Tensor, " d"]:
    """s_j of the module docstring for every column (higher = more label-relevant), computed on all given rows.

    Pass train rows only. Columns are used as given (ksparse_probe z-scores them first). For "l1_path",
    `stop_after` ends the path once that many neurons have entered (the rest keep their gradient score).
    """
    if method not in METHODS:
        raise InterplabError(f"unknown ranking method {method!r}; valid: {', '.join(METHODS)}")
    x, y = check_data(acts, labels)
    if method == "mean_diff":
        s = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    elif method == "f_stat":
        with warnings.catch_warnings():  # a constant column gives 0/0: scored 0 below
            warnings.simplefilter("ignore")
            s = f_classif(x, y)[0]
    elif method == "mutual_info":
        check_int("mi_max_rows", mi_max_rows, 2)
        if len(y) > mi_max_rows:  # uniform subsample, seeded: the k-NN estimate costs O(n log n) per neuron
            keep = np.sort(np.random.default_rng(derive_seed(seed, _MI)).permutation(len(y))[:mi_max_rows])
            x, y = x[keep], y[keep]
        s = mutual_info_classif(x, y, n_neighbors=3, random_state=derive_seed(seed, _MI) % 2**32)
    else:
        s = _l1_path_scores(x, y, seed, l1_grid, stop_after)
    return torch.as_tensor(np.nan_to_num(s, nan=0.0, posinf=np.finfo(np.float64).max), dtype=torch.float64)


def _l1_path_scores(x: np.ndarray, y: np.ndarray, seed: int, grid: int, stop_after: int | None) -> np.ndarray:
    check_int("l1_grid", grid, 2)
    n, d = x.shape
    w = np.where(y == 1, n / (2 * y.sum()), n / (2 * (n - y.sum())))  # balanced weights: the classes weigh equally
    # At β = 0 the balanced optimum of the intercept is p = ½, so the loss gradient is g; liblinear minimises
    # ‖β‖₁ + C Σ w_r loss_r, and β_j leaves 0 once C |g_j| > 1.
    g = np.abs(x.T @ (w * (y - 0.5)))
    gmax = g.max()
    tie = 0.5 * g / gmax if gmax > 0 else np.zeros(d)
    if gmax <= 0:
        return tie
    entered = np.full(d, -1)
    s = tie.copy()
    for i, C in enumerate(10 ** np.linspace(0, 3, grid) / gmax):
        with warnings.catch_warnings():  # liblinear may not converge at the loosest C: the entry order is what counts
            warnings.simplefilter("ignore")
            beta = np.abs(_logreg(float(C), True, seed).fit(x, y).coef_[0])
        new = (beta > 0) & (entered < 0)
        if new.any():
            entered[new] = i
            s[new] = (grid - i) + 0.5 * beta[new] / beta[new].max()
        if stop_after is not None and (entered >= 0).sum() >= stop_after:
            break
    return s


def rank_neurons(acts: Any, labels: Any, method: str, **kwargs: Any) -> Int[Tensor, " d"]:
    """All columns, best first, by `neuron_scores` (ties to the lower index)."""
    s = neuron_scores(acts, labels, method, **kwargs).numpy()
    return torch.as_tensor(np.lexsort((np.arange(len(s)), -s)), dtype=torch.long)


def random_rotation(d: int, seed: int = 0) -> Float[Tensor, "d d"]:
    """A Haar-random orthogonal d×d matrix: Q of the QR of a seeded Gaussian matrix, columns sign-fixed by diag(R)."""
    check_int("d", d, 1)
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(derive_seed(seed, _ROTATION)), dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(d, dtype=torch.float64))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class c: round(test_fraction · n_c) rows to test, clipped so test gets >= 1 and train >= 2 of each class
    (two to rank and fit)."""
    if not 0 < test_fraction < 1:
        raise InterplabError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = split(torch.as_tensor(labels), test_fraction, derive_seed(seed, _SPLIT), min_train=2)
    return train.numpy(), test.numpy()


def default_ks(d: int, max_k: int = 64) -> tuple[int, ...]:
    """1, 2, 4, ... up to min(max_k, d), and min(max_k, d) itself."""
    top = min(max_k, d)
    return tuple(sorted({2**i for i in range(int(math.log2(top)) + 1)} | {top}))


def _metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict[str, float]:
    return {"f1": float(skm.f1_score(y, pred, zero_division=0)), "mcc": float(skm.matthews_corrcoef(y, pred)),
            "precision": float(skm.precision_score(y, pred, zero_division=0)),
            "recall": float(skm.recall_score(y, pred, zero_division=0)),
            "pr_auc": float(skm.average_precision_score(y, score)), "accuracy": float(skm.accuracy_score(y, pred))}


def _probe_rows(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, condition: str,
                shuffle: int, ranking: dict[str, np.ndarray], ks: Sequence[int], seed: int) -> list[KSparseRow]:
    """The top-k probes of every ranking and the dense probe, fitted on (xtr, ytr) and scored on (xte, yte)."""
    rows = []
    jobs = [(m, k, r[:k]) for m, r in ranking.items() for k in ks] + [("all", xtr.shape[1], np.arange(xtr.shape[1]))]
    for method, k, cols in jobs:
        probe = _logreg(1.0, False, seed).fit(xtr[:, cols], ytr)
        m = _metrics(yte, probe.predict(xte[:, cols]), probe.decision_function(xte[:, cols]))
        rows.append(KSparseRow(condition, method, int(k), shuffle, tuple(int(c) for c in cols), **m))
    return rows


def ksparse_probe(acts: Float[Tensor, "n d"] | np.ndarray, labels: Int[Tensor, " n"] | np.ndarray, *,
                  ks: Sequence[int] | None = None, methods: Sequence[str] = METHODS, test_fraction: float = 0.2,
                  shuffles: int = 3, seed: int = 0, max_k: int = 64, rotate: bool = True,
                  mi_max_rows: int = MI_MAX_ROWS, l1_grid: int = L1_GRID) -> KSparseResult:
    """k-sparse probes for every method and k, with the rotated and shuffled-label controls (module docstring).

    ks: probe sizes, each in [1, d] and at most the number of train rows; default `default_ks(d, max_k)`.
    methods: ranking methods among METHODS. test_fraction: share of each class held out (stratified, seeded).
    shuffles: number of label permutations for the shuffled control (0 = none). rotate: add the rotated control.
    mi_max_rows, l1_grid: see `neuron_scores`.
    """
    x, y = check_data(acts, labels)
    n, d = x.shape
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise InterplabError(f"methods must be distinct names among {', '.join(METHODS)}; got {list(methods)}")
    check_int("shuffles", shuffles, 0)
    check_int("seed", seed, 0)
    check_int("max_k", max_k, 1)
    train, test = stratified_split(y, test_fraction, seed)
    ks = default_ks(d, max_k) if ks is None else tuple(ks)
    for k in ks:
        check_int("every k", k, 1)
    ks = tuple(sorted(set(ks)))
    if not ks or ks[-1] > d:
        raise InterplabError(f"ks must be non-empty and each k in [1, d={d}] (the number of neurons), got {list(ks)}")
    if ks[-1] > len(train):
        raise InterplabError(f"k={ks[-1]} is more neurons than training examples: the split leaves {len(train)} "
                             f"train rows (n={n}, test_fraction={test_fraction}); use k <= {len(train)} or more data")
    kw = {"seed": seed, "mi_max_rows": mi_max_rows, "l1_grid": l1_grid, "stop_after": ks[-1]}

    def zscore(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, sd = a[train].mean(0), a[train].std(0)
        sd = np.where(sd > 1e-12 * np.abs(mu).clip(1), sd, 1.0)  # a constant column stays 0, not 0/0
        return (a[train] - mu) / sd, (a[test] - mu) / sd

    def rankings(xtr: np.ndarray, ytr: np.ndarray) -> dict[str, np.ndarray]:
        return {m: rank_neurons(xtr, ytr, m, **kw).numpy() for m in methods}

    xtr, xte = zscore(x)
    ytr, yte = y[train], y[test]
    plain = rankings(xtr, ytr)
    rows = _probe_rows(xtr, ytr, xte, yte, "plain", -1, plain, ks, seed)
    rotated: dict[str, np.ndarray] = {}
    if rotate:
        rtr, rte = zscore(x @ random_rotation(d, seed).numpy())
        rotated = rankings(rtr, ytr)
        rows += _probe_rows(rtr, ytr, rte, yte, "rotated", -1, rotated, ks, seed)
    for s in range(shuffles):
        yperm = np.random.default_rng(derive_seed(seed, _SHUFFLE, s)).permutation(ytr)
        rows += _probe_rows(xtr, yperm, xte, yte, "shuffled", s, rankings(xtr, yperm), ks, seed)
    as_t = lambda r: {m: torch.as_tensor(v, dtype=torch.long) for m, v in r.items()}  # noqa: E731
    return KSparseResult(rows, as_t(plain), as_t(rotated), torch.as_tensor(train), torch.as_tensor(test), ks,
                         methods, d, float(yte.mean()), seed)


def planted_recall(result_or_ranking: KSparseResult | Sequence[int] | Tensor, planted: Sequence[int],
                   k: int) -> float | dict[str, float]:
    """|top-k ∩ planted| / |planted|: 1.0 at k = |planted| iff the planted neurons are ranked first.

    Given a KSparseResult, a dict over its methods (plain train rankings); given one ranking (best first), a float.
    """
    check_int("k", k, 1)
    planted_set = {int(p) for p in planted}
    if not planted_set:
        raise InterplabError("planted must name at least one neuron")
    if isinstance(result_or_ranking, KSparseResult):
        return {m: float(planted_recall(r, planted, k)) for m, r in result_or_ranking.rankings.items()}
    ranking = [int(i) for i in (result_or_ranking.tolist() if isinstance(result_or_ranking, Tensor)
                                else result_or_ranking)]
    if not planted_set <= set(range(len(ranking))) or k > len(ranking):
        raise InterplabError(f"planted neurons {sorted(planted_set)} and k={k} must be within the ranking's "
                             f"{len(ranking)} neurons")
    return len(planted_set & set(ranking[:k])) / len(planted_set)


def ksparse_curve(result: KSparseResult, path: str, metric: str = "f1") -> str:
    """Test `metric` against k (log₂ axis): per method the plain curve (solid) and the rotated control (dashed); the
    shuffled-label control as a grey band (min–max over methods and shuffles) with its mean; the dense probe and
    the coin-flip chance F1 as horizontal lines. Returns the path written."""
    if metric not in METRICS:
        raise InterplabError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    fig, ax = new_figure(9.5, 4.5)
    ks = np.array(result.ks)
    for i, m in enumerate(result.methods):
        ax.plot(ks, [result.score("plain", m, k, metric) for k in ks], "o-", color=f"C{i}", label=m)
        if result.rotated_rankings:
            ax.plot(ks, [result.score("rotated", m, k, metric) for k in ks], "s--", color=f"C{i}", alpha=0.7,
                    mfc="none", label=f"{m}, rotated")
    shuf = [[getattr(r, metric) for r in result.rows if r.condition == "shuffled" and r.method in result.methods
             and r.k == k] for k in ks]
    if shuf[0]:
        ax.fill_between(ks, [min(v) for v in shuf], [max(v) for v in shuf], color="gray", alpha=0.25,
                        label="shuffled labels (range)")
        ax.plot(ks, [float(np.mean(v)) for v in shuf], ":", color="gray")
    ax.axhline(result.score("plain", "all", result.d, metric), color="black", ls="-.", lw=1,
               label=f"all {result.d} neurons")
    if metric == "f1":
        ax.axhline(result.chance_f1, color="gray", lw=0.8, label="chance (coin flip)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (neurons in the probe)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"k-sparse probing (n_test={len(result.test_idx)}, d={result.d})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves fill [0, 1]
    return save_figure(fig, path)
