"""Hook-point vocabulary and the two ways of attaching a function to a module.

Hook names follow TransformerLens exactly, so code and habits carry over:

    hook_embed, hook_pos_embed
    blocks.{l}.hook_resid_pre, blocks.{l}.attn.hook_pattern, blocks.{l}.hook_attn_out,
    blocks.{l}.hook_resid_mid, blocks.{l}.mlp.hook_post, blocks.{l}.hook_mlp_out, blocks.{l}.hook_resid_post
    ln_final.hook_normalized

A hook function receives the activation and the hook's name and returns either a replacement of the same shape or
None (keep the activation, possibly edited in place).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
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
    "attn.hook_pattern",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


def hook_names_for(n_layers: int, *, has_pos_embed: bool, has_mlp: bool, has_resid_mid: bool) -> list[str]:
    """All hook names of a model, in forward order."""
    names = ["hook_embed"] + (["hook_pos_embed"] if has_pos_embed else [])
    skip = set()
    if not has_mlp:
        skip |= {"mlp.hook_post", "hook_mlp_out"}
    if not has_resid_mid:
        skip.add("hook_resid_mid")
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{h}" for h in BLOCK_HOOKS if h not in skip]
    return names + ["ln_final.hook_normalized"]


def parse_block_hook(name: str) -> tuple[int, str] | None:
    """`"blocks.3.hook_attn_out"` -> `(3, "hook_attn_out")`; None for names outside the blocks."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every requested activation has been read."""


def _checked(name: str, old: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor | None:
    if new is None or new is old:
        return None
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InterplabError(
            f"hook function for '{name}' returned {got}; it must return None or a tensor of shape {tuple(old.shape)}"
        )
    return new


def hook_module_output(module: nn.Module, name: str, fn: ActFn) -> RemovableHandle:
    """Call `fn` on a module's output (the first element when the module returns a tuple); let it replace it."""

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        act = output[0] if isinstance(output, tuple) else output
        new = _checked(name, act, fn(act))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def hook_module_input(module: nn.Module, name: str, fn: ActFn, kwarg: str = "hidden_states") -> RemovableHandle:
    """Call `fn` on a module's first input (positional, or the keyword `kwarg`); let it replace it."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        act = args[0] if args else kwargs[kwarg]
        new = _checked(name, act, fn(act))
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
