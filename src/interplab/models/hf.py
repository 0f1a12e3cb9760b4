"""Hook points on Hugging Face causal LMs, without rewriting their forward pass.

Each architecture is described by where its parts live (`HFArch`); the hook points are PyTorch module hooks on
those parts, so with no hooks attached the logits are exactly HF's. Two points have no module of their own:

- `hook_resid_mid` (resid_pre + attn_out) is read by adding the two; an edit to it is applied as the same edit to
  `attn_out`, which is the only way it reaches the rest of the block.
- `attn.hook_pattern` needs the attention probabilities, which fused kernels never materialise: while such a hook
  is attached the model switches to interplab's eager attention function (registered with transformers'
  AttentionInterface), which calls the hook between the softmax and the value mix.

A model spread by accelerate (load_model(..., device_map=...)) keeps its hooks where they are: accelerate moves
each module's inputs to that module's device inside the module's forward, so an activation stays on the device of
the module that computed it (a block's resid_pre on the previous block's device), and token ids go to the
embedding's execution device (`device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import AttentionInterface, PreTrainedTokenizerBase
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel, ModelInfo
from interplab.models.hooks import (
    ActFn,
    CallbackHandle,
    Handle,
    check_replacement,
    hook_module_input,
    hook_module_output,
    hook_names_for,
    parse_block_hook,
    split_norm,
)

ATTN_IMPL = "interplab_eager"


@dataclass(frozen=True)
class HFArch:
    """Where the parts of one HF architecture live (attribute paths)."""

    embed: str
    """Token embedding, from the top model."""
    blocks: str
    """The list of transformer blocks, from the top model."""
    final_norm: str
    """The norm before the unembedding, from the top model."""
    attn: str
    """Attention module, from a block; returns (attn_out, weights)."""
    mlp: str
    """MLP module, from a block."""
    mlp_out_proj: str
    """The MLP's output projection, from a block: its input is `mlp.hook_post`."""
    pos_embed: str | None = None
    """Learned position embedding, from the top model, if any."""
    parallel_residual_attr: str | None = None
    """Config attribute that says attention and MLP read the same residual (no resid_mid)."""


_LLAMA = HFArch("model.embed_tokens", "model.layers", "model.norm", "self_attn", "mlp", "mlp.down_proj")
ARCHS: dict[str, HFArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": HFArch("transformer.wte", "transformer.h", "transformer.ln_f", "attn", "mlp", "mlp.c_proj",
                   pos_embed="transformer.wpe"),
    "gpt_neox": HFArch("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "mlp",
                       "mlp.dense_4h_to_h", parallel_residual_attr="use_parallel_residual"),
}


