"""Hook points on Hugging Face causal LMs, without rewriting their forward pass.

Each architecture is described by where its parts live (`HFArch`); the hook points are PyTorch module hooks on
those parts, so with no hooks attached the logits are exactly HF's. Two points have no module of their own:

- `hook_resid_mid` (resid_pre + attn_out) is read by adding the two; an edit to it is applied as the same edit to
  `attn_out`, which is the only way it reaches the rest of the block.
- `attn.hook_pattern` and `attn.hook_attn_scores` need the attention scores, which fused kernels never
  materialise: while such a hook is attached the model switches to interplab's eager attention function
  (registered with transformers' AttentionInterface), which calls the hooks around the softmax. `attn.hook_rot_q|k`
  (q and k after rotary) are read in the attention function too, which then hands them to the model's own one.

The per-head points and the norms' scales are in `hf_heads.py`.

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
from transformers import PreTrainedTokenizerBase

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel, ModelInfo
from interplab.models.hf_heads import (
    EAGER_IMPL,
    NormSite,
    add_attn_fn,
    attach_qkv,
    attach_result,
    attach_z,
    qkv_view,
    register_eager,
    rotary_impl,
)
from interplab.models.hooks import (
    ActFn,
    CallbackHandle,
    Handle,
    hook_module_input,
    hook_module_output,
    hook_names_for,
    parse_block_hook,
    split_norm,
)


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
    ln1: str = "input_layernorm"
    """The norm before attention, from a block."""
    ln2: str = "post_attention_layernorm"
    """The norm before the MLP, from a block."""
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    """The q, k, v projections from the attention module: three, or one fused projection."""
    qkv_layout: str = "separate"
    """How q, k, v sit in the projection outputs (see `hf_heads.qkv_view`)."""
    attn_out_proj: str = "o_proj"
    """The attention's output projection, from the attention module: its input is `attn.hook_z`."""
    mlp_in: str = "mlp.gate_proj"
    """The MLP's input projection, from a block: its output is `mlp.hook_pre` (the gate, for gated MLPs)."""
    rotary: bool = True
    """Rotary position embeddings, applied to q and k inside the attention (so hook_rot_q/k exist)."""


_LLAMA = HFArch("model.embed_tokens", "model.layers", "model.norm", "self_attn", "mlp", "mlp.down_proj")
ARCHS: dict[str, HFArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": HFArch("transformer.wte", "transformer.h", "transformer.ln_f", "attn", "mlp", "mlp.c_proj",
                   pos_embed="transformer.wpe", ln1="ln_1", ln2="ln_2", qkv=("c_attn",), qkv_layout="thirds",
                   attn_out_proj="c_proj", mlp_in="mlp.c_fc", rotary=False),
    "gpt_neox": HFArch("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "mlp",
                       "mlp.dense_4h_to_h", parallel_residual_attr="use_parallel_residual",
                       qkv=("query_key_value",), qkv_layout="interleaved", attn_out_proj="dense",
                       mlp_in="mlp.dense_h_to_4h"),
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
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            d_head=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads, d_mlp=d_mlp,
            n_ctx=getattr(cfg, "max_position_embeddings", None) or cfg.n_positions, d_vocab=cfg.vocab_size,
        )
        self._hook_names = hook_names_for(
            self.info.n_layers, has_pos_embed=self.arch.pos_embed is not None, has_mlp=True,
            has_resid_mid=not self.parallel_residual, has_rotary=self.arch.rotary, has_norm=True,
        )
        self._n_attn_hooks = {"rotary": 0, "eager": 0}
        """Attention-function hooks attached: any eager one (scores, pattern) switches to interplab's eager
        attention; rotary ones alone wrap the model's own attention function."""
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

    def _final_norm_module(self) -> nn.Module:
        return self.model.get_submodule(self.arch.final_norm)

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
        if name in ("ln_final.hook_scale", "ln_final.hook_normalized"):
            kind = name.removeprefix("ln_final.hook_")
            return [NormSite.of(self.model.get_submodule(self.arch.final_norm)).attach(kind, name, fn)]
        layer, point = parse_block_hook(name)  # type: ignore[misc]  # valid names were checked by the caller
        block = self.blocks[layer]
        if point.startswith("attn.") or point in ("ln1.hook_scale", "ln2.hook_scale", "mlp.hook_pre"):
            return [self._attach_head_point(block, point, name, fn)]
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
        if point == "mlp.hook_in":  # what the MLP reads: ln2's output (a transcoder's input)
            return [hook_module_input(block.get_submodule(self.arch.mlp), name, fn)]
        if point == "hook_resid_mid":
            return self._attach_resid_mid(block, name, fn)
        raise AssertionError(f"no site for {name}")

    def _attach_head_point(self, block: nn.Module, point: str, name: str, fn: ActFn) -> Handle:
        """The attention's per-head points, the block's norm scales and the MLP's pre-activation."""
        arch, info = self.arch, self.info
        if point in ("ln1.hook_scale", "ln2.hook_scale"):
            norm = block.get_submodule(arch.ln1 if point == "ln1.hook_scale" else arch.ln2)
            return NormSite.of(norm).attach("scale", name, fn)
        if point == "mlp.hook_pre":
            return hook_module_output(block.get_submodule(arch.mlp_in), name, fn)
        attn = block.get_submodule(arch.attn)
        kind = point.removeprefix("attn.hook_")
        if kind in ("q", "k", "v"):
            which = "qkv".index(kind)
            proj = attn.get_submodule(arch.qkv[which] if len(arch.qkv) == 3 else arch.qkv[0])
            view = qkv_view(arch.qkv_layout, which, info.n_heads, info.n_kv_heads, info.d_head)
            return attach_qkv(proj, name, fn, view, fused=len(arch.qkv) == 1)
        if kind == "z":
            return attach_z(attn.get_submodule(arch.attn_out_proj), name, fn, info.n_heads)
        if kind == "result":
            return attach_result(attn.get_submodule(arch.attn_out_proj), name, fn, info.n_heads)
        kind = {"attn_scores": "scores"}.get(kind, kind)
        return self._attach_attention_fn(attn, kind, name, fn)

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

    def _attach_attention_fn(self, attn: nn.Module, kind: str, name: str, fn: ActFn) -> CallbackHandle:
        """A hook inside the attention function (rot_q, rot_k, scores, pattern), switching the implementation."""
        group = "rotary" if kind in ("rot_q", "rot_k") else "eager"
        remove_fn = add_attn_fn(attn, kind, name, fn)
        self._n_attn_hooks[group] += 1
        self._choose_attention()

        def remove() -> None:
            remove_fn()
            self._n_attn_hooks[group] -= 1
            self._choose_attention()

        return CallbackHandle(remove)

    def _choose_attention(self) -> None:
        """interplab's eager attention while a scores or pattern hook is attached; the model's own wrapped with the
        rotary hooks while only those are; else the model's own."""
        if self._n_attn_hooks["eager"]:
            register_eager()
            impl = EAGER_IMPL
        elif self._n_attn_hooks["rotary"]:
            impl = rotary_impl(self._default_attn_impl)
        else:
            impl = self._default_attn_impl
        self.model.config._attn_implementation = impl


def _execution_device(hook: Any) -> torch.device | None:
    """The device an accelerate hook runs its module on (None without one); SequentialHook wraps several."""
    for inner in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None
