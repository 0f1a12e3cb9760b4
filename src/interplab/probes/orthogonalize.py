"""Weight orthogonalisation: directional ablation baked into the weights (Arditi et al. 2024, section 4.1).

Every matrix that writes to the residual stream has its output component along r̂ = r / ‖r‖ removed,

    W_out ← W_out − r̂ r̂ᵀ W_out          b_out ← b_out − (b_out · r̂) r̂

so that whatever it writes, y = W_out x + b_out, satisfies y · r̂ = 0. The writers are the token embedding (and the
learned position embedding, if any), each attention output projection and each MLP output projection. Because the
residual stream is the sum of their writes (and ablation is linear), the edited model computes exactly what
`interplab.probes.steer.ablation_hooks` computes on the original one, up to float rounding — for sequential and
parallel-residual blocks alike (see the `steer` docstring).

Layouts: `nn.Linear` (Llama o_proj/down_proj, GPT-NeoX dense/dense_4h_to_h) stores W as [out, in], so r̂ r̂ᵀ W
acts on rows; GPT-2's `Conv1D` (attn.c_proj, mlp.c_proj) stores it as [in, out] (y = x W + b), and embeddings as
[vocab, d_model]; there the component is removed from each row, W ← W − (W r̂) r̂ᵀ. Each edit checks that the axis
it projects has length d_model.

Tied embeddings (GPT-2 ties `lm_head.weight` to `wte.weight`): editing the shared tensor would also remove r̂ from
the unembedding, which hook ablation never touches, so the output embedding is first untied (cloned into its own
parameter) and `config.tie_word_embeddings` set to False; a saved model then stores both matrices and reloads untied.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from interplab.errors import InterplabError
from interplab.models.hf import HFHookedModel
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.probes.steer import unit_direction

ATTN_OUT_PROJ: dict[str, str] = {
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "qwen3": "self_attn.o_proj",
    "gpt2": "attn.c_proj",
    "gpt_neox": "attention.dense",
}
"""The attention output projection of each supported HF architecture, from a block."""

PROVENANCE_FILE = "interplab_orthogonalization.json"
"""Written next to the weights by `save_orthogonalized`: source model and the unit direction removed."""


@torch.no_grad()
def orthogonalize_weights(model: HFHookedModel, direction: Float[Tensor, " d_model"]) -> None:
    """Remove r̂ = r / ‖r‖ from every residual-stream writer of `model`, IN PLACE (see the module docstring).

    Unties tied input/output embeddings first. To keep the original, edit a copy: `copy.deepcopy(model)`, or use
    `save_orthogonalized`, which copies before editing. Weights in bf16/fp16 are edited in float32 and rounded back,
    so their component along r̂ is small but not ~1e-7 as in float32.
    """
    hf = _require_hf(model, "orthogonalize_weights")
    unit = unit_direction(direction, model.info.d_model)
    d_model = model.info.d_model
    _untie_embeddings(hf.model)
    writers: list[tuple[str, nn.Module]] = [(hf.arch.embed, hf.model.get_submodule(hf.arch.embed))]
    if hf.arch.pos_embed is not None:
        writers.append((hf.arch.pos_embed, hf.model.get_submodule(hf.arch.pos_embed)))
    attn_proj = ATTN_OUT_PROJ.get(hf.info.arch)
    if attn_proj is None:  # a new entry in models.hf.ARCHS that this table has not caught up with
        raise InterplabError(f"orthogonalize_weights does not know the attention output projection of "
                             f"'{hf.info.arch}'; known: {', '.join(sorted(ATTN_OUT_PROJ))}")
    for layer, block in enumerate(hf.blocks):
        for path in (attn_proj, hf.arch.mlp_out_proj):
            writers.append((f"{hf.arch.blocks}.{layer}.{path}", block.get_submodule(path)))
    for name, module in writers:
        weight_axis = _output_axis(module, name)
        _remove_component(module.weight, unit, weight_axis, d_model, f"{name}.weight")
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            _remove_component(bias, unit, 0, d_model, f"{name}.bias")


def save_orthogonalized(
    model_spec_or_model: str | os.PathLike | HFHookedModel,
    direction: Float[Tensor, " d_model"],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an orthogonalised copy of a model (and its tokenizer) to `out_dir`; return the folder.

    `model_spec_or_model` is a spec for `load_model` (loaded on CPU in float32) or a loaded HFHookedModel, which
    is deep-copied and left unchanged. The folder loads with `transformers.AutoModelForCausalLM.from_pretrained`
    and with `interplab.models.load_model`; it also holds `interplab_orthogonalization.json` (source, r̂).
    It is written to a temporary sibling folder and renamed into place, so a crash never leaves a half-written
    model at `out_dir`; an existing `out_dir` is an error unless `overwrite`.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InterplabError(f"output folder {out} already exists and is not empty; pass overwrite=True to replace it")
    if isinstance(model_spec_or_model, (str, os.PathLike)):
        model = _require_hf(load_model(str(model_spec_or_model), device="cpu"), "save_orthogonalized")
    else:
        source = _require_hf(model_spec_or_model, "save_orthogonalized")
        model = HFHookedModel(copy.deepcopy(source.model), source.tokenizer, source.info.spec)
    unit = unit_direction(direction, model.info.d_model)  # validate before the (slow) edit and write
    orthogonalize_weights(model, direction)
    hf = model.model
    if getattr(hf, "hf_quantizer", None) is not None:  # a dequantized GGUF model: plain float weights now
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        provenance = {
            "method": "weight orthogonalization (Arditi et al. 2024): W_out <- W_out - r r^T W_out",
            "source": model.info.spec,
            "arch": model.info.arch,
            "d_model": model.info.d_model,
            "direction_unit": unit.tolist(),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        if out.exists():  # overwrite: move the old folder aside first, so `out` is never half-written
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _require_hf(model: object, what: str) -> HFHookedModel:
    if isinstance(model, HFHookedModel):
        return model
    desc = f"{type(model).__name__} ({model.info.spec}, arch {model.info.arch})" if isinstance(model, HookedModel) \
        else type(model).__name__
    raise InterplabError(
        f"{what} edits Hugging Face weights and needs an HFHookedModel (load_model on an HF folder, hub id, .gguf or "
        f"'smollm2-135m'), got {desc}; for other models use interplab.probes.steer.ablation_hooks instead"
    )


def _untie_embeddings(hf_model: nn.Module) -> None:
    """Give the output embedding its own copy of a weight it shares with the input embedding."""
    inp, out = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    # Without this flag, from_pretrained (and any later tie_weights call) would re-tie them to the edited embedding.
    for config in {id(c): c for c in (hf_model.config, hf_model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def _output_axis(module: nn.Module, name: str) -> int:
    """The axis of `module.weight` that indexes the residual stream it writes to."""
    if isinstance(module, nn.Linear):
        return 0  # [out, in]
    if isinstance(module, (Conv1D, nn.Embedding)):
        return 1  # [in, out] and [vocab, d_model]
    raise InterplabError(f"cannot orthogonalize {name}: unexpected module type {type(module).__name__}")


def _remove_component(param: Tensor, unit: Tensor, axis: int, d_model: int, name: str) -> None:
    """param ← param − (param · r̂) r̂ along `axis`, in place; the arithmetic in at least float32."""
    if param.shape[axis] != d_model:
        raise InterplabError(f"{name} has shape {tuple(param.shape)}: axis {axis} should be d_model = {d_model}")
    view = param.data.movedim(axis, -1)  # a view: writing it writes the parameter
    dtype = torch.promote_types(param.dtype, torch.float32)
    x = view.to(dtype)
    r = unit.to(param.device, dtype)
    view.copy_(x - (x @ r)[..., None] * r)
