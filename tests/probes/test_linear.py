"""Linear probes on planted directions (known answers), their controls, and their errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from interplab.errors import InterplabError
from interplab.probes.linear import (
    binary_scores,
    check_binary,
    diff_of_means,
    logistic_probe,
    projection_histogram,
    roc_auc,
    split,
)

D = 64


def _unit(seed: int) -> torch.Tensor:
    u = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


def planted_shift(n: int = 1000, delta: float = 3.0, seed: int = 0):
    """acts = N(0, I) + label · δ · u: the Bayes-optimal direction is u."""
    g = torch.Generator().manual_seed(seed)
    u = _unit(seed + 100)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, D, generator=g) + delta * y[:, None] * u, y, u


def planted_sign(n: int = 1000, seed: int = 0):
    """label = 1[acts · u > 0] with acts ~ N(0, I)."""
    u = _unit(seed + 200)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, (x @ u > 0).long(), u


def test_diff_of_means_recovers_the_planted_direction_beside_chance_controls():
    x, y, u = planted_shift()
    r = diff_of_means(x, y)
    assert float(r.direction @ u) >= 0.95
    assert torch.allclose(r.direction, r.raw / r.raw.norm())
    assert r.scores["auc"] > 0.95 and r.scores["accuracy"] > 0.9
    assert r.n_train + r.n_test == len(y) and len(r.projections[0]) + len(r.projections[1]) == r.n_test
    for control in ("shuffled", "random"):
        for metric in ("auc", "accuracy"):
            c = r.controls[control][metric]
            assert abs(c.mean - 0.5) < 0.06, (control, metric, c)
            assert c.max < r.scores[metric] and c.p_value == 1 / (1 + len(c.scores))
    assert len(r.controls["shuffled"]["auc"].scores) == 10 and len(r.controls["random"]["auc"].scores) == 100


def test_logistic_recovers_the_planted_direction_in_the_original_space():
    for x, y, u in (planted_shift(), planted_sign()):
        x = x * torch.linspace(0.5, 3, D)  # unequal scales: the direction must be un-standardised to match
        u = u / torch.linspace(0.5, 3, D)  # the label's direction in the rescaled space (for the sign case)
        u = u / u.norm()
        r = logistic_probe(x, y, Cs=(0.01, 1.0, 100.0), n_shuffles=5)
        assert float(r.direction @ u) >= 0.95, float(r.direction @ u)
        assert r.scores["accuracy"] > 0.85 and [row["C"] for row in r.sweep] == [0.01, 1.0, 100.0]
        assert r.C in (0.01, 1.0, 100.0) and r.scores["auc"] == next(s["auc"] for s in r.sweep if s["C"] == r.C)
        shuffled = r.controls["shuffled"]["accuracy"]
        assert abs(shuffled.mean - 0.5) < 0.06 and shuffled.max < r.scores["accuracy"]
        assert abs(r.controls["random"]["auc"].mean - 0.5) < 0.06
        logits = x.double() @ r.coef.double() + r.intercept
        torch.testing.assert_close(logits, torch.as_tensor(r.estimator.decision_function(x.double().numpy())),
                                   rtol=1e-4, atol=1e-4)


def test_no_signal_scores_like_its_controls():
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 2, (400,), generator=torch.Generator().manual_seed(4))
    r = diff_of_means(x, y, n_shuffles=20)
    assert abs(r.scores["auc"] - 0.5) < 0.12 and r.controls["shuffled"]["auc"].p_value > 0.05
    r = logistic_probe(x, y, Cs=(0.01, 1.0), n_shuffles=5)
    assert abs(r.scores["auc"] - 0.5) < 0.12


def test_in_sample_scores_are_optimistic_and_the_shuffled_control_shows_it():
    """Few examples in d = 64: a direction fitted and scored on the same data separates even random labels."""
    x = torch.randn(60, D, generator=torch.Generator().manual_seed(5))
    y = torch.arange(60) % 2
    r = diff_of_means(x, y, test_fraction=0)
    assert r.scores["auc"] > 0.9 and r.controls["shuffled"]["auc"].mean > 0.9 and r.n_train == r.n_test == 60


def test_roc_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    s = torch.randint(0, 5, (200, 3), generator=g).double()  # many ties
    got = roc_auc(s, y)
    for k in range(3):
        assert float(got[k]) == pytest.approx(roc_auc_score(y.numpy(), s[:, k].numpy()))
    assert binary_scores(torch.tensor([0.1, 0.9, 0.8, 0.2]), torch.tensor([0, 1, 0, 0]), 0.5) == pytest.approx(
        {"accuracy": 0.75, "f1": 2 / 3, "auc": 1.0})


def test_split_is_stratified_and_seeded():
    y = torch.tensor([0] * 30 + [1] * 10)
    train, test = split(y, 0.25, seed=1)
    assert sorted(train.tolist() + test.tolist()) == list(range(40))
    assert (y[test] == 1).sum() == 2 and (y[test] == 0).sum() == 8
    assert torch.equal(split(y, 0.25, seed=1)[1], test) and not torch.equal(split(y, 0.25, seed=2)[1], test)
    with pytest.raises(InterplabError, match=r"test_fraction must be in \[0, 1\)"):
        split(y, 1.0, 0)
    with pytest.raises(InterplabError, match="class 1 has 1 example"):
        split(torch.tensor([0, 0, 0, 1]), 0.5, 0)


def test_labels_must_be_binary_with_both_classes():
    x = torch.randn(6, 3)
    with pytest.raises(InterplabError, match=r"only class 1 \(6 examples\)"):
        diff_of_means(x, torch.ones(6, dtype=torch.long))
    with pytest.raises(InterplabError, match=r"binary 0/1, got classes \[0, 1, 2\].*labels == k"):
        logistic_probe(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(InterplabError, match=r"labels must be \[n\] = \[6\]"):
        check_binary(x, torch.tensor([0, 1]))
    with pytest.raises(InterplabError, match="non-empty tensor"):
        check_binary(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(InterplabError, match="NaN or inf"):
        check_binary(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))
    assert check_binary(x[:2], torch.tensor([True, False]))[1].tolist() == [1, 0]
    with pytest.raises(InterplabError, match="Cs must be a non-empty list of positive numbers"):
        logistic_probe(x, torch.tensor([0, 1] * 3), Cs=(0.0,))


def test_projection_histogram_writes_a_png(tmp_path):
    x, y, _ = planted_shift(n=200)
    path = projection_histogram(diff_of_means(x, y), str(tmp_path / "hist.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
