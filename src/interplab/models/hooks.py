"""Hook-point vocabulary and the two ways of attaching a function to a module.

Hook names follow TransformerLens exactly, so code and habits carry over:

    hook_embed, hook_pos_embed
    blocks.{l}.hook_resid_pre, blocks.{l}.ln1.hook_scale,
    blocks.{l}.attn.hook_q|k|v            [batch, pos, head, d_head]  projections, before rotary (k, v per kv head)
    blocks.{l}.attn.hook_rot_q|rot_k      [batch, pos, head, d_head]  after rotary (rotary models only)
    blocks.{l}.attn.hook_attn_scores      [batch, head, q, k]         scaled, masked, before the softmax
    blocks.{l}.attn.hook_pattern, blocks.{l}.attn.hook_z (input of the output projection, per head),
    blocks.{l}.attn.hook_result           [batch, pos, head, d_model] z_h @ W_O[h], computed only while hooked
    blocks.{l}.hook_attn_out, blocks.{l}.hook_resid_mid, blocks.{l}.ln2.hook_scale, blocks.{l}.mlp.hook_pre,
    blocks.{l}.mlp.hook_post, blocks.{l}.hook_mlp_out, blocks.{l}.hook_resid_post
    ln_final.hook_scale, ln_final.hook_normalized, ln_final.hook_out

A norm's `hook_scale` [batch, pos, 1] is what it divides by: sqrt(mean((x - mean x)^2) + eps) for LayerNorm,
sqrt(mean(x^2) + eps) for RMSNorm. Editing it makes the norm divide by the edited scale.

The final norm has two: `ln_final.hook_normalized` is TransformerLens's, the normalised input *before* the norm's
weight and bias ((x - mean) / std for LayerNorm, x / rms(x) for RMSNorm); `ln_final.hook_out` is the norm's output,
weight and bias applied, which the unembedding reads (TransformerLens's model bridge calls its norm outputs hook_out).

A hook function receives the activation and the hook's name and returns either a replacement of the same shape or
None (keep the activation, possibly edited in place).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from jaxtyping import Float
from torch import nn
from torch.utils.hooks import RemovableHandle

from interplab.errors import InterplabError

HookFn = Callable[[torch.Tensor, str], Optional[torch.Tensor]]
"""`fn(activation, hook_name) -> replacement | None`."""

ActFn = Callable[[torch.Tensor], Optional[torch.Tensor]]
"""A hook function with its name already bound: what the model-specific attach code receives."""

# Per-block hook points in the order a forward pass reaches them.
BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "mlp.hook_in",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

HEAD_HOOKS = frozenset({"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result"})
"""Block hooks whose activation has a head axis (no per-token vector: `hook_dim` is None)."""

FINAL_HOOKS = ("ln_final.hook_scale", "ln_final.hook_normalized", "ln_final.hook_out")
"""The final norm's hook points, in forward order: its scale, before its weight (TransformerLens's name), after it."""


def hook_names_for(
    n_layers: int, *, has_pos_embed: bool, has_mlp: bool, has_resid_mid: bool, has_rotary: bool, has_norm: bool
) -> list[str]:
    """All hook names of a model, in forward order."""
    names = ["hook_embed"] + (["hook_pos_embed"] if has_pos_embed else [])
    skip = set()
    if not has_mlp:
        skip |= {"ln2.hook_scale", "mlp.hook_in", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"}
    if not has_resid_mid:
        skip.add("hook_resid_mid")
    if not has_rotary:
        skip |= {"attn.hook_rot_q", "attn.hook_rot_k"}
    if not has_norm:
        skip |= {"ln1.hook_scale", "ln2.hook_scale"}
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{h}" for h in BLOCK_HOOKS if h not in skip]
    return names + [h for h in FINAL_HOOKS if has_norm or h != "ln_final.hook_scale"]


def parse_block_hook(name: str) -> tuple[int, str] | None:
    """`"blocks.3.hook_attn_out"` -> `(3, "hook_attn_out")`; None for names outside the blocks."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every requested activation has been read."""


