"""Per-head hook points and norm scales on Hugging Face models, as module hooks around HF's own forward pass.

- `attn.hook_q|k|v`: the projection outputs viewed as [batch, pos, head, d_head] (Llama's q/k/v_proj; GPT-2's fused
  c_attn split in thirds; NeoX's query_key_value, interleaved per head as [batch, pos, head, 3·d_head]). An edit is
  written back into the projection output, so rotary, q/k-norms and everything after see it.
- `attn.hook_z`: the output projection's input viewed per head. `attn.hook_result`: z_h @ W_O[h] per head, computed
  in a forward hook on the output projection only while hooked; an edit makes its output sum_h result_h + b_O.
- `ln1|ln2|ln_final.hook_scale`: recomputed from the norm's input as the norm computes it; an edited scale makes
  the norm output weight · (centred x / scale) + bias (LayerNorm) or weight · x / scale (RMSNorm).
- `attn.hook_rot_q|rot_k`, `attn.hook_attn_scores`, `attn.hook_pattern` live inside the attention function, which
  receives q and k after rotary: see `attention_with_hooks`.

An activation recomputed beside the forward pass (a scale, a result) replaces HF's tensor only when a hook edited
it, so reading any of these points changes no bit of the logits.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from interplab.models.hooks import (
    ActFn,
    CallbackHandle,
    call_hook,
    check_replacement,
    hook_module_input,
    hook_module_output,
    norm_scale,
    normalize_with_scale,
    split_norm,
)

EAGER_IMPL = "interplab_eager"
"""interplab's eager attention (all attention-internal hooks), with the eager mask."""
ATTN_KINDS = ("rot_q", "rot_k", "scores", "pattern")
"""The hooks inside the attention function, in the order it calls them."""

View = Callable[[torch.Tensor], torch.Tensor]


