"""k-sparse probing: known answers on N(0, 1) activations whose label is carried by planted neurons — the rankings find
them, a probe on them matches the dense probe, the rotated control loses the small-k advantage and the shuffled-label
control sits at chance — plus exact statistics on tiny inputs, the controls' mechanics and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import f_oneway

from interplab.errors import InterplabError
from interplab.probes.ksparse import (
    METHODS,
    default_ks,
    ksparse_curve,
    ksparse_probe,
    neuron_scores,
    planted_recall,
    random_rotation,
    rank_neurons,
    stratified_split,
)

PAIR = (7, 42)


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair_result():
    """label = 1[x_7 + x_42 > 0]: two neurons decide it exactly, no other carries any signal."""
    x = gaussian(2000, 100, 0)
    y = (x[:, PAIR[0]] + x[:, PAIR[1]] > 0).long()
    return ksparse_probe(x, y, ks=(1, 2, 4, 8), shuffles=2, mi_max_rows=800, seed=0)


@pytest.fixture(scope="module")
def shift_result():
    """One neuron shifted by 2·label (d' = 2): k = 1 already reads all the signal there is."""
    x = gaussian(2000, 100, 1)
    y = (torch.rand(2000, generator=torch.Generator().manual_seed(2)) < 0.5).long()
    x[:, 7] += 2 * y
    return ksparse_probe(x, y, ks=(1, 2, 4), methods=("mean_diff", "f_stat"), shuffles=3, seed=0)


def test_every_ranking_puts_the_planted_neurons_first(pair_result):
    assert planted_recall(pair_result, PAIR, 2) == {m: 1.0 for m in METHODS}
    for m in METHODS:
        assert set(pair_result.rankings[m][:2].tolist()) == set(PAIR)
        assert planted_recall(pair_result.rankings[m], PAIR, 1) == 0.5
    assert sorted(pair_result.rankings["f_stat"].tolist()) == list(range(100))  # a permutation of all neurons


def test_probe_on_the_planted_neurons_matches_the_dense_probe(pair_result):
    full = pair_result.score("plain", "all", 100)
    assert full > 0.93
    for m in METHODS:
        assert pair_result.score("plain", m, 2) >= full - 0.02
        # One of two equal halves of the signal: accuracy 1/2 + arcsin(1/√2)/π = 0.75.
        assert 0.65 < pair_result.score("plain", m, 1) < 0.82
    row = pair_result.select("plain", "f_stat")[1]
    assert row.k == 2 and set(row.neurons) == set(PAIR)
    assert row.mcc > 0.9 and row.pr_auc > 0.95 and row.precision > 0.9 and row.recall > 0.9 and row.accuracy > 0.95


def test_rotation_spreads_the_signal_and_loses_the_sparse_advantage(pair_result, shift_result):
    for m in METHODS:
        assert pair_result.score("plain", m, 2) - pair_result.score("rotated", m, 2) > 0.2
    # The dense probe is rotation-invariant (up to the z-scoring).
    assert pair_result.score("rotated", "all", 100) == pytest.approx(pair_result.score("plain", "all", 100), abs=0.02)
    for m in ("mean_diff", "f_stat"):
        plain, rotated = shift_result.score("plain", m, 1), shift_result.score("rotated", m, 1)
        assert plain > 0.75 and plain - rotated > 0.1
        assert shift_result.rankings[m][0] == 7


def test_shuffled_labels_score_at_chance(pair_result, shift_result):
    for res in (pair_result, shift_result):
        shuffled = [r for r in res.rows if r.condition == "shuffled"]
        assert {r.shuffle for r in shuffled} == set(range(len({r.shuffle for r in shuffled})))
        # Medians: a shuffle that ranks a planted neuron high by chance (here 7 at rank 2 of pair_result's shuffle 0)
        # scores |MCC| ~0.3 with a random sign; that tail is why the control is a distribution over shuffles.
        assert abs(np.median([r.mcc for r in shuffled])) < 0.06
        assert abs(np.median([r.f1 for r in shuffled]) - res.chance_f1) < 0.05
        plain_best = max(res.score("plain", m, k) for m in res.methods for k in res.ks)
        assert max(r.f1 for r in shuffled if r.k <= 2) < plain_best - 0.1


def test_rankings_use_the_train_rows_only(pair_result):
    x = gaussian(2000, 100, 0)
    y = (x[:, PAIR[0]] + x[:, PAIR[1]] > 0).long()
    tr, te = pair_result.train_idx, pair_result.test_idx
    assert len(tr) + len(te) == 2000 and not set(tr.tolist()) & set(te.tolist())
    xtr = x[tr].double()
    z = (xtr - xtr.mean(0)) / xtr.std(0, unbiased=False)
    assert torch.equal(rank_neurons(z, y[tr], "f_stat"), pair_result.rankings["f_stat"])
    assert torch.equal(rank_neurons(z, y[tr], "mean_diff"), pair_result.rankings["mean_diff"])


def test_f_stat_and_mean_diff_exact_on_a_tiny_example():
    x = np.array([[1.0, 0.5, 3.0], [2.0, -1.0, 3.5], [0.0, 2.0, 2.0], [5.0, 1.0, 0.0],
                  [6.0, 0.0, 1.0], [4.5, 1.5, 1.5], [5.5, -0.5, 0.5]])
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    f = neuron_scores(x, y, "f_stat").numpy()
    want = [f_oneway(x[y == 0, j], x[y == 1, j]).statistic for j in range(3)]
    np.testing.assert_allclose(f, want, rtol=1e-10)
    md = neuron_scores(torch.as_tensor(x), torch.as_tensor(y), "mean_diff").numpy()
    np.testing.assert_allclose(md, np.abs(x[y == 1].mean(0) - x[y == 0].mean(0)), rtol=1e-12)
    assert rank_neurons(x, y, "f_stat").tolist() == list(np.argsort(-np.asarray(want), kind="stable"))


def test_l1_path_orders_by_entry_and_mutual_info_finds_the_signal():
    g = np.random.default_rng(3)
    x = g.standard_normal((600, 20))
    y = (3 * x[:, 5] + 1.5 * x[:, 11] + 0.3 * g.standard_normal(600) > 0).astype(int)
    s = neuron_scores(x, y, "l1_path").numpy()
    assert rank_neurons(x, y, "l1_path")[:2].tolist() == [5, 11]  # the strong neuron enters the path first
    assert s[5] > s[11] > np.delete(s, [5, 11]).max() and s[11] >= 1  # an entered neuron scores >= 1
    assert rank_neurons(x, y, "mutual_info")[:2].tolist() == [5, 11]


def test_random_rotation_is_orthogonal_and_seeded():
    Q = random_rotation(30, seed=4)
    torch.testing.assert_close(Q @ Q.T, torch.eye(30, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.equal(Q, random_rotation(30, seed=4)) and not torch.equal(Q, random_rotation(30, seed=5))


def test_split_is_stratified_and_deterministic():
    y = np.array([0] * 50 + [1] * 10)
    tr, te = stratified_split(y, 0.2, seed=0)
    assert (y[te] == 1).sum() == 2 and (y[te] == 0).sum() == 10 and len(tr) == 48
    assert all(np.array_equal(a, b) for a, b in zip((tr, te), stratified_split(y, 0.2, seed=0)))
    assert default_ks(100) == (1, 2, 4, 8, 16, 32, 64) and default_ks(12) == (1, 2, 4, 8, 12)


def test_same_seed_same_rows():
    x = gaussian(300, 10, 6)
    y = (x[:, 2] > 0).long()
    a = ksparse_probe(x, y, ks=(1, 3), methods=("f_stat",), shuffles=1, seed=2)
    b = ksparse_probe(x, y, ks=(1, 3), methods=("f_stat",), shuffles=1, seed=2)
    assert a.rows == b.rows
    assert len(a.rows) == 3 * 3  # (2 ks + dense probe) × (plain, rotated, 1 shuffle)
    assert a.to_json()["rows"][0]["neurons"] == [2]


def test_curve_figure(pair_result, tmp_path):
    out = ksparse_curve(pair_result, str(tmp_path / "ksparse.png"))
    data = (tmp_path / "ksparse.png").read_bytes()
    assert out.endswith("ksparse.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(InterplabError, match="valid: f1, mcc"):
        ksparse_curve(pair_result, str(tmp_path / "x.png"), metric="auc")


def test_errors_say_what_is_wrong_and_what_is_valid():
    x = gaussian(40, 6, 7)
    y = torch.tensor([0, 1] * 20)
    with pytest.raises(InterplabError, match=r"labels hold only class 0 \(40 examples\)"):
        ksparse_probe(x, torch.zeros(40, dtype=torch.long))
    with pytest.raises(InterplabError, match=r"class 1 has 2 example\(s\); a held-out split needs at least 3"):
        ksparse_probe(x, torch.tensor([1, 1] + [0] * 38))
    with pytest.raises(InterplabError, match=r"each k in \[1, d=6\]"):
        ksparse_probe(x, y, ks=(1, 8))
    with pytest.raises(InterplabError, match="k=40 is more neurons than training examples.*32 train rows"):
        ksparse_probe(gaussian(40, 50, 8), y, ks=(40,))
    with pytest.raises(InterplabError, match="mean_diff, f_stat, mutual_info, l1_path"):
        ksparse_probe(x, y, methods=("lasso",))
    with pytest.raises(InterplabError, match="unknown ranking method 'svm'; valid: mean_diff"):
        neuron_scores(x, y, "svm")
    with pytest.raises(InterplabError, match="binary 0/1"):
        ksparse_probe(x, y + 1)
    with pytest.raises(InterplabError, match=r"test_fraction must be in \(0, 1\)"):
        ksparse_probe(x, y, test_fraction=1.0)
    with pytest.raises(InterplabError, match=r"labels must be \[n\] = \[40\]"):
        ksparse_probe(x, y[:-1])
    with pytest.raises(InterplabError, match="within the ranking's 6 neurons"):
        planted_recall(torch.arange(6), [9], 1)
