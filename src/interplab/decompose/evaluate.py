"""`score`: every number of a decomposition against its ground-truth model, as JSON, with the random-basis control.

Per target: MMCS/ML2R (interplab.decompose.scores) beside a random rank-1 basis of the same size; live
subcomponents against the true count; the importance matrix on one-hot inputs. For the whole model: the output
distance with only the important subcomponents kept, with them ablated, with all on and all off.

Importance is SPD's causal importance g (live: g > threshold on some held-out input; kept: g > threshold) or, for
APD, the gradient attribution normalised by its largest value on the batch (live: chosen by batch top-k on some
held-out input; kept: chosen by batch top-k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.decompose.apd import attributions, batch_top_k
from interplab.decompose.scores import importances_on, mask_losses, score_columns
from interplab.decompose.spd import Decomposition
from interplab.decompose.truth import GroundTruthModel
from interplab.runs import JSONDict

EVAL_SEED_OFFSET = 10_007
"""The held-out batch is drawn with seed + this, so it is not a training batch."""


def importance_and_keep(decomposition: Decomposition, truth: GroundTruthModel, x: Tensor,
                        threshold: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per target: importances in [0, 1] on x [batch, C], and the 0/1 masks of the important subcomponents."""
    if decomposition.method == "spd":
        g = importances_on(decomposition, truth, x)
        return g, {name: (v > threshold).float() for name, v in g.items()}
    A = attributions(truth, decomposition.components, x)
    keep = batch_top_k(A, decomposition.settings.top_k)
    scaled = A / A.max().clamp_min(1e-12)
    return ({t: scaled for t in decomposition.targets}, {t: keep for t in decomposition.targets})


def score(decomposition: Decomposition, truth: GroundTruthModel, *, threshold: float = 0.1,
          eval_batch: int = 4096, seed: int = 0, has_truth: bool = True) -> JSONDict:
    """Every score of `decomposition` (see the module docstring) as a JSON-ready dict."""
    gen = torch.Generator(device=next(truth.model.parameters()).device).manual_seed(seed + EVAL_SEED_OFFSET)
    x = truth.sample(eval_batch, gen)
    imp, keep = importance_and_keep(decomposition, truth, x, threshold)
    one_hot, _ = importance_and_keep(decomposition, truth, truth.one_hot_inputs(), threshold)
    columns = score_columns(decomposition, truth, gen) if has_truth else {}
    layers: dict[str, JSONDict] = {}
    for name in decomposition.targets:
        live = keep[name].flatten(0, -2).amax(0) > 0
        layers[name] = {**columns.get(name, {}), "live": int(live.sum()), "live_index": live.nonzero()[:, 0].tolist(),
                        "ci_one_hot": one_hot[name].flatten(0, -2).tolist(),
                        "mean_active": float(keep[name].flatten(0, -2).sum(-1).mean())}
    return {"layers": layers, "losses": mask_losses(decomposition, truth, x, keep, gen),
            "final_train_losses": decomposition.history[-1] if decomposition.history else {},
            "steps": decomposition.settings.steps, "seconds": decomposition.seconds}


def headline(scores: JSONDict, target: str) -> tuple[float | None, float | None]:
    """(MMCS, ML2R) of one target of a `score` result."""
    layer = scores["layers"][target]  # type: ignore[index]
    return layer.get("mmcs"), layer.get("ml2r")  # type: ignore[union-attr]
