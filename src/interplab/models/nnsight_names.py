"""interplab hook names as nnsight envoy expressions, for reading the same tensors on a remote (NDIF) model.

nnsight wraps the unmodified Hugging Face model, so each of interplab's hook points is the input or output of one
HF module (see hf.py): `blocks.6.hook_resid_post` on a Llama is `model.model.layers[6].output`. In transformers 5
a decoder layer returns its hidden states as a plain tensor, while attention modules return (output, weights),
hence `.output` on blocks and `.output[0]` on attention. `.input` is nnsight's first argument of a module's call.

`mlp.hook_pre` is the output of the MLP's input projection (the gate of gated MLPs). The other per-head points and
the norms' scales are views or functions of module tensors (`attn.hook_z` is the output projection's input
reshaped to [batch, pos, head, d_head]): `nnsight_path` refuses them, naming the tensor to read and reshape.

Three hook points are not one module's input or output in both directions:

- `hook_resid_mid` is read as the input of the norm before the MLP (the residual stream after attention is
  exactly what that norm receives). Assigning to that input would change only what the MLP sees, not the residual
  stream the rest of the model reads, so it is refused with `write=True`.
- `attn.hook_pattern` is the second output of an attention module only under eager attention; fused kernels
  (sdpa, flash, the usual choice on NDIF) never materialise it, and writing it changes nothing downstream.
- `ln_final.hook_normalized` (TransformerLens's: the final norm's normalised input, before its weight) lives inside
  the norm's forward; it has no path and is refused with the way to compute it. `ln_final.hook_out` is the norm's
  output.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PretrainedConfig

from interplab.errors import InterplabError
from interplab.models.hf import ARCHS, HFArch
from interplab.models.hooked import HookedModel, ModelInfo
from interplab.models.hooks import hook_names_for, parse_block_hook

# The norm in front of each block's MLP, whose input is the residual stream after attention (hook_resid_mid).
_MLP_NORM = {"llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
             "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm", "gpt2": "ln_2",
             "gpt_neox": "post_attention_layernorm"}


def nnsight_path(
    model: HookedModel | ModelInfo | PretrainedConfig, hook: str, *, root: str = "model", write: bool = False,
    eager_attention: bool = False,
) -> str:
    """The nnsight expression that reads interplab's hook `hook` on the same HF model, e.g.
    `nnsight_path(model, "blocks.6.hook_resid_post") == "model.model.layers[6].output"` for a Llama.

    `model` is an interplab HookedModel, its ModelInfo, or the model's transformers config (all a remote model
    needs: `lm.config` of an nnsight model, or `AutoConfig.from_pretrained(repo_id)`). `root` is the name of your
    nnsight model variable. With `write=True` the path must also be a place to assign an edit that acts like
    interplab's hook edit (refused for `hook_resid_mid`, see the module docstring). `attn.hook_pattern` needs
    `eager_attention=True`: the model must run with `attn_implementation="eager"`.
    """
    arch_name = _check_hook(model, hook)
    return f"{root}.{_relative_path(ARCHS[arch_name], arch_name, hook, write=write, eager_attention=eager_attention)}"


def resolve_path(root: Any, path: str) -> Any:
    """Follow `path` (an `nnsight_path` result; its first name stands for `root`) attribute by attribute from
    `root`: `resolve_path(lm, "model.model.layers[6].output")` is `lm.model.layers[6].output`, without eval."""
    steps = path.partition(".")[2]
    if not _PATH.fullmatch(steps):  # checked before any access: on an nnsight envoy, reading .output is an action
        raise InterplabError(f"{path!r} is not an nnsight path such as 'model.model.layers[6].output'")
    for name, index in _STEP.findall(steps):
        root = getattr(root, name) if name else root[int(index)]
    return root


def _source_of_derived(arch: HFArch, block: str, point: str) -> str | None:
    """For a per-head point or a norm scale: what it is computed from, in nnsight terms (None for other points)."""
    attn = f"{block}.{arch.attn}"
    if point in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        which = "qkv".index(point[-1])
        proj = arch.qkv[which] if len(arch.qkv) == 3 else arch.qkv[0]
        return f"{attn}.{proj}.output viewed as [batch, pos, head, d_head] (layout '{arch.qkv_layout}', see hf_heads)"
    if point == "attn.hook_z":
        return f"{attn}.{arch.attn_out_proj}.input viewed as [batch, pos, head, d_head]"
    if point == "attn.hook_result":
        return f"{attn}.{arch.attn_out_proj}.input per head times that head's slice of its weight"
    if point in ("attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores"):
        return f"computed inside {attn}'s attention function, after rotary, which no module returns"
    if point in ("ln1.hook_scale", "ln2.hook_scale"):
        norm = arch.ln1 if point == "ln1.hook_scale" else arch.ln2
        return f"the scale {block}.{norm} divides {block}.{norm}.input by, computed inside it"
    return None


_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*")
_STEP = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


def _check_hook(model: HookedModel | ModelInfo | PretrainedConfig, hook: str) -> str:
    """Raise unless `hook` is a hook point of `model`; return its architecture name."""
    if isinstance(model, HookedModel):
        arch_name, spec, n_layers, resid_mid = model.info.arch, model.info.spec, model.info.n_layers, None
    elif isinstance(model, ModelInfo):
        arch_name, spec, n_layers, resid_mid = model.arch, model.spec, model.n_layers, None
    elif isinstance(model, PretrainedConfig):
        arch_name, spec = model.model_type, getattr(model, "name_or_path", "") or model.model_type
        n_layers = model.num_hidden_layers
        parallel = ARCHS[arch_name].parallel_residual_attr if arch_name in ARCHS else None
        resid_mid = not getattr(model, parallel or "", False)
    else:
        raise InterplabError(f"nnsight_path needs a HookedModel, its ModelInfo or the HF config, got "
                             f"{type(model).__name__}")
    if arch_name not in ARCHS:
        raise InterplabError(f"nnsight_path covers the Hugging Face architectures interplab hooks "
                             f"({', '.join(sorted(ARCHS))}); {spec} is a '{arch_name}' model, whose modules "
                             "are interplab's own: wrap it with nnsight.NNsight and read its hook modules instead")
    if isinstance(model, HookedModel):
        model.check_hook_names([hook])
        return arch_name
    if resid_mid is None and arch_name == "gpt_neox" and hook.endswith("hook_resid_mid"):
        # Whether the model has a resid_mid at all depends on use_parallel_residual, which ModelInfo omits.
        raise InterplabError("for gpt_neox models pass the HookedModel or the HF config, not the ModelInfo: "
                             "whether hook_resid_mid exists depends on the config's use_parallel_residual")
    valid = hook_names_for(n_layers, has_pos_embed=ARCHS[arch_name].pos_embed is not None, has_mlp=True,
                           has_resid_mid=resid_mid is not False, has_rotary=ARCHS[arch_name].rotary, has_norm=True)
    if hook not in valid:
        raise InterplabError(f"unknown hook name '{hook}' for {spec} ({arch_name}, {n_layers} layers); valid names "
                             f"look like hook_embed, blocks.{{0..{n_layers - 1}}}.hook_resid_post, "
                             "ln_final.hook_out")
    return arch_name


def _relative_path(arch: HFArch, arch_name: str, hook: str, *, write: bool, eager_attention: bool) -> str:
    """The expression below the nnsight root (which stands for the HF causal LM itself)."""
    top = {"hook_embed": arch.embed, "hook_pos_embed": arch.pos_embed, "ln_final.hook_out": arch.final_norm}
    if hook in top:
        return f"{top[hook]}.output"
    if hook == "ln_final.hook_scale":
        raise InterplabError(f"{hook} has no nnsight path (no module's input or output is it as it is): it is the "
                             f"scale {arch.final_norm} divides {arch.final_norm}.input by, computed inside it")
    if hook == "ln_final.hook_normalized":
        raise InterplabError(
            f"{hook} (the final norm's normalised input, before its weight) is computed inside {arch.final_norm} "
            f"and is no module's input or output: normalise {arch.final_norm}.input yourself, or use "
            f"ln_final.hook_out ({arch.final_norm}.output, weight applied)")
    layer, point = parse_block_hook(hook)  # type: ignore[misc]  # checked above
    block = f"{arch.blocks}[{layer}]"
    if point == "mlp.hook_pre":
        return f"{block}.{arch.mlp_in}.output"
    if point == "mlp.hook_in":
        return f"{block}.{arch.mlp}.input"
    if (source := _source_of_derived(arch, block, point)) is not None:
        raise InterplabError(f"{hook} has no nnsight path (no module's input or output is it as it is): it is "
                             f"{source}")
    if point == "hook_resid_pre":
        return f"{block}.input"
    if point == "hook_resid_post":
        return f"{block}.output"
    if point == "hook_attn_out":
        return f"{block}.{arch.attn}.output[0]"
    if point == "hook_mlp_out":
        return f"{block}.{arch.mlp}.output"
    if point == "mlp.hook_post":
        return f"{block}.{arch.mlp_out_proj}.input"
    if point == "hook_resid_mid":
        if write:
            raise InterplabError(
                f"{hook} has no single nnsight path to write: the residual stream after attention is never a "
                f"module's output. Edit {block}.{arch.attn}.output[0] by the same amount instead (as interplab does)"
            )
        return f"{block}.{_MLP_NORM[arch_name]}.input"
    if point == "attn.hook_pattern":
        weights = f"{block}.{arch.attn}.output[1]"
        if write:
            raise InterplabError(f"{hook} cannot be edited through nnsight: {weights} is returned after the "
                                 "attention has already mixed the values with it")
        if not eager_attention:
            raise InterplabError(
                f"{hook} cannot be read one-to-one in general: fused attention (sdpa, flash; the default, and what "
                f'NDIF servers run) never materialises the pattern. A model you load with attn_implementation="eager" '
                f"returns it as {weights}: pass eager_attention=True for that path"
            )
        return weights
    raise AssertionError(f"no nnsight path for {hook}")
