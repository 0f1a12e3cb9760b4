"""How much of a graph runs through features: circuit-tracer's replacement and completeness scores, and the error
share.

With Â the row-normalised |A| and influence = w Â + w Â² + ... (prune.py), over the unpruned graph:

    replacement  = I_tokens / (I_tokens + I_errors)
        the share of the end-to-end influence of the inputs on the logits that reaches them without passing
        through an error node (paths through error nodes end there: errors have no inputs);
    completeness = Σ_t (1 − Σ_{s ∈ errors} Â[t, s]) (influence[t] + w[t]) / Σ_t (influence[t] + w[t])
        each node's share of inputs that are not errors, weighted by how much it matters for the logits;
    error_share  = I_errors / (I_features + I_errors + I_tokens)
        the errors' part of all the influence the nodes carry.

Exact transcoders (zero errors) give replacement = completeness = 1 and error_share = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float

from interplab.graphs.prune import compute_influence, logit_weights, normalize_matrix


class GraphScores(NamedTuple):
    replacement: float
    completeness: float
    error_share: float

    def to_dict(self) -> dict[str, float]:
        return self._asdict()


def graph_scores(adjacency: Float[torch.Tensor, "n n"], logit_probs: Float[torch.Tensor, " k"], *,
                 n_features: int, n_errors: int, n_tokens: int) -> GraphScores:
    """The three scores of an unpruned graph with nodes ordered [features, errors, tokens, logits]."""
    n = adjacency.shape[0]
    w = logit_weights(n, logit_probs.to(adjacency.dtype))
    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, w)
    errors = slice(n_features, n_features + n_errors)
    tokens = slice(errors.stop, errors.stop + n_tokens)
    i_err, i_tok = float(influence[errors].sum()), float(influence[tokens].sum())
    i_feat = float(influence[:n_features].sum())
    replacement = i_tok / (i_tok + i_err) if i_tok + i_err > 0 else 0.0
    out = influence + w
    non_error = 1 - normalized[:, errors].sum(1)
    completeness = float((non_error * out).sum() / out.sum())
    total = i_feat + i_err + i_tok
    return GraphScores(replacement, completeness, i_err / total if total > 0 else 0.0)
