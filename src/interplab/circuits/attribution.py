"""Attribution patching (AtP, Nanda 2023) and its AtP* refinements (Kramár et al. 2024, arXiv 2403.00745).

Activation patching runs the model once per node; attribution patching estimates every node's effect from one
forward pass on the source (to cache its activations) and one forward + backward pass on the target:

    m(target with node n from source) ≈ m(target) + Σ_{i ∈ n} (a_src − a_tgt)_i · ∂m/∂a_i |_target

the first-order Taylor expansion of the metric around the target run, summed over the node's slice of the
activation. Pairs in a batch do not interact, so the gradient of Σ_pairs m gives each pair its own gradient.

AtP* refinements:
- **QK fix.** A query or key changes the metric only through its head's attention pattern, and a softmax near
  saturation makes the linear estimate through it badly wrong. For `attn.hook_q|k|rot_q|rot_k` nodes the pattern
  change is computed exactly instead: new scores with the source q (or k) of that slice, softmax, minus the target
  pattern, dotted with ∂m/∂pattern (the rest of the model stays linearised). Under grouped-query attention a key
  head serves n_heads / n_kv_heads query heads; their terms are summed.
- **GradDrop.** A node's direct and indirect effects can cancel in the gradient. For each layer l one more
  backward pass runs with the gradient into layer l's residual-stream contribution (its attention and MLP
  outputs) set to zero, giving I_l(n); the paper's estimate (its eq. 11) is c(n) = 1/(L−1) Σ_l |I_l(n)|. For a
  node inside layer k, I_k(n) = 0 (all of the node's gradient flows through layer k's output), so the mean runs
  over the L − 1 other layers; for residual-stream nodes (`hook_resid_pre`, ...) no term vanishes and we average
  over all L. The paper's c(n) is a magnitude, made for ranking; we keep it per pair and give it the sign of the
  plain AtP estimate so that it lies on the same axis as activation patching. Cost: L extra backward passes
  (each about a forward pass), with the target graph held in memory meanwhile. It needs at least 2 layers.

The result has activation patching's layout and meaning: per grid, `[n_pairs, *grid.shape]` metric values, not
normalised (the caller normalises with `metrics.normalise`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.metrics import Metric
from interplab.circuits.nodes import Grid, Node, patched
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.hooks import parse_block_hook

QK_POINTS = {"attn.hook_q": "q", "attn.hook_rot_q": "q", "attn.hook_k": "k", "attn.hook_rot_k": "k"}
"""Per-head points that act on the metric only through the attention pattern (the QK fix applies to them)."""

RESIDUAL_POINTS = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post"}
"""Block hooks on the residual stream itself: no layer's output holds them, so GradDrop drops no term of theirs."""

LAYER_OUTPUTS = ("hook_attn_out", "hook_mlp_out")
"""A layer's contribution to the residual stream, whose gradient GradDrop sets to zero."""


class _TargetPass(NamedTuple):
    metric: Float[Tensor, " n"]
    """m(target) per pair."""
    acts: dict[str, Tensor]
    """Target activations by hook name (detached)."""
    grads: list[dict[str, Tensor]]
    """Gradients of Σ m by hook name: first the plain backward pass, then one per dropped layer (GradDrop)."""


class _Plan(NamedTuple):
    """Which hooks each pass reads."""

    source: list[str]
    """Read on the source run (values only)."""
    target_grad: list[str]
    """Read on the target run with their gradient."""
    target_values: list[str]
    """Read on the target run, values only (attention scores, the q and k the attention sees)."""
    gates: dict[str, int]
    """GradDrop: layer outputs (hook name -> layer) whose gradient is zeroed when that layer is dropped."""


