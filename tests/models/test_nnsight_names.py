"""nnsight paths of interplab's hook names, checked without nnsight: each returned expression is evaluated against
the real HF module tree with a plain torch forward hook, and the tensor it names must equal run_with_cache's."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer, load_model
from interplab.models.nnsight_names import nnsight_path, resolve_path

PATH = re.compile(r"^model\.(?P<module>.+)\.(?P<kind>input|output)(?:\[(?P<index>\d+)\])?$")


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(str(tiny_hf_dir), device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.info.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def read_path(hf_model: torch.nn.Module, path: str, tokens: torch.Tensor, *, eager: bool = False) -> Any:
    """What an nnsight `path` would read in a forward pass: parse it, hook the module, run the model."""
    match = PATH.match(path)
    assert match, f"not an envoy expression this test understands: {path}"
    module = hf_model.get_submodule(re.sub(r"\[(\d+)\]", r".\1", match["module"]))
    seen: dict[str, Any] = {}

    def on_output(_mod: torch.nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
        seen["value"] = output

    def on_input(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # nnsight's .input: the first positional argument, else the first keyword argument
        seen["value"] = args[0] if args else next(iter(kwargs.values()))

    if match["kind"] == "output":
        handle = module.register_forward_hook(on_output, with_kwargs=True)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    default_impl = hf_model.config._attn_implementation
    try:
        if eager:
            hf_model.config._attn_implementation = "eager"
        with torch.no_grad():
            hf_model(input_ids=tokens, use_cache=False)
    finally:
        hf_model.config._attn_implementation = default_impl
        handle.remove()
    value = seen["value"]
    if match["index"] is not None:
        assert isinstance(value, tuple), f"{path} indexes a {type(value).__name__}, not a tuple"
        value = value[int(match["index"])]
    return value


DERIVED = ("hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
           "attn.hook_attn_scores", "attn.hook_z", "attn.hook_result")
"""Hook points that are views or functions of module tensors: refused with what to read (tested below)."""


def test_every_hook_path_reads_the_same_tensor_as_run_with_cache(model, tokens):
    for hook in model.hook_names:
        if hook == "ln_final.hook_normalized" or hook.endswith(DERIVED):  # no module path (tested below)
            continue
        # One hook per run: a pattern hook switches the whole model to eager attention, whose rounding differs.
        want = model.run_with_cache(tokens, [hook]).cache[hook]
        eager = hook.endswith("attn.hook_pattern")
        path = nnsight_path(model, hook, eager_attention=eager)
        got = read_path(model.model, path, tokens, eager=eager)
        assert isinstance(got, torch.Tensor), f"{hook}: {path} gives a {type(got).__name__}"
        assert torch.equal(got, want), f"{hook}: {path}"


def test_the_paths_name_the_usual_modules(model):
    expected = {
        "llama": ("model.model.layers[2].output", "model.model.layers[1].self_attn.output[0]",
                  "model.model.layers[0].mlp.down_proj.input", "model.model.norm.output"),
        "gpt2": ("model.transformer.h[2].output", "model.transformer.h[1].attn.output[0]",
                 "model.transformer.h[0].mlp.c_proj.input", "model.transformer.ln_f.output"),
        "gpt_neox": ("model.gpt_neox.layers[2].output", "model.gpt_neox.layers[1].attention.output[0]",
                     "model.gpt_neox.layers[0].mlp.dense_4h_to_h.input", "model.gpt_neox.final_layer_norm.output"),
    }[model.info.arch]
    hooks = ("blocks.2.hook_resid_post", "blocks.1.hook_attn_out", "blocks.0.mlp.hook_post",
             "ln_final.hook_out")
    assert tuple(nnsight_path(model, h) for h in hooks) == expected
    assert nnsight_path(model, "blocks.2.hook_resid_post", root="lm") == "lm" + expected[0].removeprefix("model")


def test_hook_normalized_has_no_path_and_says_how_to_get_it(model):
    norm = model.arch.final_norm
    with pytest.raises(InterplabError, match=rf"computed inside {norm} .* normalise {norm}.input yourself, or use "
                                             rf"ln_final.hook_out \({norm}.output, weight applied\)"):
        nnsight_path(model, "ln_final.hook_normalized")


def test_derived_points_are_refused_naming_what_to_read(model, tokens):
    for hook in [h for h in model.hook_names if h.endswith(DERIVED)]:
        with pytest.raises(InterplabError, match=rf"^{re.escape(hook)} has no nnsight path .*: it is "):
            nnsight_path(model, hook)
    # hook_z is the output projection's input, reshaped: read through the named path, it is the cached tensor
    with pytest.raises(InterplabError) as refusal:
        nnsight_path(model, "blocks.1.attn.hook_z")
    path = "model." + str(refusal.value).split(": it is ")[1].split(" viewed as")[0]  # named below the root
    z = read_path(model.model, path, tokens)
    want = model.run_with_cache(tokens, ["blocks.1.attn.hook_z"]).cache["blocks.1.attn.hook_z"]
    assert torch.equal(z.view(want.shape), want)


def test_model_info_and_hf_config_give_the_same_paths(model):
    for hook in model.hook_names:
        if hook.endswith(("attn.hook_pattern", *DERIVED)) or hook == "ln_final.hook_normalized":
            continue
        assert nnsight_path(model.model.config, hook) == nnsight_path(model, hook)  # what a remote user has
        if model.info.arch == "gpt_neox" and hook.endswith("hook_resid_mid"):
            with pytest.raises(InterplabError, match="for gpt_neox models pass the HookedModel or the HF config"):
                nnsight_path(model.info, hook)
            continue
        assert nnsight_path(model.info, hook) == nnsight_path(model, hook)
    if "blocks.0.hook_resid_mid" not in model.hook_names:  # parallel attention and MLP: the config knows
        with pytest.raises(InterplabError, match=r"unknown hook name 'blocks.0.hook_resid_mid'"):
            nnsight_path(model.model.config, "blocks.0.hook_resid_mid")


class Recorder:
    """Stands in for an nnsight model: records the attribute and index steps taken on it."""

    def __init__(self, steps: list | None = None) -> None:
        self.steps = [] if steps is None else steps

    def __getattr__(self, name: str) -> Recorder:
        self.steps.append(name)
        return Recorder(self.steps)

    def __getitem__(self, index: int) -> Recorder:
        self.steps.append(index)
        return Recorder(self.steps)


def test_resolve_path_takes_the_steps_the_expression_spells(model):
    path = nnsight_path(model, "blocks.1.hook_attn_out")
    walked, evaluated = Recorder(), Recorder()
    resolve_path(walked, path)
    eval(path, {"model": evaluated})  # the expression is valid Python, and resolve_path follows it exactly
    assert walked.steps == evaluated.steps == {
        "llama": ["model", "layers", 1, "self_attn", "output", 0],
        "gpt2": ["transformer", "h", 1, "attn", "output", 0],
        "gpt_neox": ["gpt_neox", "layers", 1, "attention", "output", 0],
    }[model.info.arch]
    for bad in ("model", "model.layers[x].output", "model.layers[1]].output", "model..layers"):
        untouched = Recorder()
        with pytest.raises(InterplabError, match="is not an nnsight path"):
            resolve_path(untouched, bad)
        assert untouched.steps == []  # nothing was read before the path was found bad


def test_paths_that_cannot_be_used_one_to_one_say_why(model):
    with pytest.raises(InterplabError, match=r"fused attention .* never materialises the pattern.*eager_attention"):
        nnsight_path(model, "blocks.0.attn.hook_pattern")
    with pytest.raises(InterplabError, match=r"cannot be edited through nnsight"):
        nnsight_path(model, "blocks.0.attn.hook_pattern", write=True, eager_attention=True)
    assert nnsight_path(model, "blocks.0.hook_resid_post", write=True).endswith("[0].output")
    if "blocks.0.hook_resid_mid" in model.hook_names:
        with pytest.raises(InterplabError, match=r"no single nnsight path to write: .* Edit .*output\[0\] by the"):
            nnsight_path(model, "blocks.0.hook_resid_mid", write=True)


def test_bad_inputs_are_clear_errors(model, tmp_path):
    with pytest.raises(InterplabError, match=r"unknown hook name\(s\) \['blocks.9.hook_resid_post'\]"):
        nnsight_path(model, "blocks.9.hook_resid_post")
    with pytest.raises(InterplabError, match=r"unknown hook name 'blocks.0.hook_z'"):
        nnsight_path(model.info, "blocks.0.hook_z")
    with pytest.raises(InterplabError, match="needs a HookedModel, its ModelInfo or the HF config, got str"):
        nnsight_path("gpt2", "hook_embed")  # type: ignore[arg-type]
    toy = ToyTransformer(ToyConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16))
    with pytest.raises(InterplabError, match=r"covers the Hugging Face architectures .* 'toy' model"):
        nnsight_path(toy, "blocks.0.hook_resid_post")
