"""Transcoder files: SAELens's transcoder layout (SAELens loads ours and computes the same; we load SAELens's own),
sparsify's (`transcode: true`, checked against sparsify's formulas by hand), and folders of one transcoder per layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE, JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, SkipTranscoder, SkipTranscoderConfig

from interplab.errors import InterplabError
from interplab.sae import SAEConfig, make_sae
from interplab.sae.circuit_tracer_files import save_circuit_tracer
from interplab.sae.transcoder import Transcoder, TranscoderSet
from interplab.sae.transcoder_files import load_transcoder, load_transcoder_set, save_transcoder_set

D, F = 16, 48


def transcoder(arch: str, *, skip: bool = False, layer: int = 3, seed: int = 0, **kw) -> Transcoder:
    """Random weights (thresholds that gate about half the latents); BatchTopK's θ learned by a few batches."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=F, k=5, hook_name=f"blocks.{layer}.mlp.hook_in",
                             model="m", **kw))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.normal_()
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(F) * 3)
    if arch in ("batchtopk", "matryoshka"):
        for _ in range(5):
            sae.training_forward(torch.randn(128, D), target=torch.randn(128, D))
        assert sae.threshold.item() > 0
    W_skip = torch.randn(D, D) if skip else None
    return Transcoder(sae, f"blocks.{layer}.hook_mlp_out", W_skip).eval()


@pytest.mark.parametrize("arch, skip, kw", [("relu", False, {}), ("relu", True, {}),
                                            ("relu", False, {"apply_b_dec_to_input": True}),
                                            ("jumprelu", False, {}), ("jumprelu", True, {}),
                                            ("batchtopk", True, {}), ("matryoshka", False, {})])
def test_sae_lens_loads_our_transcoder_and_computes_the_same(tmp_path, arch, skip, kw):
    ours = transcoder(arch, skip=skip, **kw)
    ours.save(str(tmp_path / "tc"))
    theirs = SAE.load_from_disk(str(tmp_path / "tc"))
    expected = {(False, "relu"): "Transcoder", (True, "relu"): "SkipTranscoder"}.get(
        (skip, arch), "JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
    assert type(theirs).__name__ == expected
    assert theirs.cfg.metadata.hook_name == "blocks.3.mlp.hook_in"
    assert theirs.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out" and theirs.cfg.d_out == D
    x = torch.randn(64, D) * 2
    with torch.no_grad():
        f = ours.encode(x)
        assert 0 < (f > 0).float().mean() < 0.9  # the gates matter on this input
        assert torch.allclose(theirs.encode(x), f, atol=1e-5)
        assert torch.allclose(theirs(x), ours(x), atol=1e-4)
    back = load_transcoder(str(tmp_path / "tc"))  # our own file comes back as it was
    assert back.sae.cfg.arch == arch and (back.W_skip is not None) == skip
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-4) and torch.equal(back.encode(x) > 0, f > 0)


