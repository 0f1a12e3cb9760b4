"""Pruning an attribution graph by indirect influence on the logits (circuit-tracer's `prune_graph`).

With Â the adjacency with absolute values and each row normalised to sum 1 (each target's inputs as shares), the
total influence of the nodes on the logits, weighted by the logits' probabilities w, is

    influence = w Â + w Â² + w Â³ + ...  =  w ((I − Â)⁻¹ − I),

finite because the graph is acyclic (Â is nilpotent). Nodes are kept from the most influential down until their
influence reaches `node_threshold` of the total (tokens and logits always stay); then each remaining edge gets the
score Â[t, s] · (influence[t] + w[t]) on the pruned graph and edges are kept up to `edge_threshold` of the total
score; finally feature and error nodes left without an outgoing edge, and features without an incoming one, are
dropped until nothing changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float

from interplab.errors import InterplabError


class PruneResult(NamedTuple):
    node_mask: Bool[torch.Tensor, " n"]
    """Nodes kept."""
    edge_mask: Bool[torch.Tensor, "n n"]
    """Edges kept, [target, source] like the adjacency."""
    influence: Float[torch.Tensor, " n"]
    """Each node's indirect influence on the logits (before pruning)."""
    cumulative: Float[torch.Tensor, " n"]
    """Each node's place in the influence ranking as the share of total influence up to and including it."""


def normalize_matrix(adjacency: Float[torch.Tensor, "n n"]) -> Float[torch.Tensor, "n n"]:
    """|A| with each row (a target's inputs) divided by its sum (rows of zeros stay zero)."""
    a = adjacency.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))  # in place: graphs of 10⁴ nodes hold 10⁸ entries


def compute_influence(normalized: Float[torch.Tensor, "n n"], weights: Float[torch.Tensor, " n"],
                      max_iter: int = 1000) -> Float[torch.Tensor, " n"]:
    """w Â + w Â² + ... by repeated products (the series ends: the graph is acyclic)."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise InterplabError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def logit_weights(n: int, logit_probs: Float[torch.Tensor, " k"]) -> Float[torch.Tensor, " n"]:
    """w: the logits' probabilities on the last k nodes, zero elsewhere."""
    w = torch.zeros(n, dtype=logit_probs.dtype)
    w[n - logit_probs.shape[0]:] = logit_probs
    return w


def find_threshold(scores: Float[torch.Tensor, " m"], share: float) -> torch.Tensor:
    """The score above which the highest scores add up to `share` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def prune_graph(adjacency: Float[torch.Tensor, "n n"], logit_probs: Float[torch.Tensor, " k"], *, n_features: int,
                n_tokens: int, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Node and edge masks of the pruned graph (see the module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InterplabError(f"{name} must lie in [0, 1], got {value}")
    n, n_logits = adjacency.shape[0], logit_probs.shape[0]
    keep_always = n_logits + n_tokens
    w = logit_weights(n, logit_probs.to(adjacency.dtype))
    influence = compute_influence(normalize_matrix(adjacency), w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[n - keep_always:] = True

    normalized = adjacency.abs()
    normalized[~node_mask] = 0
    normalized[:, ~node_mask] = 0
    normalized.div_(normalized.sum(1, keepdim=True).clamp(min=1e-10))
    edge_scores = normalized.mul_((compute_influence(normalized, w) + w)[:, None])  # in place: the shares go
    nonzero = edge_scores[edge_scores > 0]  # sorting only these: most of the n² entries are zero
    edge_mask = edge_scores >= (find_threshold(nonzero, edge_threshold) if nonzero.numel() else 1.0)
    edge_mask &= edge_scores != 0
    del edge_scores, normalized

    while True:  # drop nodes left without outgoing (features, errors) or incoming (features) edges
        before = node_mask.clone()
        node_mask[: n - keep_always] &= edge_mask[:, : n - keep_always].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        if torch.equal(before, node_mask):
            break

    values, order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = values.cumsum(0) / values.sum().clamp(min=1e-30)
    return PruneResult(node_mask, edge_mask, influence, cumulative)
