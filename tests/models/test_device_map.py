"""Models placed by accelerate (device_map): the same activations and logits as a plain load, offloaded layers
included; early stopping leaves no offloaded weight behind; bad maps are one-line errors. CPU only: "disk" is the
offload target a CPU machine has, and its execution path (weights loaded per module, per call) is the one
GPU offload uses too."""

from __future__ import annotations

import shutil

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer, load_model
from interplab.models import load as load_module

# Layers 1 and 2 (and the head) on disk: the stream crosses from resident to offloaded modules mid-model.
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def plain(llama_dir):
    return load_model(str(llama_dir), device="cpu")


@pytest.fixture(scope="module")
def offloaded(llama_dir, tmp_path_factory):
    return load_model(str(llama_dir), device_map=DISK_MAP, offload_folder=str(tmp_path_factory.mktemp("offload")))


@pytest.fixture(scope="module")
def tokens(plain):
    return torch.randint(0, plain.info.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def assert_same_run(model, reference, tokens) -> None:
    """Every hook point (pattern and resid_mid included) and the logits equal the reference model's, exactly."""
    got = model.run_with_cache(tokens, return_logits=True)
    want = reference.run_with_cache(tokens, return_logits=True)
    assert got.cache.keys() == want.cache.keys() == set(reference.hook_names)
    for name, act in want.cache.items():
        assert torch.equal(got.cache[name], act), name
    assert torch.equal(got.logits, want.logits)


def offloaded_params(model) -> dict[str, torch.device]:
    return {name: p.device for name, p in model.model.named_parameters() if ".layers.1." in name}


def test_auto_device_map_matches_the_plain_load(llama_dir, plain, tokens):
    auto = load_model(str(llama_dir), device_map="auto")
    assert auto.device == torch.device("cpu")
    assert_same_run(auto, plain, tokens)


def test_auto_with_max_memory_spills_layers_to_disk_with_equal_values(llama_dir, plain, tokens, tmp_path):
    n_bytes = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    budget = {"cpu": f"{n_bytes * 7 // 10_000}KB"}  # 70% of the weights
    auto = load_model(str(llama_dir), device_map="auto", max_memory=budget, offload_folder=str(tmp_path))
    assert budget == {"cpu": f"{n_bytes * 7 // 10_000}KB"}  # accelerate parses sizes in place: not in ours
    placed = auto.model.hf_device_map
    assert set(placed.values()) == {"cpu", "disk"}, placed  # the cap forced a split
    assert placed["model.embed_tokens"] == "cpu" and auto.device == torch.device("cpu")
    assert_same_run(auto, plain, tokens)


def test_hand_written_map_with_disk_layers_gives_equal_hooks_and_logits(offloaded, plain, tokens):
    assert set(offloaded_params(offloaded).values()) == {torch.device("meta")}  # really offloaded
    assert_same_run(offloaded, plain, tokens)
    with torch.inference_mode():  # as the harvest runs it
        got = offloaded.run_with_cache(tokens, ["blocks.2.hook_resid_post"]).cache["blocks.2.hook_resid_post"]
    assert torch.equal(got.to("cpu", torch.float32), plain.run_with_cache(tokens, ["blocks.2.hook_resid_post"])
                       .cache["blocks.2.hook_resid_post"])


def test_a_wholly_offloaded_model_takes_tokens_on_its_execution_device(llama_dir, plain, tokens, tmp_path):
    model = load_model(str(llama_dir), device_map={"": "disk"}, offload_folder=str(tmp_path))
    assert model.model.get_input_embeddings().weight.device == torch.device("meta")
    assert model.device == torch.device("cpu")  # not the embedding's meta placeholder
    assert_same_run(model, plain, tokens)


def test_edits_reach_offloaded_layers(offloaded, plain, tokens):
    def ablate(act, name):
        return torch.zeros_like(act)

    hooks = [("blocks.0.hook_mlp_out", ablate), ("blocks.1.hook_resid_mid", lambda act, name: act * 2)]
    with torch.no_grad():
        assert torch.equal(offloaded.run_with_hooks(tokens, hooks), plain.run_with_hooks(tokens, hooks))
        prefix, reference = offloaded.run_prefix(tokens, "blocks.1.hook_attn_out"), plain.run_prefix(
            tokens, "blocks.1.hook_attn_out")
        assert torch.equal(offloaded.run_suffix(prefix, prefix.act * 0.5), plain.run_suffix(reference,
                                                                                             reference.act * 0.5))


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post",
                                  "blocks.1.hook_resid_post"])
