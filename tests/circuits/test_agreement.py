"""Agreement statistics on hand-made arrays, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.circuits.agreement import agreement
from interplab.circuits.agreement_figures import agreement_scatter
from interplab.errors import InterplabError

ACT = torch.tensor([0.9, -0.5, 0.1, 0.3, -0.05, 0.0])
ATTR = torch.tensor([0.7, -0.6, 0.2, 0.05, 0.0, 0.01])
LABELS = [f"L0H{i}" for i in range(6)]


def test_spearman_pearson_top_k_and_worst_nodes_by_hand():
    result = agreement(ACT, ATTR, LABELS, k=3, n_worst=2)
    # ranks: act [6, 1, 4, 5, 2, 3], attr [6, 1, 5, 4, 2, 3]; Σd² = 2; ρ = 1 − 6·2 / (6·35)
    assert result.spearman == pytest.approx(1 - 12 / 210, abs=1e-12)
    a, b = ACT.double().tolist(), ATTR.double().tolist()
    ma, mb = sum(a) / 6, sum(b) / 6
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    r = cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    assert result.pearson == pytest.approx(r, abs=1e-6)
    # top-3 by |value|: act {0, 1, 3}, attr {0, 1, 2}
    assert (result.k, result.top_k_overlap, result.n_nodes) == (3, pytest.approx(2 / 3), 6)
    assert result.max_abs_error == pytest.approx(0.25, abs=1e-6)
    assert [label for label, _, _ in result.worst_nodes] == ["L0H3", "L0H0"]
    assert result.worst_nodes[0][1:] == pytest.approx((0.3, 0.05), abs=1e-6)


def test_top_k_ranks_by_magnitude_and_k_is_capped():
    """A large negative effect counts as important; k larger than the number of nodes uses them all."""
    assert agreement(ACT, ATTR, LABELS, k=2).top_k_overlap == 1.0  # {0, 1} both
    flipped = agreement(ACT, -ATTR, LABELS, k=2)
    assert flipped.top_k_overlap == 1.0 and flipped.spearman < 0
    everything = agreement(ACT, ATTR, LABELS, k=50)
    assert (everything.k, everything.top_k_overlap) == (6, 1.0)


def test_spearman_gives_ties_their_mean_rank():
    # act ranks [1.5, 1.5, 3], attr ranks [1, 2, 3]: centred [-.5, -.5, 1] · [-1, 0, 1] = 1.5 over √1.5·√2
    result = agreement(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), ["a", "b", "c"])
    assert result.spearman == pytest.approx(1.5 / math.sqrt(3.0), abs=1e-12)


def test_a_constant_estimate_has_no_correlation():
    result = agreement(ACT, torch.zeros(6), LABELS)
    assert math.isnan(result.spearman) and math.isnan(result.pearson)
    assert result.max_abs_error == pytest.approx(0.9)


def test_grid_shaped_inputs_flatten_in_label_order():
    act, attr = ACT.view(2, 3), ATTR.view(2, 3)
    assert agreement(act, attr, LABELS, k=3) == agreement(ACT, ATTR, LABELS, k=3)


@pytest.mark.parametrize("args, message", [
    ((ACT, ATTR[:5], LABELS), "same shape"),
    ((ACT, ATTR, LABELS[:5]), "5 labels for 6 nodes"),
    ((ACT[:1], ATTR[:1], LABELS[:1]), "at least 2 nodes"),
    ((ACT, ATTR.clone().fill_(float("nan")), LABELS), "finite"),
])
def test_bad_input_is_refused_in_one_line(args, message):
    with pytest.raises(InterplabError, match=message) as err:
        agreement(*args)
    assert "\n" not in str(err.value)


def test_scatter_writes_a_png(tmp_path):
    result = agreement(ACT, ATTR, LABELS, k=3)
    path = agreement_scatter(ACT, ATTR, result, str(tmp_path / "scatter.png"), title="head_out")
    data = (tmp_path / "scatter.png").read_bytes()
    assert path == str(tmp_path / "scatter.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
