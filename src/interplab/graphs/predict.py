"""What a graph predicts for zeroing a feature: its effect on a logit through every path of the linearised model.

In the replacement model a feature s contributes A[t, s] to target t's pre-activation, in proportion to its
activation a_s. Zeroing s changes its activation by −a_s; if each downstream feature responds linearly (slope 1, as
an active ReLU latent does), the changes spread as Δa_t = Σ_{s'} (A[t, s'] / a_{s'}) Δa_{s'} in layer order, and the
logit (against the mean logit) moves by Σ_{s'} (A[logit, s'] / a_{s'}) Δa_{s'}. Comparing this with zeroing the
feature in the real model (interventions.py) checks the graph's claim: they differ where attention, norms or the
features' nonlinearities respond.
"""

from __future__ import annotations

import torch

from interplab.graphs.attribution import AttributionGraph


def predicted_logit_change(graph: AttributionGraph, feature: int, logit: int) -> float:
    """Δ(logit − mean logit) the graph predicts for zeroing feature node `feature` (index among the features);
    `logit` is the logit node's index among the logit nodes."""
    n_f = graph.n_features
    acts = graph.rep.feat_act.to(graph.adjacency).cpu()
    per_unit = graph.adjacency[:n_f, :n_f] / acts[None]  # A[t, s] / a_s
    start = torch.zeros(n_f, dtype=graph.adjacency.dtype)
    start[feature] = -acts[feature]
    delta = start.clone()
    for _ in range(graph.n_layers):  # edges go to later layers only: n_layers steps reach every path
        delta = per_unit @ delta + start
    row = graph.adjacency[graph.logit_slice.start + logit, :n_f] / acts
    return float(row @ delta)
