"""Rank-1 subcomponents of a weight matrix, and the masked forward of any model through forward hooks.

One target weight W [d_out, d_in] (y = W x; an embedding's W is weight.T) is written as C rank-1 subcomponents

    W ≈ Σ_c U[c] ⊗ V[:, c]         U [C, d_out], V [d_in, C]

and, with a mask m [..., C] per input, the layer computes

    y = Σ_c m_c (V[:, c] · x) U[c] + bias        (Linear; an Embedding reads the row V[token] instead of V · x)

so m = 1 everywhere is the layer with weight Σ_c U[c] ⊗ V[:, c], and m_c = 0 removes exactly the rank-1 term c.
h_c = V[:, c] · x is subcomponent c's inner activation (the input of its causal-importance function).

`masked_forward` runs the model with some targets replaced this way: a forward hook on each target's writer module
swaps its output (interplab.decompose.sites: a Linear / Conv1D / Embedding module, or a toy transformer's weight reached
through its hook points), so the model's own forward is unchanged and any model whose targets are called as modules
takes masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.decompose.sites import Site, target_sites
from interplab.errors import InterplabError

Masks = Mapping[str, Tensor]
"""Per target name, a mask [..., C] broadcastable against the layer's inner activations."""


class LayerComponents(nn.Module):
    """C rank-1 subcomponents of one nn.Linear or nn.Embedding weight (see the module docstring)."""

    def __init__(self, site: Site, C: int, gen: torch.Generator) -> None:
        super().__init__()
        self.embedding = site.embedding
        d_out, d_in = site.weight.shape
        device = site.param.device
        # Kaiming-style scales: V reads d_in inputs, U sums C inner activations.
        self.V = nn.Parameter(torch.randn(d_in, C, generator=gen, device=device) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(C, d_out, generator=gen, device=device) / math.sqrt(C))
        self.register_buffer("bias", None if site.bias is None else site.bias.detach().clone())

    @property
    def C(self) -> int:
        return self.U.shape[0]

    def inner(self, x: Tensor) -> Float[Tensor, "... C"]:
        """h_c = V[:, c] · x (Linear) or V[token, c] (Embedding)."""
        return self.V[x] if self.embedding else x @ self.V

    def forward(self, x: Tensor, mask: Tensor | None = None,
                delta: tuple[Tensor, Tensor] | None = None) -> Float[Tensor, "... d_out"]:
        """Σ_c m_c h_c U[c] (+ m_Δ Δ x) (+ bias); mask None means all ones; delta = (Δ [d_out, d_in], m_Δ [...]):
        the residual W − Σ_c U[c] ⊗ V[:, c] as one more component with its own per-input mask."""
        h = self.inner(x)
        out = (h if mask is None else h * mask) @ self.U
        if delta is not None:
            residual, scale = delta
            out = out + (residual.T[x] if self.embedding else x @ residual.T) * scale[..., None]
        return out if self.bias is None else out + self.bias

    def weight(self) -> Float[Tensor, "d_out d_in"]:
        """Σ_c U[c] ⊗ V[:, c]: the weight all subcomponents together make."""
        return self.U.T @ self.V.T

    def matrices(self) -> Float[Tensor, "C d_out d_in"]:
        """Each subcomponent as a full matrix U[c] ⊗ V[:, c]."""
        return self.U[:, :, None] * self.V.T[:, None, :]


def module_key(name: str) -> str:
    """A target name as an nn.ModuleDict key ('.' is not allowed there)."""
    return name.replace(".", "/")


def target_modules(model: nn.Module, targets: list[str]) -> dict[str, Site]:
    """The sites of `targets` (interplab.decompose.sites.target_sites; kept under this name for callers)."""
    return target_sites(model, targets)


def make_components(model: nn.Module, targets: list[str], C: int, gen: torch.Generator) -> nn.ModuleDict:
    """C fresh subcomponents per target, keyed by `module_key(name)`."""
    if C < 1:
        raise InterplabError(f"C must be >= 1 subcomponents per layer, got {C}")
    return nn.ModuleDict({module_key(name): LayerComponents(site, C, gen)
                          for name, site in target_sites(model, targets).items()})


@contextmanager
def capture_inputs(model: nn.Module, targets: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record the input each target module receives during the forwards inside the block."""
    seen: dict[str, Tensor] = {}
    handles = [_read(site, seen, name) for name, site in target_sites(model, targets).items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def masked_forward(model: nn.Module, components: nn.ModuleDict, masks: Masks,
                   deltas: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> Iterator[set[str]]:
    """Inside the block, each target in `masks` computes Σ_c m_c h_c U[c] + bias instead of its own weight (plus
    m_Δ Δ x for a target in `deltas`, see LayerComponents.forward).

    Yields the set of targets whose replacement ran; `check_masks_apply` turns a missing one into an error."""
    fired: set[str] = set()
    seen: dict[str, Tensor] = {}
    handles = []
    for name, site in target_sites(model, list(masks)).items():
        layer = components[module_key(name)]
        delta = None if deltas is None else deltas.get(name)
        if not site.shares_module:
            handles.append(_read(site, seen, name))
        handles.append(site.writer.register_forward_hook(_replacer(layer, masks[name], name, fired, delta,
                                                                   None if site.shares_module else seen)))
    try:
        yield fired
    finally:
        for handle in handles:
            handle.remove()


def check_masks_apply(model: nn.Module, components: nn.ModuleDict, targets: list[str], x: Tensor) -> None:
    """Refuse a model whose forward does not call every target as a module (e.g. uses `.weight` directly): masks
    could not reach it. One forward on `x` with all masks 1 must run every replacement."""
    ones = {name: torch.ones(components[module_key(name)].C, device=x.device) for name in targets}
    with torch.no_grad(), masked_forward(model, components, ones) as fired:
        model(x)
    missing = [name for name in targets if name not in fired]
    if missing:
        raise InterplabError(f"the model's forward never calls {', '.join(missing)} as a module, so its weights "
                             "cannot be masked; decompose layers the forward calls (nn.Linear / nn.Embedding)")


def _read(site: Site, seen: dict[str, Tensor], name: str) -> torch.utils.hooks.RemovableHandle:
    """A hook on the site's reader that records x (its output, or its first input) in seen[name]."""
    if site.read_output:
        def after(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            seen[name] = output
        return site.reader.register_forward_hook(after)

    def before(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen[name] = args[0]
    return site.reader.register_forward_pre_hook(before)


def _replacer(layer: LayerComponents, mask: Tensor, name: str, fired: set[str],
              delta: tuple[Tensor, Tensor] | None = None, seen: dict[str, Tensor] | None = None
              ) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
    """The writer's forward hook: its output becomes the masked layer of x (its own input, or seen[name] recorded by
    the reader; a reader that did not run leaves the output alone and `fired` without the name)."""
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        x = args[0] if seen is None else seen.pop(name, None)
        if x is None:
            return None
        fired.add(name)
        return layer(x, mask, delta)
    return hook
