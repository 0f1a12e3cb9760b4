"""Where a decomposed weight lives in a model's forward: which activation it reads and whose output it makes.

A target is a weight W (y = W x + b convention) with a *reader* (the module whose input, or output, is the x the
weight multiplies) and a *writer* (the module whose output is W x + b, replaced by the masked subcomponents):

- nn.Linear (W = weight), transformers' Conv1D (GPT-2: W = weight.T) and nn.Embedding (W = weight.T, x the token
  ids): reader = writer = the module, x its input;
- the weight matrices of interplab's toy transformer (interplab.models.toy), which are parameters used inside a
  module's forward rather than modules, are reached through the toy's hook points:
  `blocks.L.mlp.W_in` (x = mlp.hook_in's output, replaces mlp.hook_pre's output), `blocks.L.mlp.W_out`
  (x = mlp.hook_post's output, replaces the MLP's output), `W_E` (x = the token ids the model is called with,
  replaces hook_embed's output) and `W_U` (x = ln_final's output, replaces the model's logits).

Names are resolved in `model.target_root` when the model has one (a wrapper such as decompose.lm.LogitsModel, so the
names are those of the wrapped Hugging Face model's `named_modules()`), else in the model itself.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor, nn

from interplab.errors import InterplabError

MAX_LISTED = 12
"""Valid names listed in an error message before '...'."""


class Site(NamedTuple):
    """One decomposable weight and where the forward reads its input and writes its output."""

    param: nn.Parameter
    """The stored weight."""
    transposed: bool
    """W (y = W x) is param.T (Embedding, Conv1D, the toy's [d_in, d_out] matrices) rather than param."""
    bias: Tensor | None
    """The bias added to W x (kept as is by the decomposition)."""
    embedding: bool
    """x is token ids: W x is the column W[:, token]."""
    reader: nn.Module
    """The module that sees x."""
    read_output: bool
    """x is the reader's output (else its first positional input)."""
    writer: nn.Module
    """The module whose output is W x + b."""

    @property
    def weight(self) -> Float[Tensor, "d_out d_in"]:
        """W in the y = W x convention."""
        return self.param.T if self.transposed else self.param

    @property
    def shares_module(self) -> bool:
        """Reader and writer are the same module, reading its input (a plain layer)."""
        return self.reader is self.writer and not self.read_output


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (y = x @ weight + bias), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), nn.Parameter)


def module_site(module: nn.Module) -> Site | None:
    """The site of a Linear / Conv1D / Embedding module, None for any other module."""
    if isinstance(module, nn.Linear):
        return Site(module.weight, False, module.bias, False, module, False, module)
    if _is_conv1d(module):
        return Site(module.weight, True, module.bias, False, module, False, module)
    if isinstance(module, nn.Embedding):
        return Site(module.weight, True, None, True, module, False, module)
    return None


def toy_sites(model: nn.Module) -> dict[str, Site]:
    """The toy transformer's decomposable weight matrices (see the module docstring); {} for any other model."""
    if not all(hasattr(model, a) for a in ("W_E", "W_U", "b_U", "hook_embed", "hook_ln_final_out", "blocks")):
        return {}
    sites = {"W_E": Site(model.W_E, True, None, True, model, False, model.hook_embed),
             "W_U": Site(model.W_U, True, model.b_U, False, model.hook_ln_final_out, True, model)}
    for i, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            continue
        sites[f"blocks.{i}.mlp.W_in"] = Site(mlp.W_in, True, mlp.b_in, False, mlp.hook_in, True, mlp.hook_pre)
        sites[f"blocks.{i}.mlp.W_out"] = Site(mlp.W_out, True, mlp.b_out, False, mlp.hook_post, True, mlp)
    return sites


def root_of(model: nn.Module) -> nn.Module:
    """The module whose names the targets are (model.target_root if it has one)."""
    return getattr(model, "target_root", model)


def all_sites(model: nn.Module) -> dict[str, Site]:
    """Every decomposable weight of the model by name."""
    root = root_of(model)
    found = {name: site for name, module in root.named_modules() if (site := module_site(module)) is not None}
    return {**found, **toy_sites(root)}


def target_sites(model: nn.Module, targets: list[str]) -> dict[str, Site]:
    """The sites named `targets`; an InterplabError for a name that is not a decomposable weight (listing some that
    are)."""
    if not targets:
        raise InterplabError("no layers to decompose; name at least one nn.Linear / nn.Embedding")
    sites = all_sites(model)
    found = {}
    for name in targets:
        if name not in sites:
            modules = dict(root_of(model).named_modules())
            what = f"a module of type {type(modules[name]).__name__}" if name in modules else "no module"
            valid = list(sites)
            listed = ", ".join(valid[:MAX_LISTED]) + (" ..." if len(valid) > MAX_LISTED else "")
            raise InterplabError(f"layer {name!r} is {what}, not a linear weight; valid: {listed or 'none'}")
        found[name] = sites[name]
    return found
