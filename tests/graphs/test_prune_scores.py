"""Pruning and scores on a five-node graph worked out by hand (nodes [f0, f1, e0, t0, logit])."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.graphs.prune import prune_graph
from interplab.graphs.scores import graph_scores

F0, F1, E0, T0, LOGIT = range(5)


def hand_graph() -> torch.Tensor:
    """f0 ← t0 (2); f1 ← t0 (1), f1 ← f0 (−3); logit ← f1 (3), logit ← e0 (1). Rows are targets."""
    a = torch.zeros(5, 5, dtype=torch.float64)
    a[F0, T0] = 2
    a[F1, T0], a[F1, F0] = 1, -3
    a[LOGIT, F1], a[LOGIT, E0] = 3, 1
    return a


PROB = torch.tensor([1.0], dtype=torch.float64)


def test_scores_by_hand():
    # row shares: f0 ← t0 1; f1 ← t0 .25, f0 .75; logit ← f1 .75, e0 .25.
    # influence: logit→ f1 .75, e0 .25; f1→ t0 .1875, f0 .5625; f0→ t0 .5625; so f0 .5625, f1 .75, e0 .25, t0 .75
    s = graph_scores(hand_graph(), PROB, n_features=2, n_errors=1, n_tokens=1)
    assert s.replacement == pytest.approx(0.75 / (0.75 + 0.25))
    out = 0.5625 + 0.75 + 0.25 + 0.75 + 1.0  # influence + logit weight
    assert s.completeness == pytest.approx((out - 0.25 * 1.0) / out)  # only the logit has error input (.25)
    assert s.error_share == pytest.approx(0.25 / (0.5625 + 0.75 + 0.25 + 0.75))


def test_node_and_edge_pruning_by_hand():
    # node influence sorted .75 (f1), .75 (t0), .5625 (f0), .25 (e0): cumulative .32, .65, .89 → 0.8 keeps f0, f1
    # (and t0, logit always). Pruned graph: edge scores logit←f1 1, f1←f0 .75, f0←t0 .75, f1←t0 .25 (sum 2.75);
    # cumulative .36, .64, .91 → 0.9 keeps the first three.
    res = prune_graph(hand_graph(), PROB, n_features=2, n_tokens=1, node_threshold=0.8, edge_threshold=0.9)
    assert res.node_mask.tolist() == [True, True, False, True, True]
    kept = {(int(t), int(s)) for t, s in res.edge_mask.nonzero()}
    assert kept == {(LOGIT, F1), (F1, F0), (F0, T0)}
    torch.testing.assert_close(res.influence, torch.tensor([0.5625, 0.75, 0.25, 0.75, 0.0], dtype=torch.float64))


def test_pruning_drops_features_cut_off_from_inputs_or_outputs():
    # edge threshold 0.3 keeps logit←f1 alone: f1 then has no input, so it goes, and f0 loses its only output
    res = prune_graph(hand_graph(), PROB, n_features=2, n_tokens=1, node_threshold=0.8, edge_threshold=0.3)
    assert res.node_mask.tolist() == [False, False, False, True, True]
    assert not res.edge_mask.any()


def test_pruning_refuses_thresholds_outside_0_1():
    with pytest.raises(InterplabError, match="node_threshold"):
        prune_graph(hand_graph(), PROB, n_features=2, n_tokens=1, node_threshold=1.5)