@pytest.mark.parametrize("jump", [False, True])
def test_we_load_a_transcoder_sae_lens_saved(tmp_path, jump):
    cls, cfg_cls = (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig) if jump else (SkipTranscoder,
                                                                                      SkipTranscoderConfig)
    theirs = cls(cfg_cls(d_in=D, d_sae=F, d_out=D, apply_b_dec_to_input=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        if jump:
            theirs.threshold.uniform_(0, 3)
    theirs.cfg.metadata.hook_name = "blocks.2.mlp.hook_in"
    theirs.cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
    theirs.save_model(str(tmp_path / "tc"))
    ours = load_transcoder(str(tmp_path / "tc"))
    assert (ours.sae.cfg.arch, ours.in_hook, ours.out_hook, ours.layer) == (
        "jumprelu" if jump else "relu", "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out", 2)
    x = torch.randn(32, D)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def sparsify_folder(path, *, skip: bool, seed: int = 2) -> dict[str, torch.Tensor]:
    """A folder as sparsify's SparseCoder.save_to_disk writes a transcoder: its cfg keys and tensor names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(F, D, generator=g), "encoder.bias": torch.randn(F, generator=g),
               "W_dec": torch.randn(F, D, generator=g), "b_dec": torch.randn(D, generator=g)}
    if skip:
        tensors["W_skip"] = torch.randn(D, D, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": 5,
        "multi_topk": False, "skip_connection": skip, "transcode": True, "d_in": D}))
    return tensors


@pytest.mark.parametrize("skip", [False, True])
def test_a_sparsify_transcoder_computes_what_sparsify_does(tmp_path, skip):
    t = sparsify_folder(tmp_path / "layers.4.mlp", skip=skip)
    ours = load_transcoder(str(tmp_path / "layers.4.mlp"))
    assert (ours.in_hook, ours.out_hook, ours.sae.cfg.k) == ("blocks.4.mlp.hook_in", "blocks.4.hook_mlp_out", 5)
    x = torch.randn(40, D)
    # sparsify, by hand: pre = ReLU(x Wᵀ + b) (no b_dec subtracted when transcoding), top 5, decode, + x W_skipᵀ
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(5, dim=-1)
    y = torch.zeros(40, F).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"]
    if skip:
        y = y + x @ t["W_skip"].T
    with torch.no_grad():
        assert torch.allclose(ours(x), y, atol=1e-4)


@pytest.mark.parametrize("skip", [False, True])
def test_a_topk_transcoder_is_saved_in_sparsify_layout_and_round_trips(tmp_path, skip):
    ours = transcoder("topk", skip=skip)  # TopK subtracts b_dec by default: folded into b_enc on save
    ours.save(str(tmp_path / "tc"))
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (cfg["transcode"], cfg["skip_connection"], cfg["k"], cfg["num_latents"], cfg["d_in"]) == (
        True, skip, 5, F, D)
    tensors = load_file(str(tmp_path / "tc" / "sae.safetensors"))
    assert sorted(tensors) == sorted(["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip
                                                                                             else []))
    assert tensors["encoder.weight"].shape == (F, D)
    back = load_transcoder(str(tmp_path / "tc"))
    x = torch.randn(40, D)
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-4) and torch.equal(back.encode(x) > 0, ours.encode(x) > 0)
    assert (back.in_hook, back.out_hook) == (ours.in_hook, ours.out_hook)
    with pytest.raises(InterplabError, match="a topk transcoder cannot be saved in the saelens layout"):
        ours.save(str(tmp_path / "no"), layout="saelens")


def test_a_set_folder_holds_one_transcoder_per_layer(tmp_path):
    tset = TranscoderSet({0: transcoder("relu", layer=0), 1: transcoder("topk", layer=1, seed=1)},
                         "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out")
    save_transcoder_set(tset, str(tmp_path / "set"))
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["layer_0", "layer_1"]
    back = load_transcoder_set(str(tmp_path / "set"))
    assert isinstance(back, TranscoderSet) and sorted(back.transcoders) == [0, 1]
    assert (back.in_hook, back.out_hook) == (tset.in_hook, tset.out_hook)
    x = torch.randn(8, D)
    with torch.no_grad():
        for layer in (0, 1):
            assert torch.allclose(back.transcoders[layer](x), tset.transcoders[layer](x), atol=1e-4)


def test_a_circuit_tracer_folder_is_read_by_its_loader(tmp_path):
    tset = TranscoderSet({0: transcoder("jumprelu", layer=0), 1: transcoder("relu", layer=1, skip=True)},
                         "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out")
    save_circuit_tracer(tset, str(tmp_path / "ct"), "m")
    back = load_transcoder_set(str(tmp_path / "ct"))
    x = torch.randn(8, D)
    with torch.no_grad():
        assert torch.allclose(back.transcoders[1](x), tset.transcoders[1](x), atol=1e-4)


def test_bad_set_folders_and_non_transcoders_are_refused(tmp_path):
    for layer, name in ((2, "a"), (2, "b")):
        transcoder("relu", layer=layer).save(str(tmp_path / "dup" / name))
    with pytest.raises(InterplabError, match="two transcoders for layer 2"):
        load_transcoder_set(str(tmp_path / "dup"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterplabError, match="no transcoder set at .*empty"):
        load_transcoder_set(str(tmp_path / "empty"))
    make_sae(SAEConfig(arch="relu", d_in=D, d_sae=F)).save(str(tmp_path / "sae"))
    with pytest.raises(InterplabError, match="architecture 'standard' is not a transcoder"):
        load_transcoder(str(tmp_path / "sae"))
    with pytest.raises(InterplabError, match="no transcoder at .*missing: the folder does not exist"):
        load_transcoder(str(tmp_path / "missing"))
