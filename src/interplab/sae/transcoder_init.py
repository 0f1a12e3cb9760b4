"""A transcoder's initial encoder scale: the least-squares fit of its first prediction to the target.

An SAE starts with W_enc = W_decᵀ, so its first reconstruction is x projected onto the directions it picked: a
sensible start when input and output are the same vector. A transcoder maps the MLP's input x to its output y,
another vector, and with the same start it outputs ~x's picked directions at x's scale: further from y than the
constant ȳ (FVU ≈ 1.9 at SmolLM2-135M layer 6), so the first steps only undo the initialisation.

For every architecture here the prediction at initialisation is homogeneous in the encoder's scale: with b_enc = 0,
TopK/BatchTopK pick the same latents from ε·pre, ReLU(ε·pre) = ε·ReLU(pre), and JumpReLU gives ε·f once its
thresholds are scaled by ε as well. So scaling the encoder by ε gives

    ŷ(ε) = ε·g + b_dec,      g = the first prediction minus b_dec, at ε = 1,

and the ε that minimises Σ‖y − ŷ(ε)‖² on the initialisation sample (b_dec = the target's mean, ȳ) is

    ε* = Σ⟨y − ȳ, g⟩ / Σ‖g‖²,      FVU(ε*) = 1 − Σ⟨y − ȳ, g⟩² / (Σ‖g‖² · Σ‖y − ȳ‖²)  ≤ 1.

A negative ε* (the picked directions point away from y) is taken as a flip of the decoder rows' signs, which keeps
them unit-norm, and |ε*| on the encoder. No constant is tuned: the start is the best prediction of its family, at
most as far from y as the mean.
"""

from __future__ import annotations

import copy
import math

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.sae.base import SparseAutoencoder
from interplab.sae.jumprelu import JumpReLUSAE

MIN_SCALE = 1e-6
"""The smallest encoder scale used: a g orthogonal to y would give ε* = 0, with no gradient through the codes."""


@torch.no_grad()
def initial_prediction(sae: SparseAutoencoder, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_in"]
                       ) -> Float[Tensor, "n d_in"]:
    """g: the SAE's training-time prediction of y from x minus b_dec, on a copy (training forwards update state,
    such as BatchTopK's running threshold, that the real SAE must not see before its first step)."""
    probe = copy.deepcopy(sae)
    return probe.training_forward(x, target=y).recon - probe.b_dec


@torch.no_grad()
def fit_initial_scale_(sae: SparseAutoencoder, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_in"]) -> float:
    """Scale a freshly initialised transcoder's encoder by the least-squares ε* of the module docstring (flipping
    the decoder rows if ε* < 0), in place; returns ε*. Call it after `initialize` (b_enc = 0, b_dec = ȳ)."""
    g = initial_prediction(sae, x, y).double()                       # [n d_in]
    centred = (y - y.mean(0)).double()                               # [n d_in]
    g_sq = float(g.pow(2).sum())
    eps = float((centred * g).sum()) / g_sq if g_sq > 0 else 0.0
    if eps < 0:
        sae.W_dec.neg_()
    scale = max(abs(eps), MIN_SCALE)
    sae.W_enc.mul_(scale)
    sae.b_enc.mul_(scale)
    if isinstance(sae, JumpReLUSAE):
        sae.log_threshold.add_(math.log(scale))
    return eps