def attribution_patch(
    model: HookedModel,
    target: Int[Tensor, "n pos"],
    source: Int[Tensor, "n pos"],
    grids: list[Grid],
    metric: Metric,
    *,
    qk_fix: bool = True,
    grad_drop: bool = False,
) -> dict[str, Float[Tensor, "n *grid_shape"]]:
    """Estimate, per grid and per pair, m(target with node n from source) for every node n by attribution patching.

    m(target) + Σ_{slice of n} (a_src − a_tgt) · ∂m/∂a at the target run; with `qk_fix`, q/k nodes use the exact
    attention-pattern change; with `grad_drop`, the GradDrop magnitude of AtP* (see the module docstring). Costs one
    forward pass on `source`, one forward + backward on `target` (+ n_layers backward passes with `grad_drop`).
    """
    target, source = _check_inputs(model, target, source, grids, grad_drop)
    names = set(model.hook_names)
    plan = _plan(model, grids, names, qk_fix, grad_drop)
    src = model.run_with_cache(source, plan.source).cache
    tgt = _target_pass(model, target, metric, plan, grad_drop)
    qk = _QKFix(src, tgt.acts, names) if qk_fix else None
    terms = [_linear_terms(grids, src, tgt.acts, grads, qk) for grads in tgt.grads]
    if grad_drop:
        terms = [_grad_drop_combine(grids, terms[0], terms[1:])]
    return {grid.name: terms[0][grid.name] + tgt.metric.view(-1, *[1] * len(grid.shape)) for grid in grids}


# ---- validation and planning ------------------------------------------------------------------------------
def _check_inputs(model: HookedModel, target: Tensor, source: Tensor, grids: list[Grid],
                  grad_drop: bool) -> tuple[Tensor, Tensor]:
    target, source = model.check_tokens(target), model.check_tokens(source)
    if target.shape != source.shape:
        raise InterplabError(f"target and source tokens must have the same shape, got {tuple(target.shape)} and "
                             f"{tuple(source.shape)}")
    if not grids or any(not grid.nodes for grid in grids):
        raise InterplabError("attribution patching needs at least one grid, each with at least one node")
    if len({grid.name for grid in grids}) != len(grids):
        raise InterplabError(f"grid names must differ, got {[grid.name for grid in grids]}")
    if grad_drop and model.info.n_layers < 2:
        raise InterplabError("grad_drop needs a model with at least 2 layers: GradDrop averages over the layers "
                             "other than the node's own")
    model.check_hook_names(sorted({node.hook for grid in grids for node in grid.nodes}))
    n_pos = target.shape[1]
    for grid in grids:
        if len(grid.nodes) != _numel(grid.shape):
            raise InterplabError(f"grid {grid.name} has {len(grid.nodes)} nodes for shape {grid.shape}")
        for node in grid.nodes:
            _check_node(model, node, n_pos)
    return target, source


def _check_node(model: HookedModel, node: Node, n_pos: int) -> None:
    parsed = parse_block_hook(node.hook)
    point = parsed[1] if parsed else ""
    if point in ("attn.hook_pattern", "attn.hook_attn_scores"):
        raise InterplabError(f"node {node}: {point} is laid out [batch, head, q, k], not [batch, pos, ...]; patch "
                             "attn.hook_q or attn.hook_k to change a pattern")
    if node.pos is not None and not 0 <= node.pos < n_pos:
        raise InterplabError(f"node {node} patches position {node.pos}; valid positions are 0..{n_pos - 1}")
    if node.head is None:
        return
    kv = point in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")
    n_heads = model.info.n_kv_heads if kv else model.info.n_heads
    if not point.startswith("attn.") or not 0 <= node.head < n_heads:
        raise InterplabError(f"node {node} names head {node.head}; heads exist only at per-head hooks "
                             f"(attn.hook_q, hook_z, ...), numbered 0..{n_heads - 1} at this one")


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _plan(model: HookedModel, grids: list[Grid], names: set[str], qk_fix: bool, grad_drop: bool) -> _Plan:
    node_hooks = sorted({node.hook for grid in grids for node in grid.nodes})
    source, grad, values = set(node_hooks), set(node_hooks), set()
    if qk_fix:
        for hook in node_hooks:
            if _qk_kind(hook) is None:
                continue
            attn = _attn_names(hook, names)
            missing = [attn[key] for key in ("scores", "pattern") if attn[key] not in names]
            if missing:
                raise InterplabError(f"qk_fix needs the hooks {missing} on {model.info.spec}; pass qk_fix=False")
            source.add(attn[_qk_kind(hook)])  # type: ignore[index]
            values |= {attn["q"], attn["k"], attn["scores"]}
            grad.add(attn["pattern"])
    gates: dict[str, int] = {}
    if grad_drop:
        gates = {f"blocks.{layer}.{point}": layer for layer in range(model.info.n_layers) for point in LAYER_OUTPUTS
                 if f"blocks.{layer}.{point}" in names}
    return _Plan(sorted(source), sorted(grad), sorted(values - grad), gates)