def _viewed(name: str, fn: ActFn, view: View, write: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ActFn:
    """`fn` applied to `view(act)`; a replacement is turned into a replacement of `act` by `write(act, new)`. An
    in-place edit of the view edits `act` itself (the view shares its storage)."""

    def outer(act: torch.Tensor) -> torch.Tensor | None:
        part = view(act)
        new = check_replacement(name, part, fn(part))
        return None if new is None else write(act, new)

    return outer


def _write_into_copy(view: View) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A copy of the whole activation with the viewed part replaced (for views of part of a fused output)."""

    def write(act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        view(out).copy_(new)
        return out

    return write


def qkv_view(layout: str, which: int, n_heads: int, n_kv_heads: int, d_head: int) -> View:
    """How to see q (which=0), k (1) or v (2) as [batch, pos, head, d_head] in a projection output.

    layout "separate": the output of q_proj / k_proj / v_proj itself; "thirds": GPT-2's c_attn, [q | k | v] along
    the last axis; "interleaved": NeoX's query_key_value, per head [q_h | k_h | v_h]."""
    heads = n_heads if which == 0 else n_kv_heads
    if layout == "separate":
        return lambda out: out.view(*out.shape[:-1], heads, d_head)
    if layout == "thirds":
        width = n_heads * d_head
        return lambda out: out[..., which * width:(which + 1) * width].view(*out.shape[:-1], heads, d_head)
    if layout == "interleaved":
        return lambda out: out.view(*out.shape[:-1], heads, 3 * d_head)[..., which * d_head:(which + 1) * d_head]
    raise AssertionError(f"unknown qkv layout {layout}")


def attach_qkv(proj: nn.Module, name: str, fn: ActFn, view: View, fused: bool) -> RemovableHandle:
    """hook_q/k/v on a projection's output; `fused`: the projection holds q, k and v together."""
    write = _write_into_copy(view) if fused else (lambda act, new: new.reshape(act.shape))
    return hook_module_output(proj, name, _viewed(name, fn, view, write))


def attach_z(out_proj: nn.Module, name: str, fn: ActFn, n_heads: int) -> RemovableHandle:
    """hook_z on the output projection's input, [batch, pos, head * d_head] seen as [batch, pos, head, d_head]."""

    def view(z: torch.Tensor) -> torch.Tensor:
        return z.view(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)

    return hook_module_input(out_proj, name, _viewed(name, fn, view, lambda act, new: new.reshape(act.shape)))


def _param(module: nn.Module, attr: str) -> torch.Tensor | None:
    """A module's parameter where it can be used now: accelerate keeps offloaded weights on `meta` between calls and
    in its hook's weights map, from where they are fetched to its execution device."""
    param = getattr(module, attr, None)
    if param is None or param.device.type != "meta":
        return param
    hook = getattr(module, "_hf_hook", None)
    for inner in [hook, *getattr(hook, "hooks", ())]:
        weights = getattr(inner, "weights_map", None)
        if weights is not None and attr in weights:
            return weights[attr].to(inner.execution_device)
    raise AssertionError(f"no weights for the offloaded {type(module).__name__}.{attr}")


def per_head_output_weight(out_proj: nn.Module, n_heads: int) -> Float[torch.Tensor, "head d_head d_model"]:
    """W_O per head from an nn.Linear ([d_model, head·d_head], y = x Wᵀ) or a GPT-2 Conv1D ([head·d_head, d_model],
    y = x W)."""
    weight = _param(out_proj, "weight")
    assert weight is not None
    if isinstance(out_proj, nn.Linear):
        weight = weight.T
    return weight.reshape(n_heads, -1, weight.shape[-1])


def attach_result(out_proj: nn.Module, name: str, fn: ActFn, n_heads: int) -> RemovableHandle:
    """hook_result: result[b, p, h] = z[b, p, h] @ W_O[h], [batch, pos, head, d_model], computed after the output
    projection ran; an edit replaces its output by sum_h result[b, p, h] + b_O."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        z = args[0] if args else kwargs["input"]
        w_o = per_head_output_weight(out_proj, n_heads).to(output.device)
        z = z.to(output.device).view(*z.shape[:-1], n_heads, w_o.shape[1])
        new = call_hook(name, torch.einsum("bphe,hed->bphd", z, w_o), fn)
        if new is None:
            return None
        bias = _param(out_proj, "bias")
        return new.sum(2) + (bias.to(output.device) if bias is not None else 0)

    return out_proj.register_forward_hook(hook, with_kwargs=True)


class NormSite:
    """The hook points of one HF norm (its scale; for ln_final also hook_normalized), run by one forward hook in
    that order, so that hook_normalized sees an edited scale. Registered while any function is attached."""

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.fns: dict[str, list[tuple[str, ActFn]]] = {"scale": [], "normalized": []}
        self.handle: RemovableHandle | None = None

    @staticmethod
    def of(norm: nn.Module) -> NormSite:
        site = norm.__dict__.get("_interplab_norm_site")
        if site is None:
            site = norm.__dict__["_interplab_norm_site"] = NormSite(norm)
        return site

    def attach(self, kind: str, name: str, fn: ActFn) -> CallbackHandle:
        entry = (name, fn)
        self.fns[kind].append(entry)
        if self.handle is None:
            self.handle = self.norm.register_forward_hook(self._hook, with_kwargs=True)

        def remove() -> None:
            self.fns[kind].remove(entry)
            if not any(self.fns.values()) and self.handle is not None:
                self.handle.remove()
                self.handle = None

        return CallbackHandle(remove)

    def _hook(self, _mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["hidden_states"]
        x = x.to(output.device)  # under a device_map the input may sit on the previous block's device
        scale, edited = None, False
        if self.fns["scale"]:
            scale = norm_scale(self.norm, x)
            for name, fn in self.fns["scale"]:
                new = call_hook(name, scale, fn)
                scale, edited = (scale, edited) if new is None else (new, True)
        normalized = None
        if self.fns["normalized"]:
            normalized = normalize_with_scale(self.norm, x, scale) if edited else split_norm(self.norm)[0](x)
            for name, fn in self.fns["normalized"]:
                new = call_hook(name, normalized, fn)
                normalized, edited = (normalized, edited) if new is None else (new, True)
        if not edited:
            return None
        if normalized is None:
            normalized = normalize_with_scale(self.norm, x, scale)
        return _weigh(self.norm, normalized).to(output.dtype)


def _weigh(norm: nn.Module, normalized: torch.Tensor) -> torch.Tensor:
    """The norm's weight (and bias) applied, as `split_norm`'s second map, with offloaded weights fetched."""
    weight, bias = _param(norm, "weight"), _param(norm, "bias")
    out = normalized * weight.to(normalized.device) if weight is not None else normalized
    return out + bias.to(normalized.device) if bias is not None else out


def _run_hooks(fns: list[ActFn], act: torch.Tensor) -> torch.Tensor:
    for fn in fns:
        new = fn(act)
        act = act if new is None else new
    return act


def _checked(name: str, fn: ActFn) -> ActFn:
    return lambda act: check_replacement(name, act, fn(act))


def _per_head_view(fn: ActFn) -> ActFn:
    """A hook on [batch, pos, head, d_head] applied to HF's [batch, head, pos, d_head]."""

    def outer(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act.transpose(1, 2))
        return None if new is None else new.transpose(1, 2)

    return outer


def attn_fns(module: nn.Module) -> dict[str, list[ActFn]]:
    """The functions hooked inside `module`'s attention function, by kind (ATTN_KINDS)."""
    return module.__dict__.setdefault("_interplab_attn_fns", {kind: [] for kind in ATTN_KINDS})


def add_attn_fn(module: nn.Module, kind: str, name: str, fn: ActFn) -> Callable[[], None]:
    """Hook `fn` inside `module`'s attention function; returns the remover."""
    wrapped = _checked(name, fn)
    if kind in ("rot_q", "rot_k"):
        wrapped = _per_head_view(wrapped)
    attn_fns(module)[kind].append(wrapped)
    return lambda: attn_fns(module)[kind].remove(wrapped)


def _apply_rot_hooks(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fns = module.__dict__.get("_interplab_attn_fns", {})
    return _run_hooks(fns.get("rot_q", []), query), _run_hooks(fns.get("rot_k", []), key)


def attention_with_hooks(
    module: nn.Module,
    query: Float[torch.Tensor, "batch head q d_head"],
    key: Float[torch.Tensor, "batch kv_head k d_head"],
    value: Float[torch.Tensor, "batch kv_head k d_head"],
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[Float[torch.Tensor, "batch q head d_head"], Float[torch.Tensor, "batch head q k"]]:
    """softmax(q kᵀ · scale + mask) v, calling `module`'s hooks on rotated q and k (per kv head), on the scores
    (scaled, masked) and on the pattern. Under grouped-query attention k and v are repeated only for the product."""
    query, key = _apply_rot_hooks(module, query, key)
    fns = module.__dict__.get("_interplab_attn_fns", {})
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention shares each k/v head among n_rep q heads
    if n_rep > 1:
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    scores = _run_hooks(fns.get("scores", []), scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = _run_hooks(fns.get("pattern", []), pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = (pattern @ value).transpose(1, 2).contiguous()
    return out, pattern


def rotary_impl(default: str) -> str:
    """The name of an attention implementation that calls the rotary hooks, then `default`'s own attention function
    with `default`'s own mask, so reading hook_rot_q/k changes no bit of the logits. Registered on first use."""
    name = f"interplab_rot_{default}"
    if name not in ALL_ATTENTION_FUNCTIONS:

        def rotary_then_default(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any,
                                **kwargs: Any) -> Any:
            query, key = _apply_rot_hooks(module, query, key)
            if default in ALL_ATTENTION_FUNCTIONS:
                inner = ALL_ATTENTION_FUNCTIONS[default]
            else:  # "eager": the model's own eager function, beside its attention class
                inner = sys.modules[type(module).__module__].eager_attention_forward
            return inner(module, query, key, *args, **kwargs)

        AttentionInterface.register(name, rotary_then_default)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[default])
    return name


def register_eager() -> None:
    AttentionInterface.register(EAGER_IMPL, attention_with_hooks)
    AttentionMaskInterface.register(EAGER_IMPL, eager_mask)