def check_replacement(name: str, old: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor | None:
    """What a hook function returned, as the replacement of `old` (None: keep it); an error if its shape differs."""
    if new is None or new is old:
        return None
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InterplabError(
            f"hook function for '{name}' returned {got}; it must return None or a tensor of shape {tuple(old.shape)}"
        )
    return new


def call_hook(name: str, act: torch.Tensor, fn: ActFn) -> torch.Tensor | None:
    """Run `fn` on an activation computed beside the forward pass (a scale, a per-head result) and say how it was
    edited: the replacement, `act` itself if `fn` changed it in place, None if untouched (then the caller keeps the
    forward pass's own tensors, so a read changes no bit). In-place edits are seen by the tensor's version counter,
    which inference-mode tensors lack: under torch.inference_mode only a returned replacement counts."""
    version = None if act.is_inference() else act._version
    new = check_replacement(name, act, fn(act))
    if new is not None:
        return new
    return act if version is not None and act._version != version else None


def hook_module_output(module: nn.Module, name: str, fn: ActFn) -> RemovableHandle:
    """Call `fn` on a module's output (the first element when the module returns a tuple); let it replace it."""

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        act = output[0] if isinstance(output, tuple) else output
        new = check_replacement(name, act, fn(act))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def hook_module_input(module: nn.Module, name: str, fn: ActFn, kwarg: str = "hidden_states") -> RemovableHandle:
    """Call `fn` on a module's first input (positional, or the keyword `kwarg`); let it replace it."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        act = args[0] if args else kwargs[kwarg]
        new = check_replacement(name, act, fn(act))
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, kwarg: new}

    return module.register_forward_pre_hook(hook, with_kwargs=True)


class CallbackHandle:
    """A removable handle for hooks that are not PyTorch module hooks (e.g. the attention-pattern hook)."""

    def __init__(self, remove: Callable[[], None]):
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


Handle = RemovableHandle | CallbackHandle
"""What attaching a hook returns: something with a `.remove()`."""


NormFn = Callable[[torch.Tensor], torch.Tensor]


def split_norm(norm: nn.Module) -> tuple[NormFn, NormFn]:
    """`(normalize, weigh)` with `weigh(normalize(x)) == norm(x)`: the normalised input before the norm's weight
    (TransformerLens's hook_normalized) and the affine map after it. Covers nn.LayerNorm, nn.Identity (no norm) and
    the RMSNorms of Llama-family models (a `weight` and `variance_epsilon` or `eps`), computed as they compute them."""
    if isinstance(norm, nn.Identity):
        return (lambda x: x), (lambda n: n)
    if isinstance(norm, nn.LayerNorm):
        def normalize_ln(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.layer_norm(x, norm.normalized_shape, None, None, norm.eps)

        def weigh_ln(n: torch.Tensor) -> torch.Tensor:
            n = n * norm.weight if norm.weight is not None else n
            return n + norm.bias if norm.bias is not None else n

        return normalize_ln, weigh_ln
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float) or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise InterplabError(f"cannot split the norm {type(norm).__name__} into normalisation and weight: interplab "
                             "knows LayerNorm and RMSNorm (weight, variance_epsilon)")

    def normalize_rms(x: torch.Tensor) -> torch.Tensor:  # in float32, as HF's RMSNorms compute it
        x32 = x.to(torch.float32)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return normalize_rms, (lambda n: norm.weight * n)  # read at call time: the model may have moved


def _is_layer_norm(norm: nn.Module) -> bool:
    """LayerNorm (centres, may have a bias) rather than RMSNorm; split_norm has already refused other norms."""
    return isinstance(norm, nn.LayerNorm)


def norm_scale(norm: nn.Module, x: Float[torch.Tensor, "*batch d"]) -> Float[torch.Tensor, "*batch 1"]:
    """What `norm` divides by: sqrt(mean((x - mean x)²) + eps) for LayerNorm, sqrt(mean(x²) + eps) for RMSNorm
    (in float32, as HF's RMSNorms compute it, returned in x's dtype)."""
    if _is_layer_norm(norm):
        return (x.var(-1, keepdim=True, unbiased=False) + norm.eps).sqrt()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x32 = x.to(torch.float32)
    return (x32.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)


def normalize_with_scale(
    norm: nn.Module, x: Float[torch.Tensor, "*batch d"], scale: Float[torch.Tensor, "*batch 1"]
) -> Float[torch.Tensor, "*batch d"]:
    """`norm`'s normalisation with a given scale, before its weight: (x - mean x) / scale for LayerNorm, x / scale
    for RMSNorm, x for no norm. Linear in x for a fixed scale."""
    if isinstance(norm, nn.Identity):
        return x
    if _is_layer_norm(norm):
        return (x - x.mean(-1, keepdim=True)) / scale
    return (x.to(torch.float32) / scale.to(torch.float32)).to(x.dtype)
