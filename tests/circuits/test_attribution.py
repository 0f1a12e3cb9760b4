"""Attribution patching against independent expectations: activation patching by hand where the metric is exactly
linear in the node, a central finite difference where it is not, the exact pattern change for the QK fix (also
under grouped-query attention), and GradDrop's terms derived by hand on a 2-layer model."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.attribution import attribution_patch
from interplab.circuits.metrics import MetricTargets, make_metric
from interplab.circuits.nodes import Grid, Node, patched, sweep_grids
from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.models.toy import ToyConfig, ToyTransformer

N, POS, VOCAB = 3, 7, 20


def _toy(**kw) -> ToyTransformer:
    cfg = dict(n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=None, n_ctx=16, d_vocab=VOCAB, layer_norm=False,
               init_std=0.4, seed=3)
    return ToyTransformer(ToyConfig(**{**cfg, **kw})).double().eval()


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, POS), generator=torch.Generator().manual_seed(seed))


TARGET, SOURCE = _tokens(1), _tokens(2)
LOGIT_DIFF = make_metric("logit-diff", MetricTargets(torch.tensor([1, 4, 7]), torch.tensor([2, 5, 9]),
                                                     torch.zeros(N, VOCAB)))


def _grid(name: str, nodes: list[Node]) -> Grid:
    return Grid(name, ("node",), (len(nodes),), nodes)


def _head_nodes(hook: str, n_heads: int) -> list[Node]:
    return [Node(hook, None, h) for h in range(n_heads)]


@torch.no_grad()
def _activation_patch(model, node: Node, metric=LOGIT_DIFF) -> torch.Tensor:
    """m(target with node from source), by a full forward pass with run_with_hooks."""
    src = model.run_with_cache(SOURCE, [node.hook]).cache[node.hook]
    return metric(model.run_with_hooks(TARGET, [(node.hook, lambda act, name: patched(act, src, node))]))


def _patched_along(model, node: Node, step: float, metric=LOGIT_DIFF) -> torch.Tensor:
    """m(target with node's slice moved by step · (a_src − a_tgt))."""
    src = model.run_with_cache(SOURCE, [node.hook]).cache[node.hook]
    tgt = model.run_with_cache(TARGET, [node.hook]).cache[node.hook]
    moved = tgt + step * (src - tgt)
    with torch.no_grad():
        return metric(model.run_with_hooks(TARGET, [(node.hook, lambda act, name: patched(act, moved, node))]))


def test_equals_activation_patching_where_the_metric_is_linear_in_the_node():
    """Attention-only, no LayerNorm: logits are linear in the last layer's z (per head, per position) and attn_out."""
    model = _toy()
    last = model.info.n_layers - 1
    z = f"blocks.{last}.attn.hook_z"
    nodes = _head_nodes(z, 3) + [Node(z, p, h) for p in (0, 3, POS - 1) for h in range(3)]
    nodes += [Node(f"blocks.{last}.hook_attn_out", p, None) for p in range(POS)]
    got = attribution_patch(model, TARGET, SOURCE, [_grid("g", nodes)], LOGIT_DIFF)["g"]
    expected = torch.stack([_activation_patch(model, node) for node in nodes], -1)
    assert got.shape == (N, len(nodes))
    base = LOGIT_DIFF(model(TARGET))
    assert (expected - base[:, None]).abs().max() > 0.1  # the patches do move the metric
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_is_the_first_order_taylor_term_on_a_nonlinear_model():
    """LayerNorm + MLP + two layers, so patching is not linear: AtP − m(target) equals the directional derivative
    along the patch, measured by a central finite difference; and differs from the full patch."""
    model = _toy(d_mlp=32, layer_norm=True, n_layers=2)
    nodes = [Node("blocks.0.hook_resid_pre", 2, None), Node("blocks.1.hook_resid_pre", POS - 1, None),
             Node("blocks.0.hook_attn_out", 4, None), Node("blocks.0.hook_mlp_out", POS - 1, None),
             Node("blocks.0.attn.hook_z", None, 1), Node("blocks.1.attn.hook_z", 5, 2),
             Node("blocks.0.attn.hook_q", None, 0), Node("blocks.1.attn.hook_k", None, 2),
             Node("blocks.0.attn.hook_v", None, 1), Node("blocks.0.mlp.hook_post", None, None)]
    got = attribution_patch(model, TARGET, SOURCE, [_grid("g", nodes)], LOGIT_DIFF, qk_fix=False)["g"]
    base = LOGIT_DIFF(model(TARGET)).detach()
    eps = 1e-4
    for i, node in enumerate(nodes):
        derivative = (_patched_along(model, node, eps) - _patched_along(model, node, -eps)) / (2 * eps)
        torch.testing.assert_close(got[:, i] - base, derivative, atol=1e-6, rtol=1e-6)
    full = torch.stack([_activation_patch(model, node) for node in nodes], -1)
    assert (full - got).abs().max() > 1e-2  # the model is nonlinear enough for the two to differ


def test_qk_fix_is_exact_when_only_the_last_layers_pattern_changes():
    """On the last layer of an attention-only model without LayerNorm the logits are linear in the pattern, so the
    QK fix (exact pattern change, linear after it) must equal patching q or k with run_with_hooks; plain AtP,
    linear through the softmax, does not."""
    model = _toy(init_std=0.8)
    last = model.info.n_layers - 1
    nodes = _head_nodes(f"blocks.{last}.attn.hook_q", 3) + _head_nodes(f"blocks.{last}.attn.hook_k", 3)
    nodes += [Node(f"blocks.{last}.attn.hook_q", POS - 1, 1), Node(f"blocks.{last}.attn.hook_k", 2, 0)]
    grids = [_grid("g", nodes)]
    fixed = attribution_patch(model, TARGET, SOURCE, grids, LOGIT_DIFF, qk_fix=True)["g"]
    plain = attribution_patch(model, TARGET, SOURCE, grids, LOGIT_DIFF, qk_fix=False)["g"]
    expected = torch.stack([_activation_patch(model, node) for node in nodes], -1)
    torch.testing.assert_close(fixed, expected, atol=1e-6, rtol=0)
    assert (plain - expected).abs().max() > 1e-2


def test_qk_fix_sums_a_key_head_over_its_query_heads_under_gqa(tiny_llama_dir):
    """Llama with 4 query heads and 2 key-value heads (rotary)."""
    model = load_model(str(tiny_llama_dir), device="cpu")
    assert (model.info.n_heads, model.info.n_kv_heads) == (4, 2)
    _check_qk_fix_against_the_models_own_pattern(model)


def test_qk_fix_on_every_hf_architecture(tiny_hf_dir):
    """GPT-2 (no rotary: hook_q is what attention sees), NeoX parallel and sequential (rotary), Llama."""
    _check_qk_fix_against_the_models_own_pattern(load_model(str(tiny_hf_dir), device="cpu"))


def _check_qk_fix_against_the_models_own_pattern(model) -> None:
    """The k node of kv head g patches hook_k (before rotary, if any); the expected value is Σ over the query heads
    it serves (A_patched − A_target)·∂m/∂A, with A_patched read from the model's own forward pass with hook_k
    patched, and ∂m/∂A by autograd at hook_pattern. Likewise for a q node (one query head)."""
    info = model.info
    target = torch.randint(0, info.d_vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    source = torch.randint(0, info.d_vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    metric = make_metric("logit-diff", MetricTargets(torch.tensor([3, 8]), torch.tensor([5, 1]),
                                                     torch.zeros(2, info.d_vocab)))
    layer, group = 1, info.n_heads // info.n_kv_heads
    hook, pattern = f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_pattern"
    nodes = [Node(hook, None, g) for g in range(info.n_kv_heads)] + [Node(f"blocks.{layer}.attn.hook_q", None, 3)]
    got = attribution_patch(model, target, source, [_grid("g", nodes)], metric)["g"]

    kept = {}

    def keep(act, name):
        kept[name] = act.detach().requires_grad_(True)
        return kept[name]

    base = metric(model.run_with_hooks(target, [(pattern, keep)]))
    grad = torch.autograd.grad(base.sum(), kept[pattern])[0]
    for i, node in enumerate(nodes):
        src = model.run_with_cache(source, [node.hook]).cache[node.hook]
        patch = (node.hook, lambda a, n, s=src, nd=node: patched(a, s, nd))
        new = model.run_with_cache(target, [pattern], hooks=[patch])
        delta = ((new.cache[pattern] - kept[pattern].detach()) * grad).sum((2, 3))  # [n head]
        heads = list(range(node.head * group, (node.head + 1) * group)) if "hook_k" in node.hook else [node.head]
        torch.testing.assert_close(got[:, i], base.detach() + delta[:, heads].sum(1), atol=1e-5, rtol=1e-5)
        others = [h for h in range(info.n_heads) if h not in heads]
        assert delta[:, heads].abs().max() > 1e-5 and delta[:, others].abs().max() < 1e-7  # the grouping is HF's


def test_grad_drop_on_two_layers_matches_its_hand_derivation():
    """L = 2. A node of layer 1: its own layer's term vanishes and dropping layer 0 (upstream) changes nothing, so
    GradDrop = sign(AtP)·|AtP|/(L−1) = AtP. A node of layer 0: only the layer-1-dropped term remains, the direct
    path to the logits: (Δattn_out0 at the last position) · (W_U[:, answer] − W_U[:, wrong]) without LayerNorm."""
    model = _toy()
    nodes = [Node("blocks.1.attn.hook_z", None, h) for h in range(3)]
    nodes += [Node("blocks.0.hook_attn_out", p, None) for p in range(POS)]
    grids = [_grid("g", nodes)]
    plain = attribution_patch(model, TARGET, SOURCE, grids, LOGIT_DIFF)["g"]
    dropped = attribution_patch(model, TARGET, SOURCE, grids, LOGIT_DIFF, grad_drop=True)["g"]
    base = LOGIT_DIFF(model(TARGET)).detach()
    torch.testing.assert_close(dropped[:, :3], plain[:, :3], atol=1e-9, rtol=0)

    hook = "blocks.0.hook_attn_out"
    delta = model.run_with_cache(SOURCE, [hook]).cache[hook] - model.run_with_cache(TARGET, [hook]).cache[hook]
    direction = model.W_U[:, [1, 4, 7]] - model.W_U[:, [2, 5, 9]]  # [d_model n]
    direct = torch.einsum("nd,dn->n", delta[:, -1], direction).detach()
    sign = torch.where(plain[:, 3 + POS - 1] - base < 0, -1.0, 1.0).double()
    torch.testing.assert_close(dropped[:, 3 + POS - 1] - base, sign * direct.abs(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dropped[:, 3:3 + POS - 1], base[:, None].expand(N, POS - 1), atol=1e-9, rtol=0)
    assert (plain[:, 3:3 + POS - 1] - base[:, None]).abs().max() > 1e-3  # plain AtP sees the indirect paths there


def test_grad_drop_combines_absolute_terms_over_three_layers():
    """L = 3, node in layer 1: terms are I_0 = AtP (upstream layer dropped), I_1 = 0 (own layer), I_2 = AtP through
    all but layer 2; the estimate is (|I_0| + |I_2|)/2. I_2 by hand: gradient with layer 2's output held fixed
    equals AtP on a model whose layer-2 attention output is frozen to its target value."""
    model = _toy(n_layers=3)
    node = Node("blocks.1.attn.hook_z", None, 0)
    grid = [_grid("g", [node])]
    plain = attribution_patch(model, TARGET, SOURCE, grid, LOGIT_DIFF)["g"][:, 0]
    dropped = attribution_patch(model, TARGET, SOURCE, grid, LOGIT_DIFF, grad_drop=True)["g"][:, 0]
    base = LOGIT_DIFF(model(TARGET)).detach()
    frozen_out = model.run_with_cache(TARGET, ["blocks.2.hook_attn_out"]).cache["blocks.2.hook_attn_out"]
    frozen = attribution_with_frozen(model, node, "blocks.2.hook_attn_out", frozen_out)
    expected = torch.sign(plain - base) * ((plain - base).abs() + frozen.abs()) / 2
    torch.testing.assert_close(dropped - base, expected, atol=1e-9, rtol=1e-9)


def attribution_with_frozen(model, node: Node, frozen_hook: str, frozen: torch.Tensor) -> torch.Tensor:
    """(a_src − a_tgt)·∂m/∂a at the target with `frozen_hook` replaced by a constant (no gradient through it)."""
    src = model.run_with_cache(SOURCE, [node.hook]).cache[node.hook]
    kept = {}

    def keep(act, name):
        kept[name] = act.detach().requires_grad_(True)
        return kept[name]

    value = LOGIT_DIFF(model.run_with_hooks(TARGET, [(node.hook, keep), (frozen_hook, lambda a, n: frozen)]))
    grad = torch.autograd.grad(value.sum(), kept[node.hook])[0]
    return ((src - kept[node.hook].detach()) * grad)[node.index()].flatten(1).sum(1)


@pytest.mark.parametrize("bad, message", [
    (dict(source=_tokens(2)[:, :5]), "same shape"),
    (dict(grids=[_grid("g", [Node("blocks.9.hook_attn_out", 0, None)])]), "unknown hook"),
    (dict(grids=[_grid("g", [Node("blocks.0.attn.hook_z", None, 3)])]), "head 3"),
    (dict(grids=[_grid("g", [Node("blocks.0.hook_attn_out", POS, None)])]), "position 7"),
    (dict(grids=[_grid("g", [Node("blocks.0.attn.hook_pattern", None, 0)])]), "hook_pattern"),
    (dict(grids=[]), "at least one grid"),
])
def test_bad_input_is_refused_in_one_line(bad, message):
    model = _toy()
    grids = [_grid("g", [Node("blocks.0.hook_attn_out", 0, None)])]
    with pytest.raises(InterplabError, match=message) as err:
        attribution_patch(model, TARGET, bad.get("source", SOURCE), bad.get("grids", grids), LOGIT_DIFF)
    assert "\n" not in str(err.value)


def test_grad_drop_needs_two_layers():
    """With one layer every in-layer node's only term is its own layer's, which is 0: the mean over L − 1 = 0
    other layers is undefined."""
    model = _toy(n_layers=1)
    with pytest.raises(InterplabError, match="at least 2 layers"):
        attribution_patch(model, TARGET, SOURCE, [_grid("g", [Node("blocks.0.hook_attn_out", 0, None)])],
                          LOGIT_DIFF, grad_drop=True)


def test_every_sweep_on_every_hf_architecture_is_the_taylor_term(tiny_hf_dir):
    """The sweeps' grids (resid, layers, heads by position, head q/k/v) on GPT-2, Llama (GQA), NeoX parallel and
    sequential, in float64: AtP − m(target) equals a central finite difference along the patch, for a sample of
    nodes of every grid; GradDrop runs on the same grids and leaves last-layer nodes at plain AtP."""
    model = load_model(str(tiny_hf_dir), device="cpu")
    model.model.double()
    info = model.info
    target = torch.randint(0, info.d_vocab, (2, 5), generator=torch.Generator().manual_seed(6))
    source = torch.randint(0, info.d_vocab, (2, 5), generator=torch.Generator().manual_seed(7))
    metric = make_metric("logit-diff", MetricTargets(torch.tensor([3, 8]), torch.tensor([5, 1]),
                                                     torch.zeros(2, info.d_vocab)))
    grids = [g for sweep in ("resid", "layers", "heads-by-pos", "head-qkv") for g in sweep_grids(info, sweep, 5)]
    got = attribution_patch(model, target, source, grids, metric, qk_fix=False)
    dropped = attribution_patch(model, target, source, grids, metric, qk_fix=False, grad_drop=True)
    base = metric(model.forward(target)).detach()
    # HF Llama's RMSNorm and rotary compute in float32 even in a float64 model: below a step of ~1e-2 its finite
    # differences are rounding noise, so it gets a larger step (and the curvature error that comes with it).
    eps, atol = (1e-2, 1e-4) if info.arch == "llama" else (1e-4, 1e-6)
    for grid in grids:
        assert got[grid.name].shape == (2, *grid.shape)
        for i in torch.randperm(len(grid.nodes), generator=torch.Generator().manual_seed(0))[:3].tolist():
            node = grid.nodes[i]
            src = model.run_with_cache(source, [node.hook]).cache[node.hook]
            tgt = model.run_with_cache(target, [node.hook]).cache[node.hook]
            moved = [tgt + s * (src - tgt) for s in (eps, -eps)]
            ends = [model.run_with_hooks(target, [(node.hook, lambda a, n, m=m: patched(a, m, node))]) for m in moved]
            derivative = (metric(ends[0]) - metric(ends[1])).detach() / (2 * eps)
            cell = got[grid.name].flatten(1)[:, i]
            torch.testing.assert_close(cell - base, derivative, atol=atol, rtol=1e-5)
            if node.hook.startswith(f"blocks.{info.n_layers - 1}.") and "resid_pre" not in node.hook:
                torch.testing.assert_close(dropped[grid.name].flatten(1)[:, i], cell, atol=1e-9, rtol=0)
