"""MMCS and ML2R on hand-made matrices, and the random rank-1 basis control."""

from __future__ import annotations

import math

import torch

from interplab.decompose.scores import column_scores, random_rank_one


def _tms_truth(W: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ai,ij->iaj", W, torch.eye(W.shape[1]))


def test_exact_columns_at_half_norm_give_mmcs_1_and_ml2r_half():
    W = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    truth = _tms_truth(W)
    subcomponents = torch.cat([0.5 * truth, torch.zeros(2, 2, 3)])     # 5 subcomponents, two empty
    s = column_scores(subcomponents, truth)
    assert math.isclose(s.mmcs, 1.0, abs_tol=1e-6) and math.isclose(s.ml2r, 0.5, abs_tol=1e-6)
    assert s.match == [0, 1, 2]


def test_a_rotated_column_scores_its_cosine_and_the_column_formula_ignores_other_columns():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    truth = _tms_truth(W)
    # One subcomponent reads input 0 and writes at 60° from column 0 with norm 2; it also touches column 1 weakly,
    # which the column formula for mechanism 0 ignores (it only reads along e_0).
    u = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)]) * 2
    sub = torch.stack([torch.outer(u, torch.tensor([1.0, 0.1])), truth[1]])
    s = column_scores(sub, truth)
    assert math.isclose(s.max_cos[0], 0.5, abs_tol=1e-6) and math.isclose(s.max_cos[1], 1.0, abs_tol=1e-6)
    assert math.isclose(s.mmcs, 0.75, abs_tol=1e-6)
    assert math.isclose(s.ml2r, (2.0 + 1.0) / 2, abs_tol=1e-6)


def test_rank_two_truth_has_no_column_score():
    assert column_scores(torch.randn(4, 2, 2), torch.eye(2)[None]) is None


def test_random_basis_is_rank_one_with_the_given_norms():
    like = torch.randn(6, 3, 4)
    r = random_rank_one(like, torch.Generator().manual_seed(0))
    assert torch.allclose(r.flatten(1).norm(dim=1), like.flatten(1).norm(dim=1), atol=1e-5)
    assert all(int(torch.linalg.matrix_rank(m)) == 1 for m in r)
