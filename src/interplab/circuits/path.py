"""Path patching (Wang et al. 2022): the effect of one sender head on chosen receivers only, not through every path.

For each sender head (l, h):
1. run the target prompt with the sender's output (`attn.hook_z`, head h) taken from the source run and every later
   head frozen at its target value; MLPs recompute, so paths through MLPs count (as in Wang et al.);
2. read the receivers' inputs (a head's `hook_q`, `hook_k` or `hook_v`) in that run;
3. run the target prompt again with only those receiver inputs replaced, and read the metric.
With no receivers the receiver is the logits: later heads and every MLP from the sender's layer on are frozen, so
only the sender's direct path to the unembedding changes (the final norm recomputes its scale).
Senders in or after the first receiver's layer cannot reach it: their cells are NaN.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from interplab.circuits.metrics import PairMetric
from interplab.circuits.patching import Runs
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn

Receiver = tuple[int, int, str]
"""(layer, head, "q" | "k" | "v")."""


def check_receivers(model: HookedModel, receivers: list[Receiver]) -> None:
    """Refuse a receiver layer or head out of range (k and v heads are key-value heads under grouped-query
    attention)."""
    info = model.info
    for layer, head, which in receivers:
        n_heads = info.n_heads if which == "q" else info.n_kv_heads
        if not (0 <= layer < info.n_layers and 0 <= head < n_heads):
            raise InterplabError(f"receiver {layer}.{head}:{which} is out of range: layers 0..{info.n_layers - 1}, "
                                 f"{which} heads 0..{n_heads - 1}")


def _replace_heads(values: dict[int, torch.Tensor]) -> HookFn:
    """A hook putting `values[head]` (`[n, pos, d]`) into those heads' slices of a `[n, pos, head, d]` activation."""
    def hook(act: torch.Tensor, name: str) -> torch.Tensor:
        act = act.clone()
        for head, value in values.items():
            act[:, :, head] = value
        return act
    return hook


def _freeze(value: torch.Tensor) -> HookFn:
    return lambda act, name: value


@torch.no_grad()
def path_patch(
    model: HookedModel,
    runs: Runs,
    receivers: list[Receiver],
    metric: PairMetric,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[torch.Tensor, "n layer head"]:
    """Raw metric values `[n_pairs, n_layers, n_heads]` with each sender head path-patched (see the module doc)."""
    check_receivers(model, receivers)
    info = model.info
    n = runs.target.shape[0]
    last_sender = min((r[0] for r in receivers), default=info.n_layers)  # senders must come before every receiver
    out = torch.full((n, info.n_layers, info.n_heads), float("nan"))
    z_hooks = [f"blocks.{l}.attn.hook_z" for l in range(info.n_layers)]
    mlp_hooks = [f"blocks.{l}.hook_mlp_out" for l in range(info.n_layers) if f"blocks.{l}.hook_mlp_out" in
                 model.hook_names]
    bar = tqdm(total=last_sender * info.n_heads * -(-n // batch_size), desc="path patching", unit="sender",
               disable=not progress)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        target, source, chunk_metric = runs.target[rows], runs.source[rows], metric.rows(rows)
        target_cache = model.run_with_cache(target, z_hooks + mlp_hooks).cache
        source_z = model.run_with_cache(source, z_hooks[:last_sender]).cache
        for layer in range(last_sender):
            for head in range(info.n_heads):
                sender = (z_hooks[layer], _replace_heads({head: source_z[z_hooks[layer]][:, :, head]}))
                frozen = [(name, _freeze(target_cache[name])) for name in z_hooks[layer + 1:]]
                if receivers:
                    logits = _through_receivers(model, target, receivers, [sender, *frozen])
                else:
                    frozen += [(name, _freeze(target_cache[name])) for name in mlp_hooks[layer:]]
                    logits = model.run_with_hooks(target, [sender, *frozen])
                out[rows, layer, head] = chunk_metric(logits).float().cpu()
                bar.update()
    bar.close()
    return out


def _through_receivers(
    model: HookedModel, target: torch.Tensor, receivers: list[Receiver], hooks: list[tuple[str, HookFn]],
) -> torch.Tensor:
    """Steps 2 and 3: read the receivers' inputs under `hooks`, then rerun the target with only those replaced."""
    names = sorted({f"blocks.{layer}.attn.hook_{which}" for layer, _, which in receivers})
    inputs = model.run_with_cache(target, names, hooks=hooks).cache
    patches: dict[str, dict[int, torch.Tensor]] = {}
    for layer, head, which in receivers:
        name = f"blocks.{layer}.attn.hook_{which}"
        patches.setdefault(name, {})[head] = inputs[name][:, :, head]
    return model.run_with_hooks(target, [(name, _replace_heads(values)) for name, values in patches.items()])

