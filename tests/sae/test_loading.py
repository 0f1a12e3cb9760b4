"""`load_sae_and_model`: the model and hook an SAE records, overrides, in-memory objects, and every mismatch refused
with one clear error (checked against the tiny GPT-2: d_model 32, d_mlp 128, 3 layers)."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.sae import SAEConfig, make_sae
from interplab.sae.loading import SAEWithModel, load_sae_and_model

HOOK = "blocks.1.hook_resid_post"
D_MODEL, D_MLP = 32, 128


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), device="cpu")


def saved_sae(folder, *, d_in: int = D_MODEL, hook: str = HOOK, model: str = "") -> str:
    make_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=2 * d_in, k=2, hook_name=hook, model=model)).save(str(folder))
    return str(folder)


def test_the_model_and_hook_come_from_the_sae_folder(tiny_gpt2_dir, tmp_path):
    path = saved_sae(tmp_path / "s", model=str(tiny_gpt2_dir))
    loaded = load_sae_and_model(path, None, None, "cpu")
    assert isinstance(loaded, SAEWithModel)
    assert loaded.hook == HOOK and loaded.model_spec == str(tiny_gpt2_dir)
    assert loaded.model.info.d_model == D_MODEL and loaded.sae.cfg.d_in == D_MODEL
    assert not loaded.sae.training and loaded.sae.W_dec.device == torch.device("cpu")


def test_given_model_and_hook_override_the_recorded_ones(tiny_gpt2_dir, tmp_path, model):
    path = saved_sae(tmp_path / "s", model="no-such-model")
    loaded = load_sae_and_model(path, str(tiny_gpt2_dir), "blocks.0.hook_resid_pre", "cpu")
    assert loaded.hook == "blocks.0.hook_resid_pre" and loaded.model_spec == str(tiny_gpt2_dir)
    # a model passed in memory is used as is, and labels the result when nothing else names it
    sae = make_sae(SAEConfig(arch="topk", d_in=D_MLP, d_sae=8, k=2, hook_name="blocks.0.mlp.hook_post"))
    in_memory = load_sae_and_model("", None, None, None, loaded_sae=sae, loaded_model=model)
    assert in_memory.model is model and in_memory.sae is sae and in_memory.model_spec == model.info.spec
    assert in_memory.hook == "blocks.0.mlp.hook_post"


def test_a_model_the_sae_does_not_record_falls_back_to_the_default(tiny_gpt2_dir, tmp_path):
    path = saved_sae(tmp_path / "s")
    with pytest.raises(InterplabError, match="records no model .*pass --model"):
        load_sae_and_model(path, None, None, "cpu")
    loaded = load_sae_and_model(path, None, None, "cpu", default_model=str(tiny_gpt2_dir))
    assert loaded.model_spec == str(tiny_gpt2_dir) and loaded.model.info.n_layers == 3


@pytest.mark.parametrize("sae_cfg, hook, same_hook, message", [
    (None, None, False, "--sae is required"),
    (dict(hook_name=""), None, False, "names no hook .*pass --hook"),
    (dict(), "blocks.7.hook_resid_post", False, "unknown hook name"),
    (dict(), "blocks.0.attn.hook_pattern", False, "attention patterns are not one vector per token"),
    (dict(d_in=16), None, False, f"SAE d_in 16 does not match the width {D_MODEL} of {HOOK}"),
    (dict(), "blocks.0.mlp.hook_post", False, f"SAE d_in {D_MODEL} does not match the width {D_MLP}"),
    (dict(), "blocks.0.hook_resid_post", True, f"the SAE was trained at {HOOK}, not at --hook blocks.0"),
])
def test_mismatches_are_refused(model, sae_cfg, hook, same_hook, message):
    sae = None
    if sae_cfg is not None:
        fields = {"arch": "topk", "d_in": D_MODEL, "d_sae": 8, "k": 2, "hook_name": HOOK, **sae_cfg}
        sae = make_sae(SAEConfig(**fields))
    with pytest.raises(InterplabError, match=message):
        load_sae_and_model("", None, hook, None, loaded_sae=sae, loaded_model=model, same_hook=same_hook)


def test_same_hook_accepts_the_hook_the_sae_was_trained_at(model):
    sae = make_sae(SAEConfig(arch="topk", d_in=D_MODEL, d_sae=8, k=2, hook_name=HOOK))
    assert load_sae_and_model("", None, HOOK, None, loaded_sae=sae, loaded_model=model, same_hook=True).hook == HOOK
