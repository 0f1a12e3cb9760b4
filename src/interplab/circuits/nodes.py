"""What a patching sweep patches: nodes (a slice of one hook's activation) laid out on a grid.

A node is one hook point restricted to a position and/or a head; patching it replaces that slice of the
activation with the source run's. The grid says where each node's effect goes in the result array, so activation
patching and attribution patching fill the same arrays, cell for cell.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from interplab.errors import InterplabError
from interplab.models.hooked import ModelInfo


class Node(NamedTuple):
    """One slice of one hook's activation `[batch, pos, ...]` or `[batch, pos, head, ...]`."""

    hook: str
    pos: int | None
    """Position patched (None: every position)."""
    head: int | None
    """Head patched, for per-head hooks (None: the whole activation at `pos`)."""

    def index(self) -> tuple[slice | int, ...]:
        """The index of this node's slice in an activation with a batch dimension first."""
        pos = slice(None) if self.pos is None else self.pos
        return (slice(None), pos) if self.head is None else (slice(None), pos, self.head)


class Grid(NamedTuple):
    """Nodes laid out on a labelled grid: `nodes[i]` fills the cell `numpy.unravel_index(i, shape)`."""

    name: str
    """What is patched, e.g. `head_out`, `resid_pre`, `head_q`."""
    axes: tuple[str, ...]
    """Axis names, e.g. ("layer", "head") or ("layer", "pos")."""
    shape: tuple[int, ...]
    nodes: list[Node]


PER_POSITION = {"resid": ("resid_pre", "hook_resid_pre"), "attn": ("attn_out", "hook_attn_out"),
                "mlp": ("mlp_out", "hook_mlp_out")}


def sweep_grids(info: ModelInfo, sweep: str, n_pos: int) -> list[Grid]:
    """The grids of a sweep (see `PatchConfig.sweep`).

    resid: `blocks.l.hook_resid_pre` by layer × position; layers: attention and MLP outputs by layer × position;
    heads / path: every head's `attn.hook_z` at all positions (patching z_h is patching head h's output, since
    result_h = z_h W_O[h]); heads-by-pos: the same by position; head-qkv: every head's q and every key-value
    head's k and v (fewer than the query heads under grouped-query attention).
    """
    layers = range(info.n_layers)
    if sweep == "resid":
        return [_per_position(info, "resid", n_pos)]
    if sweep == "layers":
        return [_per_position(info, "attn", n_pos)] + ([_per_position(info, "mlp", n_pos)] if info.d_mlp else [])
    if sweep in ("heads", "path"):
        nodes = [Node(f"blocks.{l}.attn.hook_z", None, h) for l in layers for h in range(info.n_heads)]
        return [Grid("head_out", ("layer", "head"), (info.n_layers, info.n_heads), nodes)]
    if sweep == "heads-by-pos":
        nodes = [Node(f"blocks.{l}.attn.hook_z", p, h)
                 for l in layers for h in range(info.n_heads) for p in range(n_pos)]
        return [Grid("head_out_by_pos", ("layer", "head", "pos"), (info.n_layers, info.n_heads, n_pos), nodes)]
    if sweep == "head-qkv":
        grids = []
        for which, n_heads in (("q", info.n_heads), ("k", info.n_kv_heads), ("v", info.n_kv_heads)):
            nodes = [Node(f"blocks.{l}.attn.hook_{which}", None, h) for l in layers for h in range(n_heads)]
            grids.append(Grid(f"head_{which}", ("layer", "head"), (info.n_layers, n_heads), nodes))
        return grids
    raise InterplabError(f"sweep {sweep!r} is not valid; choose resid, layers, heads, heads-by-pos, head-qkv, path")


def _per_position(info: ModelInfo, part: str, n_pos: int) -> Grid:
    name, point = PER_POSITION[part]
    nodes = [Node(f"blocks.{l}.{point}", p, None) for l in range(info.n_layers) for p in range(n_pos)]
    return Grid(name, ("layer", "pos"), (info.n_layers, n_pos), nodes)


def patched(target: torch.Tensor, source: torch.Tensor, node: Node) -> torch.Tensor:
    """`target` with `node`'s slice taken from `source` (a copy; neither input changes)."""
    out = target.clone()
    index = node.index()
    out[index] = source[index]
    return out
