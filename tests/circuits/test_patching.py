"""Activation patching against the naive loop (a full forward pass per patch with run_with_hooks), and its exact
end points (clean everywhere = 1, corrupted = 0)."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.metrics import Baseline, MetricTargets, make_metric, normalise
from interplab.circuits.nodes import Grid, Node, sweep_grids
from interplab.circuits.patching import Runs, activation_patch, direction_runs
from interplab.errors import InterplabError
from interplab.models.toy import ToyConfig, ToyTransformer

N, POS, VOCAB = 5, 7, 23


@pytest.fixture(scope="module")
def toy() -> ToyTransformer:
    return ToyTransformer(ToyConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=VOCAB,
                                    seed=3))


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, VOCAB, (N, POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, VOCAB, (N,), generator=g)
    answer, wrong = torch.randint(0, VOCAB, (N,), generator=g), torch.randint(0, VOCAB, (N,), generator=g)
    return clean, corrupted, answer, wrong


def _metric(toy: ToyTransformer, pairs, name: str):
    clean, _, answer, wrong = pairs
    with torch.no_grad():
        clean_logits = toy.forward(clean)[:, -1]
    return make_metric(name, MetricTargets(answer, wrong, clean_logits))


def _naive(toy: ToyTransformer, runs: Runs, node: Node, metric) -> torch.Tensor:
    source = toy.run_with_cache(runs.source, [node.hook]).cache[node.hook]

    def patch(act: torch.Tensor, name: str) -> torch.Tensor:
        act = act.clone()
        act[node.index()] = source[node.index()]
        return act

    with torch.no_grad():
        return metric(toy.run_with_hooks(runs.target, [(node.hook, patch)]))


@pytest.mark.parametrize("sweep", ["resid", "layers"])
@pytest.mark.parametrize("metric_name", ["logit-diff", "prob", "kl"])
def test_prefix_suffix_patching_equals_the_naive_loop(toy, pairs, sweep, metric_name):
    metric = _metric(toy, pairs, metric_name)
    runs = direction_runs("denoise", pairs[0], pairs[1])
    grids = sweep_grids(toy.info, sweep, POS)
    got = activation_patch(toy, runs, grids, metric, batch_size=2)  # chunks of 2, 2, 1 pairs
    for grid in grids:
        assert got[grid.name].shape == (N, *grid.shape)
        flat = got[grid.name].reshape(N, -1)
        for cell in (0, 3, len(grid.nodes) - 1):
            expected = _naive(toy, runs, grid.nodes[cell], metric)
            torch.testing.assert_close(flat[:, cell], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_the_whole_residual_stream_gives_exactly_clean_or_corrupted(toy, pairs, direction):
    metric = _metric(toy, pairs, "logit-diff")
    clean, corrupted = pairs[0], pairs[1]
    with torch.no_grad():
        baseline = Baseline(metric(toy.forward(clean)), metric(toy.forward(corrupted)))
    runs = direction_runs(direction, clean, corrupted)
    grid = Grid("whole", ("layer",), (1,), [Node("blocks.0.hook_resid_pre", None, None)])
    effect = normalise(activation_patch(toy, runs, [grid], metric)["whole"][:, 0], baseline)
    assert float(effect.mean()) == pytest.approx(1.0 if direction == "denoise" else 0.0, abs=1e-6)
    # patching the run's own activation changes nothing: 0 for denoising (corrupted), 1 for noising (clean)
    same = Runs(runs.target, runs.target)
    unchanged = normalise(activation_patch(toy, same, [grid], metric)["whole"][:, 0], baseline)
    assert float(unchanged.mean()) == pytest.approx(0.0 if direction == "denoise" else 1.0, abs=1e-6)


def test_patching_refuses_prompts_of_different_lengths(toy, pairs):
    metric = _metric(toy, pairs, "logit-diff")
    with pytest.raises(InterplabError, match="same shape"):
        activation_patch(toy, Runs(pairs[0], pairs[1][:, :-1]), sweep_grids(toy.info, "resid", POS), metric)


@pytest.mark.parametrize("max_rows", [4, 256])
def test_stacked_head_patches_on_hf_models_equal_the_naive_loop(tiny_hf_dir, max_rows):
    """Variants stacked along the batch (masks and rotary tables repeated with them) give what one full forward pass
    per patch gives; max_rows 4 forces groups of 2 variants (and a shorter last group) for 2-pair chunks."""
    from interplab.models import load_model

    model = load_model(str(tiny_hf_dir), device="cpu")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, model.info.d_vocab, (3, 6), generator=g)
    corrupted = torch.randint(0, model.info.d_vocab, (3, 6), generator=g)
    with torch.no_grad():
        metric = make_metric("kl", MetricTargets(clean[:, 0], clean[:, 1], model.forward(clean)[:, -1]))
    runs = direction_runs("denoise", clean, corrupted)
    grids = sweep_grids(model.info, "heads", 6)
    got = activation_patch(model, runs, grids, metric, batch_size=2, max_rows=max_rows)["head_out"].reshape(3, -1)
    for cell, node in enumerate(grids[0].nodes):
        torch.testing.assert_close(got[:, cell], _naive(model, runs, node, metric), atol=1e-5, rtol=1e-4)
