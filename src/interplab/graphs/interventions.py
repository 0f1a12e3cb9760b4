"""Check a graph's claims in the real model: clamp or zero transcoder features and read the logits.

At layer l the real model runs as usual; the transcoder encodes the MLP's actual input of this (intervened) run,
f = encode(x_in), and the MLP output gets

    mlp_out ← mlp_out + Σ_{(p, i) clamped} (value − f[p, i]) · W_dec[i]    at position p,

the change in the transcoder's output when latent i is set to `value` (0 zeroes it) and re-decoded (circuit-tracer's
`feature_intervention`). Everything downstream — later MLPs (the real ones), attention, norms — responds, unless
`freeze_attention` holds the attention patterns at their clean values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.graphs.replacement import Transcoders, check_transcoders, freeze_hooks
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn


class Clamp(NamedTuple):
    """Set feature `feature` of layer `layer`'s transcoder to `value` at position `pos`."""

    layer: int
    pos: int
    feature: int
    value: float = 0.0


class LogitEffects(NamedTuple):
    token_ids: list[int]
    clean: list[float]
    """Last-position logits of the real model."""
    intervened: list[float]
    delta: list[float]
    """intervened − clean."""
    delta_vs_mean: list[float]
    """The change of (logit − mean logit over the vocabulary): what a graph's logit node measures."""


def _check(model: HookedModel, transcoders: Transcoders, n_pos: int, clamps: Sequence[Clamp]) -> None:
    for c in clamps:
        if c.layer not in transcoders:
            raise InterplabError(f"no transcoder for layer {c.layer}; layers are {sorted(transcoders)}")
        if not 0 <= c.pos < n_pos:
            raise InterplabError(f"clamp position {c.pos} outside the prompt's {n_pos} positions")
        if not 0 <= c.feature < transcoders[c.layer].sae.cfg.d_sae:
            raise InterplabError(f"feature {c.feature} outside layer {c.layer}'s {transcoders[c.layer].sae.cfg.d_sae}")


def clamp_hooks(transcoders: Transcoders, clamps: Sequence[Clamp]) -> list[tuple[str, HookFn]]:
    """Hooks at the MLPs of the clamped layers that add each clamp's change of the transcoder output."""
    inputs: dict[int, torch.Tensor] = {}
    hooks: list[tuple[str, HookFn]] = []
    for layer in sorted({c.layer for c in clamps}):
        mine = [c for c in clamps if c.layer == layer]

        def read(act: torch.Tensor, _name: str, layer: int = layer) -> None:
            inputs[layer] = act

        def add(act: torch.Tensor, _name: str, layer: int = layer, mine: list[Clamp] = mine) -> torch.Tensor:
            tc = transcoders[layer]
            f = tc.encode(inputs[layer].to(tc.device, tc.sae.W_enc.dtype))  # [batch, pos, d_sae]
            delta = torch.zeros_like(f[..., :1].expand(*f.shape[:-1], tc.sae.cfg.d_in)).clone()
            for c in mine:
                delta[:, c.pos] += (c.value - f[:, c.pos, c.feature])[:, None] * tc.sae.W_dec[c.feature]
            return act + delta.to(act)

        hooks += [(f"blocks.{layer}.mlp.hook_in", read), (f"blocks.{layer}.hook_mlp_out", add)]
    return hooks


@torch.no_grad()
def intervene(model: HookedModel, transcoders: Transcoders, tokens: Int[torch.Tensor, "batch pos"],
              clamps: Sequence[Clamp], *, freeze_attention: bool = False) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """Logits of the real model with the clamps applied (see the module docstring)."""
    check_transcoders(model, transcoders)
    tokens = model.check_tokens(tokens)
    _check(model, transcoders, tokens.shape[1], clamps)
    hooks: list[tuple[str, HookFn]] = []
    if freeze_attention:
        names = [n for n in model.hook_names if n.endswith("attn.hook_pattern")]
        clean = model.run_with_cache(tokens, names).cache
        hooks += [(n, fn) for n, fn in freeze_hooks(model, clean) if n in clean]
    return model.run_with_hooks(tokens, hooks + clamp_hooks(transcoders, clamps))


@torch.no_grad()
def logit_effects(model: HookedModel, transcoders: Transcoders, tokens: Int[torch.Tensor, "1 pos"],
                  clamps: Sequence[Clamp], token_ids: Sequence[int], *, freeze_attention: bool = False) -> LogitEffects:
    """How the clamps move the last-position logits of `token_ids` in the real model."""
    clean = model.forward(tokens)[0, -1]
    new = intervene(model, transcoders, tokens, clamps, freeze_attention=freeze_attention)[0, -1]
    ids = list(token_ids)
    before, after = clean[ids].double(), new[ids].double()
    shift = float(new.double().mean() - clean.double().mean())
    return LogitEffects(ids, before.tolist(), after.tolist(), (after - before).tolist(),
                        (after - before - shift).tolist())
