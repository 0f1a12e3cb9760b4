"""Activation patching: run the target prompt, replace one node's activation with the source prompt's, read the metric.

A patch at layer l changes nothing before l, so each hook's target run is split once (`HookedModel.run_prefix`)
and every node of that hook reruns only the block holding it and the blocks after it (`run_suffix`). A sweep over
every head of a 30-layer model therefore costs about half a forward pass per patch instead of one.

Directions (`direction_runs`): denoising runs the corrupted prompt and patches in clean activations (which nodes
are *sufficient* to restore the behaviour); noising runs the clean prompt and patches in corrupted activations
(which nodes are *necessary*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from interplab.circuits.metrics import PairMetric
from interplab.circuits.nodes import Grid, Node, patched
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel


class Runs(NamedTuple):
    """Which prompt is run (target) and which one's activations are patched in (source)."""

    target: Int[torch.Tensor, "n pos"]
    source: Int[torch.Tensor, "n pos"]


def direction_runs(direction: str, clean: torch.Tensor, corrupted: torch.Tensor) -> Runs:
    """denoise: run corrupted, patch from clean; noise: run clean, patch from corrupted."""
    if direction == "denoise":
        return Runs(corrupted, clean)
    if direction == "noise":
        return Runs(clean, corrupted)
    raise InterplabError(f"direction {direction!r} is not valid; choose denoise or noise")


@torch.no_grad()
def activation_patch(
    model: HookedModel,
    runs: Runs,
    grids: list[Grid],
    metric: PairMetric,
    *,
    batch_size: int = 16,
    progress: bool = False,
    source_acts: Mapping[str, torch.Tensor] | None = None,
    max_rows: int = 256,
) -> dict[str, Float[torch.Tensor, "n *grid"]]:
    """The metric of every pair with each node of `grids` patched from `runs.source` into `runs.target`.

    Returns raw metric values (normalise them with `metrics.normalise`), one array per grid of shape
    `[n_pairs, *grid.shape]`. Target and source must have the same shape (patches are positional).
    `source_acts` (activations by hook name, broadcastable to the target's) replaces the source run: zeros give zero
    ablation, the mean over a dataset mean ablation. Up to `max_rows` sequences run in one suffix pass: the
    variants of one hook are stacked along the batch (variant-major), which a CPU or GPU runs faster than one small
    batch after another.
    """
    if runs.target.shape != runs.source.shape:
        raise InterplabError(f"target and source prompts must have the same shape to patch position by position, "
                             f"got {tuple(runs.target.shape)} and {tuple(runs.source.shape)}")
    by_hook = _nodes_by_hook(grids)
    order = {name: i for i, name in enumerate(model.hook_names)}
    hooks = sorted(by_hook, key=lambda name: order[name])
    model.check_hook_names(hooks)
    n = runs.target.shape[0]
    values = {g.name: torch.empty(len(g.nodes), n) for g in grids}
    chunks = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    bar = tqdm(total=sum(len(v) for v in by_hook.values()) * len(chunks), desc="activation patching",
               unit="patch", disable=not progress)
    for rows in chunks:
        if source_acts is None:
            sources = model.run_with_cache(runs.source[rows], hooks).cache
        else:  # per-pair activations are cut to the chunk; broadcastable ones (a mean, zeros) are used as they are
            sources = {h: source_acts[h][rows] if source_acts[h].shape[0] == n > 1 else source_acts[h] for h in hooks}
        chunk_metric = metric.rows(rows)
        prefixes = model.run_prefixes(runs.target[rows], hooks)  # one pass for every hook's prefix
        for hook in hooks:
            prefix = prefixes[hook]
            source = sources[hook].to(prefix.act.device).expand_as(prefix.act)
            cells = by_hook[hook]
            per_pass = max(1, max_rows // prefix.act.shape[0])
            stacked = prefix.repeated(min(per_pass, len(cells)))
            for start in range(0, len(cells), per_pass):
                group = cells[start:start + per_pass]
                if len(group) < per_pass and len(cells) > per_pass:  # the last, shorter group
                    stacked = prefix.repeated(len(group))
                variants = torch.cat([patched(prefix.act, source, node) for _, _, node in group])
                logits = model.run_suffix(stacked, variants, last_only=True)
                for (grid_name, cell, _), part in zip(group, logits.chunk(len(group))):
                    values[grid_name][cell, rows] = chunk_metric(part).float().cpu()
                bar.update(len(group))
    bar.close()
    return {g.name: values[g.name].T.reshape(n, *g.shape) for g in grids}


def _nodes_by_hook(grids: list[Grid]) -> dict[str, list[tuple[str, int, Node]]]:
    out: dict[str, list[tuple[str, int, Node]]] = {}
    for grid in grids:
        for cell, node in enumerate(grid.nodes):
            out.setdefault(node.hook, []).append((grid.name, cell, node))
    return out