def test_early_stop_inside_an_offloaded_layer_runs_no_later_block_and_leaves_no_weight_loaded(
        offloaded, plain, tokens, hook):
    calls: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(offloaded.blocks)]
    try:
        act = offloaded.run_with_cache(tokens, [hook]).cache[hook]
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]  # stopped inside block 1: block 2 never started
    assert torch.equal(act, plain.run_with_cache(tokens, [hook]).cache[hook])
    # The stop is raised at a module boundary, after accelerate put each finished module's weights back.
    assert set(offloaded_params(offloaded).values()) == {torch.device("meta")}
    assert torch.equal(offloaded.forward(tokens), plain.forward(tokens))


def test_gguf_spec_loads_its_cached_folder_with_the_device_map(llama_dir, plain, tokens, tmp_path, monkeypatch):
    import gguf
    import numpy as np

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # A cached dequantization is what every later load reads; the dequantization itself is tested with SmolLM2.
    shutil.copytree(llama_dir, load_module._gguf_cache_dir(path))
    model = load_model(str(path), device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))
    assert model.model.hf_device_map == DISK_MAP
    assert_same_run(model, plain, tokens)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="cpu", device_map="auto"), r"give device or device_map, not both"),
    (dict(max_memory={"cpu": "1GB"}), r"max_memory and offload_folder only apply with device_map"),
    (dict(offload_folder="x"), r"max_memory and offload_folder only apply with device_map"),
    (dict(device_map="everywhere"), r"device_map 'everywhere' is neither a device name .* nor one of auto, balanced"),
    (dict(device_map={}), r"device_map must be one of auto, .* non-empty dict"),
    (dict(device_map=["cpu"]), r"device_map must be one of auto"),
    (dict(device_map={"model.layers.0": "floppy"}), r"device_map\['model.layers.0'\] = 'floppy' is neither"),
    (dict(device_map={"": 1.5}), r"expected a GPU index, a device name .* or 'disk'"),
    (dict(device_map={3: "cpu"}), r"device_map keys are module names"),
])
def test_bad_placement_arguments(llama_dir, kwargs, message):
    with pytest.raises(InterplabError, match=message):
        load_model(str(llama_dir), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_gpu_this_machine_lacks_is_named(llama_dir):
    with pytest.raises(InterplabError, match=r"device_map\[''\] = 0: no such CUDA device \(this machine has 0\)"):
        load_model(str(llama_dir), device_map={"": 0})


def test_what_accelerate_rejects_is_an_interplab_error(llama_dir):
    with pytest.raises(InterplabError, match=r"could not place .* with device_map='auto': `size` lots is not in a "
                                             r"valid format"):
        load_model(str(llama_dir), device_map="auto", max_memory={"cpu": "lots"})


def test_misspelled_module_in_the_map_is_an_error_not_a_silent_cpu_load(llama_dir):
    with pytest.raises(InterplabError, match=r"modules llama models do not have: \['model.layer.1'\]; keys are "
                                             r"module paths such as '', 'model.embed_tokens', 'model.layers.0'"):
        load_model(str(llama_dir), device_map={"": "cpu", "model.layer.1": "disk"})


def test_toy_models_take_a_device_not_a_device_map(tmp_path):
    ToyTransformer(ToyConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16)).save(tmp_path / "toy")
    with pytest.raises(InterplabError, match="device_map applies to Hugging Face models; .* is an interplab toy"):
        load_model(str(tmp_path / "toy"), device_map="auto")