def _qk_kind(hook: str) -> str | None:
    parsed = parse_block_hook(hook)
    return QK_POINTS.get(parsed[1]) if parsed else None


def _attn_names(hook: str, names: set[str]) -> dict[str, str]:
    """The hooks the QK fix reads in `hook`'s layer: q and k as the attention sees them (after rotary where the
    model has it), the masked scores and the pattern."""
    layer = parse_block_hook(hook)[0]  # type: ignore[index]
    base = f"blocks.{layer}.attn"
    seen = {which: f"{base}.hook_rot_{which}" if f"{base}.hook_rot_{which}" in names else f"{base}.hook_{which}"
            for which in ("q", "k")}
    return {**seen, "scores": f"{base}.hook_attn_scores", "pattern": f"{base}.hook_pattern"}


# ---- the target pass: values, metric, gradients --------------------------------------------------------------
class _Drop:
    """Which layer's output gradient is zeroed in the current backward pass (None: none)."""

    layer: int | None = None


def _target_pass(model: HookedModel, target: Tensor, metric: Metric, plan: _Plan, grad_drop: bool) -> _TargetPass:
    kept: dict[str, Tensor] = {}
    drop = _Drop()

    def read(act: Tensor, name: str) -> None:
        kept[name] = act.detach()

    def keep(act: Tensor, name: str) -> Tensor | None:
        if name not in plan.target_grad and not act.requires_grad:
            return None  # a gate with nothing upstream that needs a gradient
        # A leaf when nothing upstream needs a gradient; otherwise the graph stays whole, so that gradients of
        # earlier nodes still flow through this one.
        act = act if act.requires_grad else act.detach().requires_grad_(True)
        kept[name] = act
        out = act.view_as(act)  # a new tensor: the forward pass then uses it (also at points computed aside)
        if name in plan.gates:
            out.register_hook(_gate(drop, plan.gates[name]))
        return out

    hooks = [(name, read) for name in plan.target_values]
    hooks += [(name, keep) for name in sorted(set(plan.target_grad) | set(plan.gates))]
    with torch.enable_grad():
        logits = model.run_with_hooks(target, hooks)
        values = metric(logits)
        if values.shape != (target.shape[0],):
            raise InterplabError(f"the metric must return one value per pair, shape ({target.shape[0]},), got "
                                 f"{tuple(values.shape)}")
        inputs = [kept[name] for name in plan.target_grad]
        layers: list[int | None] = [None] + (list(range(model.info.n_layers)) if grad_drop else [])
        grads = []
        for i, layer in enumerate(layers):
            drop.layer = layer
            got = torch.autograd.grad(values.sum(), inputs, retain_graph=i < len(layers) - 1, allow_unused=True)
            grads.append({name: torch.zeros_like(a) if g is None else g.detach()
                          for name, a, g in zip(plan.target_grad, inputs, got)})
    acts = {name: act.detach() for name, act in kept.items()}
    return _TargetPass(values.detach(), acts, grads)


def _gate(drop: _Drop, layer: int) -> Callable[[Tensor], Tensor | None]:
    def hook(grad: Tensor) -> Tensor | None:
        return torch.zeros_like(grad) if drop.layer == layer else None
    return hook


