"""SPD on language models (`interplab decompose --model`): a tiny random HF Llama and the toy transformer.

Checks: an exact decomposition with all masks 1 gives the original logits (and a zero mask removes exactly one rank-1
term); a short run is finite and resumes bit for bit; bad inputs are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from interplab.cli import main
from interplab.decompose.components import LayerComponents, capture_inputs, check_masks_apply, make_components, masked_forward, module_key
from interplab.decompose.lm import LMTarget, LogitsModel, as_module
from interplab.decompose.presets import Settings
from interplab.decompose.sites import target_sites
from interplab.decompose.spd import run_spd
from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.models.toy import ToyConfig, ToyTransformer

TOY_LAYERS = ["W_E", "blocks.0.mlp.W_in", "blocks.0.mlp.W_out", "W_U"]
LLAMA_LAYERS = ["model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj", "lm_head"]


def _toy() -> ToyTransformer:
    model = ToyTransformer(ToyConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=12, n_ctx=8))
    with torch.no_grad():  # non-zero biases, so a replacement that dropped them would show
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.requires_grad_(False)


def _exact(model: nn.Module, layers: list[str]) -> nn.ModuleDict:
    """C = min(d_out, d_in) subcomponents summing to each weight exactly (its SVD: U[c] = s_c u_c, V[:, c] = v_c)."""
    sites = target_sites(model, layers)
    comps = nn.ModuleDict()
    for name, site in sites.items():
        u, s, vh = torch.linalg.svd(site.weight.detach(), full_matrices=False)
        layer = LayerComponents(site, s.shape[0], torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.U.copy_((u * s).T)
            layer.V.copy_(vh.T)
        comps[module_key(name)] = layer
    return comps


@pytest.mark.parametrize("which", ["toy", "llama"])
def test_exact_decomposition_with_all_masks_one_is_the_model(which, tiny_llama_dir):
    model = _toy() if which == "toy" else as_module(load_model(str(tiny_llama_dir), device="cpu")).requires_grad_(False)
    layers = TOY_LAYERS if which == "toy" else LLAMA_LAYERS
    tokens = torch.randint(12, (2, 6), generator=torch.Generator().manual_seed(0))
    comps = _exact(model, layers)
    with torch.no_grad():
        base = model(tokens)
        ones = {n: torch.ones(comps[module_key(n)].C) for n in layers}
        with masked_forward(model, comps, ones) as fired:
            same = model(tokens)
        assert fired == set(layers)
        torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)
        # One zero in the last layer's mask changes the logits by exactly that rank-1 term (the last layer is linear
        # in its weight): Δlogits = -(V[:, c]·x) U[c].
        last = comps[module_key(layers[-1])]
        mask = torch.ones(last.C)
        mask[0] = 0
        with masked_forward(model, comps, {layers[-1]: mask}), capture_inputs(model, [layers[-1]]) as seen:
            dropped = model(tokens)
        expected = base - (last.inner(seen[layers[-1]])[..., :1] * last.U[0])
    torch.testing.assert_close(dropped, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dropped, base, atol=1e-4)


def _target(model: nn.Module, layers: list[str]) -> LMTarget:
    pool = torch.randint(12, (16, 6), generator=torch.Generator().manual_seed(3))
    return LMTarget("toy", model, layers, pool)


SETTINGS = Settings(C=4, steps=12, lr=3e-3, batch_size=4, importance_coeff=1e-3, p=1.0, simplicity_coeff=1.0,
                    top_k=1.0)


class Stop(Exception):
    pass


def test_short_run_is_finite_and_resumes_bit_for_bit(tmp_path):
    layers = ["blocks.0.mlp.W_in", "W_U"]
    kwargs = {"seed": 0, "warmup_steps": 5, "delta_component": True, "checkpoint_every": 6, "progress": False}
    whole = run_spd(_target(_toy(), layers), SETTINGS, checkpoint=tmp_path / "whole.pt", **kwargs)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in whole.history)

    target = _target(_toy(), layers)
    sample, calls = target.sample, []

    def failing_sample(batch, gen):
        calls.append(batch)
        if len(calls) == 9:  # the 8th training batch: after the checkpoint at step 6
            raise Stop
        return sample(batch, gen)

    target.sample = failing_sample
    with pytest.raises(Stop):
        run_spd(target, SETTINGS, checkpoint=tmp_path / "cut.pt", **kwargs)
    resumed = run_spd(_target(_toy(), layers), SETTINGS, checkpoint=tmp_path / "cut.pt", **kwargs)
    assert resumed.resumed_from == 6
    for a, b in zip(whole.components.parameters(), resumed.components.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.importance.parameters(), resumed.importance.parameters()):
        assert torch.equal(a, b)


class _Unused(nn.Module):
    """An 'HF-like' model whose forward never calls `spare` (its weight cannot be masked)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_forward_that_does_not_call_the_layer_is_refused():
    model = LogitsModel(_Unused())
    comps = make_components(model, ["spare", "head"], 2, torch.Generator().manual_seed(0))
    with pytest.raises(InterplabError, match="never calls spare"):
        check_masks_apply(model, comps, ["spare", "head"], torch.zeros(1, 3, dtype=torch.long))


def _one_line_exit_2(args, capsys):
    code = main(["decompose", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("layers, extra, words", [
    ("model.layers.0.mlp", [], "is a module of type LlamaMLP, not a linear weight; valid: model.embed_tokens"),
    ("model.layers.0.mlp.up_proj", ["--C", "0"], "--C must be"),
    ("nope", [], "is no module"),
])
def test_bad_model_inputs_are_one_line_and_leave_nothing(layers, extra, words, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = _one_line_exit_2(["--model", str(tiny_llama_dir), "--layers", layers, *extra, "--out", str(out),
                             "--steps", "2", "--no-progress"], capsys)
    assert words in line
    assert not out.exists()


def test_cli_on_a_tiny_llama_writes_counts_and_losses(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["decompose", "--model", str(tiny_llama_dir), "--layers", "model.layers.0.mlp.up_proj,lm_head",
                 "--C", "8", "--steps", "6", "--batch-size", "4", "--ctx-len", "8", "--n-contexts", "16",
                 "--eval-batch", "8", "--warmup-steps", "2", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    layers = metrics["scores"]["layers"]
    assert set(layers) == {"model.layers.0.mlp.up_proj", "lm_head"}
    for layer in layers.values():
        assert 0 <= layer["live"] <= 8 and 0 <= layer["mean_active"] <= 8
        assert layer.get("mmcs") is None
    losses = metrics["scores"]["losses"]
    for key in ("all_on", "kept", "kept_random", "ablated", "all_off"):
        assert losses[key] >= -1e-6 and losses[key] == losses[key]
    assert (out / "report.md").is_file() and (out / "figures" / "importance.png").is_file()
    assert set(metrics["random_model"]["layers"]) == set(layers)  # the re-initialised-model control ran too
