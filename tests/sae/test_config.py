"""SAEConfig validation, make_sae, and the behaviour every architecture shares (initialise, resample, fold, norms)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from interplab.config import field_docs
from interplab.errors import InterplabError
from interplab.sae import (
    ARCHS,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SAEConfig,
    SparseAutoencoder,
    TopKSAE,
    make_sae,
)

CLASSES = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
           "matryoshka": MatryoshkaSAE}


def small(arch: str, **kw) -> SAEConfig:
    return SAEConfig(**{"arch": arch, "d_in": 8, "d_sae": 32, "k": 4, "aux_k": 8, **kw})


def test_defaults_are_valid_and_every_field_is_documented():
    SAEConfig().validate()
    docs = field_docs(SAEConfig)
    assert {f.name for f in dataclasses.fields(SAEConfig)} <= set(docs)
    assert all(docs.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "gated"}, "unknown SAE architecture 'gated'; valid: relu, topk, batchtopk, jumprelu, matryoshka"),
    ({"d_in": 0}, "d_in must be a positive integer, got 0"),
    ({"d_sae": -3}, "d_sae must be a positive integer, got -3"),
    ({"k": 32}, "k=32 must be < d_sae=32"),
    ({"k": 0}, "k=0 must be >= 1"),
    ({"arch": "batchtopk", "k": 40}, "k=40 must be < d_sae=32"),
    ({"l1_coefficient": -1.0}, "l1_coefficient must be >= 0"),
    ({"l0_coefficient": -1e-3}, "l0_coefficient must be >= 0"),
    ({"aux_coefficient": -0.1}, "aux_coefficient must be >= 0"),
    ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be > 0"),
    ({"aux_coefficient": float("nan")}, "aux_coefficient must be a finite number, got nan"),  # issue 20 item 5
    ({"l1_coefficient": float("inf")}, "l1_coefficient must be a finite number, got inf"),
    ({"jumprelu_bandwidth": float("nan")}, "jumprelu_bandwidth must be a finite number"),
    ({"k": 4.0}, "k must be a positive integer, got 4.0"),
    ({"d_sae": "32"}, "d_sae must be a positive integer, got '32'"),
    ({"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input must be true, false or null"),
    ({"arch": "matryoshka", "matryoshka_prefixes": [8, "32"]}, "matryoshka_prefixes must be a list of integers"),
    ({"arch": "matryoshka", "matryoshka_prefixes": [8, 4, 32]}, "strictly increasing, got [8, 4, 32]"),
    ({"arch": "matryoshka", "matryoshka_prefixes": [4, 8, 16]}, "must equal d_sae=32, got [4, 8, 16]"),
])
def test_validate_names_the_bad_field(kwargs, message):
    cfg = small(**{"arch": "topk", **kwargs})
    with pytest.raises(InterplabError) as e:
        cfg.validate()
    assert message in str(e.value)
    with pytest.raises(InterplabError, match=message.split(",")[0].replace("[", r"\[")):  # make_sae validates too
        make_sae(cfg)


def test_k_is_only_checked_where_it_is_used():
    small("relu", k=1000).validate()
    small("jumprelu", k=1000).validate()


def test_matryoshka_default_prefixes():
    assert SAEConfig(arch="matryoshka", d_sae=9216).prefixes == [576, 2304, 9216]
    assert small("matryoshka", matryoshka_prefixes=[4, 32]).prefixes == [4, 32]


def test_b_dec_subtraction_defaults_by_architecture():
    assert [small(a).subtract_b_dec for a in ARCHS] == [False, True, True, False, True]
    assert small("relu", apply_b_dec_to_input=True).subtract_b_dec
    assert not small("topk", apply_b_dec_to_input=False).subtract_b_dec


def test_from_dict_ignores_unknown_keys():
    cfg = small("topk", hook_name="blocks.3.hook_resid_post")
    assert SAEConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_make_sae_builds_the_architecture_with_sae_lens_shapes(arch):
    sae = make_sae(small(arch))
    assert type(sae) is CLASSES[arch] and isinstance(sae, SparseAutoencoder)
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)
    x = torch.randn(2, 3, 8)  # any leading dimensions
    assert sae.encode(x).shape == (2, 3, 32) and sae(x).shape == (2, 3, 8)


def test_a_subclass_refuses_another_architecture_config():
    with pytest.raises(InterplabError, match="TopKSAE implements arch 'topk', the config says 'relu'"):
        TopKSAE(small("relu"))


@pytest.mark.parametrize("arch", ARCHS)
def test_initialize(arch):
    sample = torch.randn(200, 8) + 3.0
    sae = make_sae(small(arch))
    sae.initialize(sample, seed=1)
    torch.testing.assert_close(sae.b_dec.data, sample.mean(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(sae.W_enc.data, sae.W_dec.data.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert (sae.b_enc == 0).all()
    again = make_sae(small(arch))
    again.initialize(sample, seed=1)
    assert torch.equal(again.W_dec, sae.W_dec)  # seeded
    again.initialize(sample, seed=2)
    assert not torch.equal(again.W_dec, sae.W_dec)
    if arch == "jumprelu":
        torch.testing.assert_close(sae.threshold, torch.full((32,), 0.01))  # the configured initial threshold


def test_initialize_geometric_median_resists_outliers():
    sample = torch.cat([torch.randn(99, 8) * 0.1 + 1.0, torch.full((1, 8), 1000.0)])
    sae = make_sae(small("topk"))
    sae.initialize(sample, b_dec_init="geometric_median")
    assert (sae.b_dec - 1.0).abs().max() < 0.2  # the mean would be ~11
    with pytest.raises(InterplabError, match="unknown b_dec_init 'median'; valid: mean, geometric_median"):
        sae.initialize(sample, b_dec_init="median")
    with pytest.raises(InterplabError, match=r"initialize needs a sample of shape \[n, 8\], got \(100, 7\)"):
        sae.initialize(sample[:, :7])


def test_reinit_latents():
    sae = make_sae(small("topk"))
    with torch.no_grad():
        sae.b_enc.fill_(0.3)
    idx = torch.tensor([2, 5])
    directions = torch.tensor([[3.0, 4.0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 2.0]])
    before = sae.W_dec.detach().clone()
    sae.reinit_latents(idx, directions, enc_scale=0.5)
    unit = directions / directions.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec[idx], unit)
    torch.testing.assert_close(sae.W_enc[:, idx], unit.T * 0.5)
    assert sae.b_enc[idx].tolist() == [0.0, 0.0] and sae.b_enc[0].item() == pytest.approx(0.3)
    others = torch.ones(32, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(sae.W_dec[others], before[others])
    with pytest.raises(InterplabError, match=r"directions must have shape \[2, 8\], got \(1, 8\)"):
        sae.reinit_latents(idx, directions[:1], 1.0)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_gradient_projection_and_renormalisation_keep_unit_decoder_rows(arch):
    torch.manual_seed(0)
    sae = make_sae(small(arch))
    sae.initialize(torch.randn(64, 8))
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(5):
        out = sae.training_forward(torch.randn(64, 8) * 2, dead_mask=torch.rand(32) < 0.3)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        # no gradient component along any decoder row is left
        parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert parallel.abs().max() < 1e-5
        opt.step()
        sae.after_optimizer_step()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_gradient_projection_by_hand():
    sae = make_sae(SAEConfig(arch="topk", d_in=2, d_sae=2, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    sae.W_dec.grad = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    sae.before_optimizer_step()
    # row 0 keeps only its y component; row 1 loses 0.6·(0.6, 0.8)
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[0.0, 3.0], [1 - 0.36, -0.48]]))


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale_gives_the_same_latents_on_raw_inputs(arch):
    torch.manual_seed(1)
    sae = make_sae(small(arch, apply_b_dec_to_input=True if arch == "relu" else None))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.normal_()
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(32))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.7)
    sae.eval()
    x, scale = torch.randn(50, 8) * 30.0, 0.04  # trained on x·scale
    f_scaled, recon_scaled = sae.encode(x * scale), sae(x * scale)
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x), recon_scaled / scale, rtol=1e-4, atol=1e-3)
    with pytest.raises(InterplabError, match="positive scale"):
        sae.fold_input_scale(0.0)
