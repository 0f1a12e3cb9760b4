"""Interoperability with SAELens 6 (a declared test extra): each side loads what the other saved and computes the same.

interplab → SAELens: `SAE.load_from_disk` on our folder gives the same feature activations and reconstructions.
SAELens → interplab: an SAE saved with SAELens's own methods loads with `load_sae` and gives the same outputs.
"""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE

from interplab.config import DEFAULT_MODEL
from interplab.sae import SAEConfig, load_sae, make_sae


def ours(arch: str, **kw):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=64, k=5, hook_name="blocks.1.hook_resid_post",
                             model=DEFAULT_MODEL, **kw))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.normal_()
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(64) * 3)
    return sae


def trained_batchtopk(arch: str):
    """A BatchTopK-family SAE whose θ was learned by a few training batches."""
    sae = ours(arch)
    for _ in range(5):
        sae.training_forward(torch.randn(128, 16))
    assert sae.threshold.item() > 0
    return sae


@pytest.mark.parametrize("arch, apply_b_dec", [("relu", None), ("relu", True), ("topk", None),
                                               ("topk", False), ("jumprelu", None), ("jumprelu", True),
                                               ("batchtopk", None), ("matryoshka", None)])
def test_sae_lens_loads_what_we_save(arch, apply_b_dec, tmp_path):
    sae = (trained_batchtopk(arch) if arch in ("batchtopk", "matryoshka")
           else ours(arch, apply_b_dec_to_input=apply_b_dec))
    sae.eval()
    sae.save(str(tmp_path / "sae"))
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    expected_class = {"relu": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE}.get(arch, sae_lens.JumpReLUSAE)
    assert type(theirs) is expected_class
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.metadata.model_name == DEFAULT_MODEL
    x = torch.randn(100, 16) * 2
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        assert (f_ours > 0).any() and (f_ours == 0).any()
        torch.testing.assert_close(f_theirs, f_ours, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs.decode(f_ours), sae.decode(f_ours), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)


def random_weights(sae) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) if p.ndim == 2 else torch.randn_like(p) * 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold))


@pytest.mark.parametrize("kind", ["standard", "standard_b_dec", "topk", "jumprelu", "jumprelu_b_dec"])
def test_we_load_what_sae_lens_saves(kind, tmp_path):
    b_dec = kind.endswith("_b_dec") or kind == "topk"
    meta = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.0.hook_resid_pre", model_name="gpt2")
    common = dict(d_in=12, d_sae=40, apply_b_dec_to_input=b_dec, metadata=meta)
    if kind.startswith("standard"):
        theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    elif kind == "topk":
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=4, **common))
    else:
        theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    random_weights(theirs)
    theirs.save_model(str(tmp_path / "sae"))
    assert "interplab" not in json.loads((tmp_path / "sae" / "cfg.json").read_text())
    sae = load_sae(str(tmp_path / "sae"))
    assert sae.cfg.arch == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[kind.split("_")[0]]
    assert sae.cfg.subtract_b_dec == b_dec and sae.cfg.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(100, 12) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), theirs.encode(x))
        torch.testing.assert_close(sae(x), theirs(x))


@pytest.mark.parametrize("training_class", ["TopKTrainingSAE", "BatchTopKTrainingSAE"])
def test_we_load_sae_lens_training_saes_saved_for_inference(training_class, tmp_path):
    """SAELens folds its TopK decoder-norm rescaling and turns BatchTopK into a JumpReLU when saving for inference."""
    cls = getattr(sae_lens, training_class)
    theirs = cls(getattr(sae_lens, training_class + "Config")(d_in=12, d_sae=40, k=4))
    random_weights(theirs)
    if training_class == "BatchTopKTrainingSAE":
        theirs.topk_threshold.fill_(0.9)
    theirs.save_inference_model(str(tmp_path / "sae"))
    sae = load_sae(str(tmp_path / "sae"))
    reloaded = SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(100, 12) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), reloaded.encode(x))
        torch.testing.assert_close(sae(x), reloaded(x))


@pytest.mark.parametrize("legacy", [
    {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}},                  # TopK before 6.0
    {"activation_fn_str": "relu", "normalize_activations": False},                    # ReLU, bool normalisation
    {"activation_fn_str": "relu", "apply_b_dec_to_input": False, "architecture": "standard"},
])
def test_pre_6_folders_load_like_sae_lens_loads_them(legacy, tmp_path):
    """A cfg.json as SAELens 3–5 wrote it: SAELens converts it (`handle_pre_6_0_config`); we give the same latents."""
    g = torch.Generator().manual_seed(4)
    d_in, d_sae = 12, 48
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) + 1,
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(tensors, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2", "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3,
        "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "context_size": 128, "prepend_bos": True, "sae_lens_training_version": "3.13.0", **legacy}))
    sae, theirs = load_sae(str(folder)), SAE.load_from_disk(str(folder))
    assert sae.cfg.hook_name == theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    x = torch.randn(50, d_in) * 2
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, theirs.encode(x))
        torch.testing.assert_close(sae(x), theirs(x))
    if "activation_fn_kwargs" in legacy:
        assert type(theirs) is sae_lens.TopKSAE and ((f != 0).sum(-1) <= 8).all() and (f != 0).sum(-1).max() == 8
