"""Check a graph's claims in the real model: clamp or zero dictionary features and read the logits.

At layer i the real model runs as usual; the dictionary encodes the MLP's actual input of this (intervened) run,
f = encode_i(x_in), and every MLP output j the feature's decoders reach gets

    mlp_out_j ← mlp_out_j + Σ_{(p, f) clamped} (value − f[p, f]) · W_dec[i][f, j − i]    at position p,

the change in the dictionary's output when latent f is set to `value` (0 zeroes it) and re-decoded (circuit-tracer's
`feature_intervention`): j = i only for per-layer transcoders, every j ≥ i for a cross-layer transcoder.
Everything downstream — later MLPs (the real ones), attention, norms — responds, unless
`freeze_attention` holds the attention patterns at their clean values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.graphs.replacement import freeze_hooks
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn
from interplab.sae.mlp_dictionary import Dictionary, MLPDictionary, as_dictionary, mlp_in, mlp_out


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


def _check(dic: MLPDictionary, n_pos: int, clamps: Sequence[Clamp]) -> None:
    for c in clamps:
        if not 0 <= c.layer < dic.n_layers:
            raise InterplabError(f"no features at layer {c.layer}; layers are 0..{dic.n_layers - 1}")
        if not 0 <= c.pos < n_pos:
            raise InterplabError(f"clamp position {c.pos} outside the prompt's {n_pos} positions")
        if not 0 <= c.feature < dic.d_sae(c.layer):
            raise InterplabError(f"feature {c.feature} outside layer {c.layer}'s {dic.d_sae(c.layer)}")


def clamp_hooks(transcoders: Dictionary, clamps: Sequence[Clamp]) -> list[tuple[str, HookFn]]:
    """Hooks that encode each clamped layer's MLP input and add each clamp's change of the dictionary's output to
    the MLP outputs its decoders reach (its own layer; for a cross-layer transcoder also every later one)."""
    dic = as_dictionary(transcoders)
    pending: dict[int, torch.Tensor] = {}  # output layer -> what the clamps add there [batch, pos, d_model]
    hooks: list[tuple[str, HookFn]] = []
    reached: set[int] = set()
    for layer in sorted({c.layer for c in clamps}):
        mine = [c for c in clamps if c.layer == layer]
        rows = dic.decoder_rows(layer, torch.tensor([c.feature for c in mine], device=dic.device))  # [n, n_out, d]
        reached |= set(range(layer, layer + rows.shape[1]))

        def read(act: torch.Tensor, _name: str, layer: int = layer, mine: list[Clamp] = mine,
                 rows: torch.Tensor = rows) -> None:
            f = dic.encode(layer, act.to(dic.device, dic.dtype))  # [batch, pos, d_sae]: this run's activations
            for k, c in enumerate(mine):
                change = c.value - f[:, c.pos, c.feature]  # [batch]
                for j in range(rows.shape[1]):
                    add_to = pending.setdefault(layer + j, rows.new_zeros(*f.shape[:-1], rows.shape[2]))
                    add_to[:, c.pos] += change[:, None] * rows[k, j]

        hooks.append((mlp_in(layer), read))

    def add(act: torch.Tensor, name: str) -> torch.Tensor:
        delta = pending.get(int(name.split(".")[1]))
        return act if delta is None else act + delta.to(act)

    return hooks + [(mlp_out(j), add) for j in sorted(reached)]


@torch.no_grad()
def intervene(model: HookedModel, transcoders: Dictionary, tokens: Int[torch.Tensor, "batch pos"],
              clamps: Sequence[Clamp], *, freeze_attention: bool = False) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """Logits of the real model with the clamps applied (see the module docstring)."""
    dic = as_dictionary(transcoders)
    dic.check(model)
    tokens = model.check_tokens(tokens)
    _check(dic, tokens.shape[1], clamps)
    hooks: list[tuple[str, HookFn]] = []
    if freeze_attention:
        names = [n for n in model.hook_names if n.endswith("attn.hook_pattern")]
        clean = model.run_with_cache(tokens, names).cache
        hooks += [(n, fn) for n, fn in freeze_hooks(model, clean) if n in clean]
    return model.run_with_hooks(tokens, hooks + clamp_hooks(dic, clamps))


@torch.no_grad()
def logit_effects(model: HookedModel, transcoders: Dictionary, tokens: Int[torch.Tensor, "1 pos"],
                  clamps: Sequence[Clamp], token_ids: Sequence[int], *, freeze_attention: bool = False) -> LogitEffects:
    """How the clamps move the last-position logits of `token_ids` in the real model."""
    clean = model.forward(tokens)[0, -1]
    new = intervene(model, transcoders, tokens, clamps, freeze_attention=freeze_attention)[0, -1]
    ids = list(token_ids)
    before, after = clean[ids].double(), new[ids].double()
    shift = float(new.double().mean() - clean.double().mean())
    return LogitEffects(ids, before.tolist(), after.tolist(), (after - before).tolist(),
                        (after - before - shift).tolist())
