"""Saving and loading: exact round trips, the cfg.json SAELens needs, SAELens- and sparsify-written folders, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interplab.config import DEFAULT_MODEL
from interplab.errors import InterplabError
from interplab.sae import ARCHS, SAEConfig, SparseAutoencoder, load_sae, make_sae


def trained_like(arch: str, **kw) -> SparseAutoencoder:
    """An SAE with random (not initial) values everywhere, in eval mode."""
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=8, d_sae=32, k=4, hook_name="blocks.2.hook_resid_post",
                             model=DEFAULT_MODEL, **kw))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.normal_()
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(32) * 2)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.8)
    return sae.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_exact(arch, tmp_path):
    sae = trained_like(arch)
    sae.save(str(tmp_path / "sae"), metadata={"run": "abc"})
    back = load_sae(str(tmp_path / "sae"))
    assert type(back) is type(sae) and back.cfg == sae.cfg and not back.training
    for name, t in sae.state_dict().items():
        if name != "log_threshold":  # JumpReLU files hold θ; several floats log θ may give the same θ
            assert torch.equal(back.state_dict()[name], t), name
    if arch == "jumprelu":
        assert torch.equal(back.threshold, sae.threshold)
    x = torch.randn(64, 8) * 3
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))


def test_cfg_json_holds_what_sae_lens_needs(tmp_path):
    trained_like("topk").save(str(tmp_path / "sae"), metadata={"run": "abc"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                 "normalize_activations", "k")} == {
        "architecture": "topk", "d_in": 8, "d_sae": 32, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "k": 4}
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["model_name"] == DEFAULT_MODEL and cfg["metadata"]["run"] == "abc"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["interplab"]["arch"] == "topk" and cfg["interplab"]["format"] == 1
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (8, 32), "W_dec": (32, 8), "b_enc": (32,), "b_dec": (8,)}
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


@pytest.mark.parametrize("arch, saved_as", [("relu", "standard"), ("jumprelu", "jumprelu"),
                                            ("batchtopk", "jumprelu"), ("matryoshka", "jumprelu")])
def test_saved_architecture_names(arch, saved_as, tmp_path):
    trained_like(arch).save(str(tmp_path / "sae"))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == saved_as
    assert ("threshold" in load_file(tmp_path / "sae" / "sae_weights.safetensors")) == (saved_as == "jumprelu")


def test_save_overwrites_and_works_on_fsspec_urls(tmp_path):
    a, b = trained_like("topk"), trained_like("relu")
    a.save(str(tmp_path / "sae"))
    b.save(str(tmp_path / "sae"))
    assert type(load_sae(str(tmp_path / "sae"))).__name__ == "ReLUSAE"
    assert not [p for p in (tmp_path / "sae").iterdir() if ".tmp-" in p.name]
    a.save("memory://interplab-test/sae")
    x = torch.randn(5, 8)
    assert torch.equal(load_sae("memory://interplab-test/sae").encode(x), a.encode(x))


def saelens_style_folder(folder: Path, architecture: str, tensors: dict, **extra) -> Path:
    """A folder as SAELens 6 writes it (no "interplab" entry)."""
    folder.mkdir(parents=True)
    d_sae, d_in = tensors["W_dec"].shape
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_mlp_out", "model_name": "gpt2"},
           **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def random_tensors(d_in=4, d_sae=6, threshold=False):
    g = torch.Generator().manual_seed(5)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    if threshold:
        t["threshold"] = torch.rand(d_sae, generator=g)
    return t


@pytest.mark.parametrize("architecture, arch", [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu")])
def test_loads_folders_written_by_sae_lens(architecture, arch, tmp_path):
    t = random_tensors(threshold=architecture == "jumprelu")
    extra = {"k": 2} if architecture == "topk" else {}
    sae = load_sae(str(saelens_style_folder(tmp_path / "s", architecture, t, **extra)))
    assert sae.cfg.arch == arch and sae.cfg.hook_name == "blocks.0.hook_mlp_out" and sae.cfg.model == "gpt2"
    assert not sae.cfg.subtract_b_dec
    x = torch.randn(7, 4)
    pre = x @ t["W_enc"] + t["b_enc"]  # apply_b_dec_to_input = false in that cfg.json
    if arch == "relu":
        f = pre.relu()
    elif arch == "topk":
        assert sae.cfg.k == 2
        v, i = pre.topk(2, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        f = pre.relu() * (pre > t["threshold"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ t["W_dec"] + t["b_dec"])


def test_folds_sae_lens_topk_decoder_norm_rescaling(tmp_path):
    t = random_tensors()
    sae = load_sae(str(saelens_style_folder(tmp_path / "s", "topk", t, k=2, rescale_acts_by_decoder_norm=True)))
    x = torch.randn(7, 4)
    norms = t["W_dec"].norm(dim=1)
    pre = (x @ t["W_enc"] + t["b_enc"]) * norms  # SAELens: select on pre·‖W_dec‖, decode with f/‖W_dec‖
    v, i = pre.topk(2, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), (f / norms) @ t["W_dec"] + t["b_dec"])


def test_loads_a_sparsify_hookpoint_folder(tmp_path):
    """EleutherAI sparsify: encoder.weight [d_sae, d_in], f = TopK(ReLU((x − b_dec) Wᵀ + b)), x̂ = f W_dec + b_dec."""
    g = torch.Generator().manual_seed(2)
    d_in, d_sae, k = 4, 8, 3
    t = {"encoder.weight": torch.randn(d_sae, d_in, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    folder = tmp_path / "sparsify-run" / "layers.3"
    folder.mkdir(parents=True)
    save_file(t, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 2, "normalize_decoder": True,
                                                 "num_latents": 0, "k": k, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": d_in}))
    sae = load_sae(str(folder))
    assert sae.cfg.arch == "topk" and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (d_in, d_sae, k)
    assert sae.cfg.hook_name == "layers.3"
    x = torch.randn(9, d_in)
    pre = ((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    v, i = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ t["W_dec"] + t["b_dec"])
    with pytest.raises(InterplabError, match="holds sparsify SAEs for several hookpoints; load one of their "
                                             "folders: layers.3"):
        load_sae(str(tmp_path / "sparsify-run"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": True}))
    with pytest.raises(InterplabError, match="skip_connection=true is not supported"):
        load_sae(str(folder))


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(InterplabError, match="the folder does not exist"):
        load_sae(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterplabError, match="missing cfg.json and sae_weights.safetensors"):
        load_sae(str(tmp_path / "empty"))
    trained_like("topk").save(str(tmp_path / "sae"))
    (tmp_path / "sae" / "sae_weights.safetensors").unlink()
    with pytest.raises(InterplabError, match=r"missing sae_weights.safetensors \(SAELens\) or sae.safetensors"):
        load_sae(str(tmp_path / "sae"))


def test_missing_tensor_is_named(tmp_path):
    t = random_tensors()
    del t["b_enc"]
    with pytest.raises(InterplabError, match=r"missing tensor 'b_enc'; found \['W_dec', 'W_enc', 'b_dec'\]"):
        load_sae(str(saelens_style_folder(tmp_path / "s", "standard", t)))
    with pytest.raises(InterplabError, match="missing tensor 'threshold'"):
        load_sae(str(saelens_style_folder(tmp_path / "j", "jumprelu", random_tensors())))


def test_wrong_shape_names_tensor_expected_and_got(tmp_path):
    trained_like("topk").save(str(tmp_path / "sae"))
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"][:, :7].contiguous()
    save_file(weights, tmp_path / "sae" / "sae_weights.safetensors")
    with pytest.raises(InterplabError, match=r"tensor 'W_dec' has shape \[32, 7\], expected \[32, 8\]"):
        load_sae(str(tmp_path / "sae"))


def test_unknown_architecture_and_bad_config(tmp_path):
    with pytest.raises(InterplabError, match="unknown SAE architecture 'gated'; interplab loads standard, topk"):
        load_sae(str(saelens_style_folder(tmp_path / "g", "gated", random_tensors())))
    trained_like("relu").save(str(tmp_path / "sae"))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["interplab"]["arch"] = "transcoder"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InterplabError, match="unknown SAE architecture 'transcoder'"):
        load_sae(str(tmp_path / "sae"))
    (tmp_path / "sae" / "cfg.json").write_text("{not json")
    with pytest.raises(InterplabError, match="is not valid JSON"):
        load_sae(str(tmp_path / "sae"))
    with pytest.raises(InterplabError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(str(saelens_style_folder(tmp_path / "n", "standard", random_tensors(),
                                          normalize_activations="layer_norm")))
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"garbage")
    (tmp_path / "sae" / "cfg.json").write_text("{}")
    with pytest.raises(InterplabError, match="cannot read"):
        load_sae(str(tmp_path / "sae"))


def test_saving_needs_no_loader_and_base_knows_no_architecture():
    """Imports run one way: base.py (and with it `SparseAutoencoder.save`) loads neither files.py nor the arch
    registry; files.py builds on them."""
    code = ("import sys, interplab.sae.base; "
            "print(sorted(m for m in sys.modules if m.startswith('interplab.sae.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["['interplab.sae.base',", "'interplab.sae.config',", "'interplab.sae.layout']"]


# ---- cfg.json written before SAELens 6.0 (issue 20, item 6) --------------------------------------------------------
def pre_6_folder(folder: Path, tensors: dict, **cfg) -> Path:
    """A folder as SAELens 3–5 wrote it: hook_point, top-level model_name, activation_fn_str, no metadata/version."""
    folder.mkdir(parents=True)
    d_sae, d_in = tensors["W_dec"].shape
    base = {"model_name": "gpt2", "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
            "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "activation_fn_str": "relu", "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
            "normalize_activations": "none", "context_size": 128, "prepend_bos": True,
            "sae_lens_training_version": "3.13.0"}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def test_pre_6_topk_loads_as_topk_with_its_k(tmp_path):
    t = random_tensors(d_in=8, d_sae=64)
    t["b_enc"] = t["b_enc"].abs() + 10  # every pre-activation positive: L0 is k exactly (ReLU would fire all 64)
    sae = load_sae(str(pre_6_folder(tmp_path / "s", t, activation_fn_str="topk", activation_fn_kwargs={"k": 8})))
    assert (sae.cfg.arch, sae.cfg.k, sae.cfg.hook_name, sae.cfg.model) == ("topk", 8, "blocks.0.hook_resid_pre", "gpt2")
    assert sae.cfg.subtract_b_dec  # SAELens's default before 6.0
    x = torch.randn(20, 8)
    f = sae.encode(x)
    assert ((f != 0).sum(-1) == 8).all()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    v, i = pre.topk(8, dim=-1)
    torch.testing.assert_close(f, torch.zeros_like(pre).scatter(-1, i, v.relu()))


def test_pre_6_relu_options_map_exactly(tmp_path):
    t = {**random_tensors(), "scaling_factor": torch.rand(6) + 0.5}
    sae = load_sae(str(pre_6_folder(tmp_path / "s", t, normalize_activations=False, finetuning_scaling_factor=True)))
    assert sae.cfg.arch == "relu" and sae.cfg.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(7, 4)
    f = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), (f * t["scaling_factor"]) @ t["W_dec"] + t["b_dec"])
    jump = {**random_tensors(), "log_threshold": torch.randn(6)}  # JumpReLU training file: log θ
    sae = load_sae(str(pre_6_folder(tmp_path / "j", jump, architecture="jumprelu")))
    torch.testing.assert_close(sae.threshold, jump["log_threshold"].exp())


@pytest.mark.parametrize("cfg, message", [
    ({"activation_fn_str": "tanh-relu"}, "activation function 'tanh-relu' is not supported"),
    ({"activation_fn_str": "topk"}, "a topk SAE needs k"),
    ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "k": 3}, "disagree"),
    ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4, "postact_fn": "x"}}, "['postact_fn'] are not"),
    ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "architecture": "jumprelu"}, "does not fit"),
    ({"architecture": "gated"}, "unknown SAE architecture 'gated'"),
    ({"normalize_activations": True}, "expected_average_only_in' means the weights expect activations scaled"),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations='constant_norm_rescale' is not"),
    ({"hook_point_head_index": 3}, "reads attention head 3 alone"),
    ({"finetuning_scaling_factor": True}, "missing tensor 'scaling_factor'"),
    ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input must be true or false, got 'yes'"),
    ({"reshape_activations": "hook_q"}, "reshape_activations='hook_q' is not supported"),
])
def test_pre_6_keys_that_change_the_maths_are_refused(cfg, message, tmp_path):
    with pytest.raises(InterplabError) as e:
        load_sae(str(pre_6_folder(tmp_path / "s", random_tensors(), **cfg)))
    assert message in str(e.value) and str(tmp_path / "s") in str(e.value)  # names the folder


@pytest.mark.parametrize("content, message", [
    (b'{"d_in": "\xff\xfe"}', "is not UTF-8 text"),
    (b"[1, 2]", "holds JSON list, not an object"),
    (b"{}", "needs an integer 'd_in'"),
    (json.dumps({"architecture": "standard", "d_in": 4, "d_sae": "6"}).encode(), "needs an integer 'd_sae', got '6'"),
    (json.dumps({"architecture": ["topk"], "d_in": 4, "d_sae": 6}).encode(), "architecture must be a string"),
    (json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 6, "metadata": [1],
                 "hook_name": 5}).encode(), "hook_name must be a string, got 5"),
    (json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 6, "k": "2"}).encode(), "k must be a positive integer"),
    (json.dumps({"interplab": "relu", "d_in": 4}).encode(), "'interplab' must be an object"),
    (json.dumps({"interplab": {"arch": "relu", "d_in": 4, "d_sae": "6"}}).encode(), "d_sae must be a positive"),
    (json.dumps({"interplab": {"arch": "topk", "d_in": 4, "d_sae": 6, "k": 2,
                               "aux_coefficient": float("nan")}}).encode(), "aux_coefficient must be a finite"),
])
def test_bad_cfg_json_is_one_interplab_error(content, message, tmp_path):
    folder = saelens_style_folder(tmp_path / "s", "standard", random_tensors())
    (folder / "cfg.json").write_bytes(content)
    with pytest.raises(InterplabError) as e:
        load_sae(str(folder))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