class HFHookedModel(HookedModel):
    """A transformers causal LM with TransformerLens-named hook points."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, spec: str):
        model_type = model.config.model_type
        if model_type not in ARCHS:
            raise InterplabError(
                f"model type '{model_type}' of {spec} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.arch = ARCHS[model_type]
        cfg = model.config
        self.parallel_residual = bool(getattr(cfg, self.arch.parallel_residual_attr or "", False))
        self.blocks: nn.ModuleList = model.get_submodule(self.arch.blocks)
        n_heads = cfg.num_attention_heads
        d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        self.info = ModelInfo(
            spec=spec, arch=model_type, n_layers=len(self.blocks), d_model=cfg.hidden_size, n_heads=n_heads,
            d_head=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads, d_mlp=d_mlp,
            n_ctx=getattr(cfg, "max_position_embeddings", None) or cfg.n_positions, d_vocab=cfg.vocab_size,
        )
        self._hook_names = hook_names_for(
            self.info.n_layers, has_pos_embed=self.arch.pos_embed is not None, has_mlp=True,
            has_resid_mid=not self.parallel_residual,
        )
        self._n_pattern_hooks = 0
        self._default_attn_impl = cfg._attn_implementation

    @property
    def hook_names(self) -> list[str]:
        return self._hook_names

    @property
    def device(self) -> torch.device:
        """Where token ids go: the embedding's device (its execution device when accelerate placed the model,
        since an offloaded embedding's weights sit on `meta` between calls)."""
        embed = self.model.get_submodule(self.arch.embed)
        placed = _execution_device(getattr(embed, "_hf_hook", None))
        return placed if placed is not None else embed.weight.device

    def _final_norm(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return self.model.get_submodule(self.arch.final_norm)(resid)

    def _weigh_normalized(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        return split_norm(self.model.get_submodule(self.arch.final_norm))[1](normalized)

    def _unembed(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return self.model.get_output_embeddings()(normalized)

    def _forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return self.model(input_ids=tokens, use_cache=False).logits

    def _attach(self, name: str, fn: ActFn) -> list[Handle]:
        top = {
            "hook_embed": self.arch.embed,
            "hook_pos_embed": self.arch.pos_embed,
            "ln_final.hook_out": self.arch.final_norm,
        }
        if name in top:
            return [hook_module_output(self.model.get_submodule(top[name]), name, fn)]
        if name == "ln_final.hook_normalized":
            return [_attach_normalized(self.model.get_submodule(self.arch.final_norm), name, fn)]
        layer, point = parse_block_hook(name)  # type: ignore[misc]  # valid names were checked by the caller
        block = self.blocks[layer]
        if point == "hook_resid_pre":
            return [hook_module_input(block, name, fn)]
        if point == "hook_resid_post":
            return [hook_module_output(block, name, fn)]
        if point == "hook_attn_out":
            return [hook_module_output(block.get_submodule(self.arch.attn), name, fn)]
        if point == "hook_mlp_out":
            return [hook_module_output(block.get_submodule(self.arch.mlp), name, fn)]
        if point == "mlp.hook_post":
            return [hook_module_input(block.get_submodule(self.arch.mlp_out_proj), name, fn)]
        if point == "hook_resid_mid":
            return self._attach_resid_mid(block, name, fn)
        if point == "attn.hook_pattern":
            return [self._attach_pattern(block.get_submodule(self.arch.attn), fn)]
        raise AssertionError(f"no site for {name}")

    def _attach_resid_mid(self, block: nn.Module, name: str, fn: ActFn) -> list[Handle]:
        resid_pre: list[torch.Tensor] = []

        def remember_resid_pre(act: torch.Tensor) -> None:
            resid_pre[:] = [act]

        def on_attn_out(attn_out: torch.Tensor) -> torch.Tensor | None:
            # Under a device_map the block's pre-hook sees its input before accelerate moves it to the block's
            # device, so resid_pre may still sit on the previous block's device.
            pre = resid_pre[0].to(attn_out.device)
            resid_mid = pre + attn_out  # the same addition the block performs
            new_mid = fn(resid_mid)
            return None if new_mid is None or new_mid is resid_mid else new_mid - pre

        # The resid_pre reader is attached last among pre-hooks, so it sees any resid_pre edits.
        return [
            hook_module_input(block, name, remember_resid_pre),
            hook_module_output(block.get_submodule(self.arch.attn), name, on_attn_out),
        ]

    def _attach_pattern(self, attn: nn.Module, fn: ActFn) -> CallbackHandle:
        _register_attention_function()
        fns: list[ActFn] = attn.__dict__.setdefault("_interplab_pattern_fns", [])
        fns.append(fn)
        self._n_pattern_hooks += 1
        self.model.config._attn_implementation = ATTN_IMPL

        def remove() -> None:
            fns.remove(fn)
            self._n_pattern_hooks -= 1
            if self._n_pattern_hooks == 0:
                self.model.config._attn_implementation = self._default_attn_impl

        return CallbackHandle(remove)


def _attach_normalized(norm: nn.Module, name: str, fn: ActFn) -> Handle:
    """`ln_final.hook_normalized` on an HF norm: `fn` sees the normalised input before the weight (recomputed from
    the norm's input, as the norm computes it); a replacement is weighted as the norm weights, and becomes its output.
    """
    normalize, weigh = split_norm(norm)

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["hidden_states"]
        normalized = normalize(x.to(output.device))  # under a device_map the input may sit on the previous device
        new = check_replacement(name, normalized, fn(normalized))
        return None if new is None else weigh(new).to(output.dtype)

    return norm.register_forward_hook(hook, with_kwargs=True)


def _execution_device(hook: Any) -> torch.device | None:
    """The device an accelerate hook runs its module on (None without one); SequentialHook wraps several."""
    for inner in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _eager_attention_with_pattern_hook(
    module: nn.Module,
    query: Float[torch.Tensor, "batch head q d_head"],
    key: Float[torch.Tensor, "batch kv_head k d_head"],
    value: Float[torch.Tensor, "batch kv_head k d_head"],
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[Float[torch.Tensor, "batch q head d_head"], Float[torch.Tensor, "batch head q k"]]:
    """softmax(q kᵀ · scale + mask) v, with the pattern hooks of `module` applied to the softmax."""
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention shares each k/v head among n_rep q heads
    if n_rep > 1:
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    for fn in module.__dict__.get("_interplab_pattern_fns", []):
        new = fn(pattern)
        pattern = pattern if new is None else new
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = (pattern @ value).transpose(1, 2).contiguous()
    return out, pattern


def _register_attention_function() -> None:
    AttentionInterface.register(ATTN_IMPL, _eager_attention_with_pattern_hook)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
