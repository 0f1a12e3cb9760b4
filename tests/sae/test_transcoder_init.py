"""The fitted transcoder start: the first prediction is ȳ + ε*·g with ε* the least-squares factor, for every arch."""

from __future__ import annotations

import copy

import pytest
import torch

from interplab.errors import InterplabError
from interplab.sae.config import SAEConfig
from interplab.sae.registry import make_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.transcoder_init import fit_initial_scale_, initial_prediction

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
D, F, N = 16, 48, 512


def pairs(sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sign·(x's projection on a few directions) + noise, around a non-zero mean: y depends on x."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=gen)
    y = sign * x @ torch.randn(D, D, generator=gen) * 0.3 + 0.5 * torch.randn(N, D, generator=gen) + 2.0
    return x, y


def fresh(arch: str, y: torch.Tensor):
    sae = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=F, k=4, aux_k=4, apply_b_dec_to_input=False,
                             matryoshka_prefixes=[12, F] if arch == "matryoshka" else None))
    sae.initialize(y, b_dec_init="mean", seed=0)
    return sae


def fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sign", (1.0, -1.0))
def test_the_first_prediction_is_the_mean_plus_the_least_squares_multiple_of_g(arch, sign):
    x, y = pairs(sign)
    sae = fresh(arch, y)
    g = initial_prediction(sae, x, y)
    eps = float(((y - y.mean(0)) * g).sum() / g.pow(2).sum())  # by hand
    assert fit_initial_scale_(sae, x, y) == pytest.approx(eps, rel=1e-5)
    after = initial_prediction(sae, x, y) + sae.b_dec.detach()
    # homogeneity: the same latents, codes scaled by |ε*|; a negative ε* flips the decoder rows
    assert torch.allclose(after, y.mean(0) + eps * g, atol=1e-4)
    best = 1 - float(((y - y.mean(0)) * g).sum()) ** 2 / float(g.pow(2).sum() * (y - y.mean(0)).pow(2).sum())
    assert fvu(after, y) == pytest.approx(best, abs=1e-4)
    assert fvu(after, y) < 1.0 < fvu(g + sae.b_dec.detach(), y)  # the tied start is worse than the mean; the fitted one not
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-5) or arch == "relu"


def test_fitting_does_not_touch_batchtopk_state():
    x, y = pairs(1.0)
    sae = fresh("batchtopk", y)
    before = copy.deepcopy(sae.state_dict())
    initial_prediction(sae, x, y)
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


def test_the_option_is_checked():
    with pytest.raises(InterplabError, match="--transcoder-init 'zero' is not one of tied, fitted"):
        TrainConfig(model="m", hook="blocks.0.mlp.hook_in", target="blocks.0.hook_mlp_out",
                    transcoder_init="zero").validate()
    with pytest.raises(InterplabError, match="--transcoder-init starts a transcoder: give --target too"):
        TrainConfig(model="m", hook="blocks.0.hook_resid_post", transcoder_init="fitted").validate()
