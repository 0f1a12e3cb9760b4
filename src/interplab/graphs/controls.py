"""The control dictionary: random directions with each transcoder's shapes, per-latent norms and biases.

Latent i of a control transcoder reads along a random unit direction times ‖W_enc[:, i]‖ and writes along another
random unit direction times ‖W_dec[i]‖; biases, thresholds (JumpReLU), k (TopK) and W_skip are the real
transcoder's. For a cross-layer transcoder, each feature's decoder into each output layer j is its own random
direction times ‖W_dec[i][f, j − i]‖ (so how much a feature writes into each later layer is kept). Its graph on
the same prompt is what "explained by features" looks like when the features mean nothing: the error nodes then
carry what the dictionary misses, and the scores beside it are a floor.
"""

from __future__ import annotations

import copy

import torch

from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.mlp_dictionary import Dictionary, Transcoders
from interplab.sae.transcoder import Transcoder


def _random_like(weight: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Random directions along `dim`, each scaled to the norm `weight` has there."""
    noise = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    noise = noise / noise.norm(dim=dim, keepdim=True).clamp(min=1e-12)
    return (noise * weight.detach().double().cpu().norm(dim=dim, keepdim=True)).to(weight)


@torch.no_grad()
def norm_matched_random(tc: Transcoder, seed: int) -> Transcoder:
    """A copy of `tc` whose encoder columns and decoder rows point in random directions of the same norms."""
    gen = torch.Generator().manual_seed(seed)
    control = copy.deepcopy(tc)
    control.sae.W_enc.copy_(_random_like(tc.sae.W_enc, 0, gen))
    control.sae.W_dec.copy_(_random_like(tc.sae.W_dec, 1, gen))
    return control


@torch.no_grad()
def norm_matched_random_clt(clt: CrossLayerTranscoder, seed: int) -> CrossLayerTranscoder:
    """A copy of the CLT whose encoder columns and per-output-layer decoder rows point in random directions of the
    same norms (each source layer seeded on its own, as `control_transcoders` seeds each transcoder)."""
    control = copy.deepcopy(clt)
    for layer in range(clt.n_layers):
        gen = torch.Generator().manual_seed(seed * 100_003 + layer)
        control.W_enc[layer].copy_(_random_like(clt.W_enc[layer], 0, gen))
        control.W_dec[layer].copy_(_random_like(clt.W_dec[layer], 2, gen))
    return control


def control_transcoders(transcoders: Dictionary, seed: int = 0) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """The norm-matched random control of per-layer transcoders (one per layer, seeded per layer, so each layer's
    control is reproducible) or of a cross-layer transcoder."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return norm_matched_random_clt(transcoders, seed)
    per_layer: Transcoders = transcoders
    return {layer: norm_matched_random(tc, seed * 100_003 + layer) for layer, tc in per_layer.items()}