# ---- estimates -------------------------------------------------------------------------------------------------
class _QKFix(NamedTuple):
    src: dict[str, Tensor]
    tgt: dict[str, Tensor]
    names: set[str]

    def effect(self, node: Node, grads: dict[str, Tensor]) -> Float[Tensor, " n"]:
        """Σ (A_new − A_tgt) · ∂m/∂A over the heads `node` feeds, with A_new the exact pattern after the patch.

        Scores are bilinear in q and k, so the new scores are the target's (mask included) plus Δq·k or q·Δk
        times d_head^-1/2; masked entries stay masked.
        """
        kind = _qk_kind(node.hook)
        attn = _attn_names(node.hook, self.names)
        q, k = _wide(self.tgt[attn["q"]]), _wide(self.tgt[attn["k"]])  # [n pos head d_head], [n pos kv d_head]
        n_heads, n_kv = q.shape[2], k.shape[2]
        group = n_heads // n_kv  # query heads per key head (grouped-query attention)
        own = node.head if node.head is not None else None
        if kind == "q":
            heads = list(range(n_heads)) if own is None else [own]
            delta = patched(q, _wide(self.src[attn["q"]]), node) - q
            dscores = torch.einsum("nqhd,nkhd->nhqk", delta[:, :, heads], k[:, :, [h // group for h in heads]])
        else:
            kv_heads = list(range(n_kv)) if own is None else [own]
            heads = [h for g in kv_heads for h in range(g * group, (g + 1) * group)]
            delta = patched(k, _wide(self.src[attn["k"]]), node) - k
            dscores = torch.einsum("nqhd,nkhd->nhqk", q[:, :, heads], delta[:, :, [h // group for h in heads]])
        scores = _wide(self.tgt[attn["scores"]][:, heads])
        masked = ~torch.isfinite(scores) | (scores <= torch.finfo(scores.dtype).min / 2)
        old = scores.masked_fill(masked, float("-inf")).softmax(-1)
        new = (scores + dscores * q.shape[-1] ** -0.5).masked_fill(masked, float("-inf")).softmax(-1)
        return ((new - old) * _wide(grads[attn["pattern"]][:, heads])).flatten(1).sum(1)


def _linear_terms(grids: list[Grid], src: dict[str, Tensor], tgt: dict[str, Tensor], grads: dict[str, Tensor],
                  qk: _QKFix | None) -> dict[str, Float[Tensor, "n *grid_shape"]]:
    """Per grid, the estimated change of the metric for each node: [n, *grid.shape]."""
    products: dict[str, Tensor] = {}
    out = {}
    for grid in grids:
        cells = []
        for node in grid.nodes:
            if qk is not None and _qk_kind(node.hook) is not None:
                cells.append(qk.effect(node, grads))
                continue
            if node.hook not in products:
                products[node.hook] = (_wide(src[node.hook]) - _wide(tgt[node.hook])) * _wide(grads[node.hook])
            cells.append(products[node.hook][node.index()].flatten(1).sum(1))
        out[grid.name] = torch.stack(cells, -1).view(-1, *grid.shape)
    return out


def _wide(x: Tensor) -> Tensor:
    """x in float32 at least (half-precision models: products and softmaxes are summed over many terms)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _grad_drop_combine(grids: list[Grid], plain: dict[str, Tensor], dropped: list[dict[str, Tensor]]
                       ) -> dict[str, Float[Tensor, "n *grid_shape"]]:
    """sign(plain AtP) · mean over the layers l other than the node's own of |I_l(n)| (the paper's eq. 11)."""
    out = {}
    for grid in grids:
        terms = torch.stack([d[grid.name] for d in dropped])  # [layer n *shape]
        weight = torch.ones(len(dropped), len(grid.nodes))
        for i, node in enumerate(grid.nodes):
            layer = _own_layer(node.hook)
            if layer is not None:
                weight[layer, i] = 0.0
        weight = weight.view(len(dropped), 1, *grid.shape).to(terms)
        magnitude = (terms.abs() * weight).sum(0) / weight.sum(0)
        sign = torch.where(plain[grid.name] < 0, -1.0, 1.0).to(magnitude)
        out[grid.name] = sign * magnitude
    return out


def _own_layer(hook: str) -> int | None:
    """The layer whose output holds this hook's activation (None for the residual stream and outside the blocks)."""
    parsed = parse_block_hook(hook)
    if parsed is None or parsed[1] in RESIDUAL_POINTS:
        return None
    return parsed[0]
