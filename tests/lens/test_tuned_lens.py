"""Tuned lens files and `run_lens`: save/load round trip, mismatch errors, the CLI-facing run, config errors, and
(slow) a tuned lens beating the logit lens on held-out SmolLM2 text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.lens.configs import LensConfig
from interplab.lens.run import format_summary, run_lens
from interplab.lens.tuned import TunedLens, lr_at


def toy(n_layers: int = 3, d_model: int = 16) -> ToyTransformer:
    return ToyTransformer(ToyConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_head=8, d_mlp=32, d_vocab=24,
                                    n_ctx=16)).eval()


def filled_lens(model: ToyTransformer) -> TunedLens:
    lens = TunedLens.for_model(model, [0, 1])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lens.A.copy_(torch.randn(lens.A.shape, generator=gen))
        lens.b.copy_(torch.randn(lens.b.shape, generator=gen))
        lens.scale.copy_(torch.rand(lens.scale.shape, generator=gen) + 0.5)
    lens.meta = {"train_tokens": 123, "heldout": {"kl": [0.5, 0.25, 0.0]}}
    return lens


def test_save_load_round_trip(tmp_path):
    model = toy()
    lens = filled_lens(model)
    lens.save(str(tmp_path / "lens"))
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "tuned_lens.safetensors"]
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert (config["model"], config["n_layers"], config["d_model"], config["train_tokens"]) == ("toy", 3, 16, 123)
    back = TunedLens.load(str(tmp_path / "lens"), model)
    assert back.trained_layers == [0, 1] and back.meta == lens.meta
    h = torch.randn(4, 16)
    for layer in range(3):
        assert torch.equal(back.translate(h, layer), lens.translate(h, layer))
    # by hand: T(h) = h + h A + s b
    expected = h + h @ lens.A[1] + lens.scale[1] * lens.b[1]
    torch.testing.assert_close(back.translate(h, 1), expected.detach())


def test_load_into_a_mismatched_model_names_the_mismatch(tmp_path):
    filled_lens(toy()).save(str(tmp_path / "lens"))
    with pytest.raises(InterplabError, match=r"n_layers = 3, d_model = 16.*n_layers = 2, d_model = 16"):
        TunedLens.load(str(tmp_path / "lens"), toy(n_layers=2))
    with pytest.raises(InterplabError, match="d_model = 16.*d_model = 8"):
        TunedLens.load(str(tmp_path / "lens"), ToyTransformer(ToyConfig(n_layers=3, d_model=8, n_heads=2, d_head=4)))


def test_load_refuses_a_folder_without_a_lens(tmp_path):
    with pytest.raises(InterplabError, match="not a saved tuned lens"):
        TunedLens.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tuned_lens.safetensors").write_bytes(b"")
    with pytest.raises(InterplabError, match="marker"):
        TunedLens.load(str(tmp_path))


def test_layers_must_exist():
    with pytest.raises(InterplabError, match=r"layers \[3\] do not exist"):
        TunedLens.for_model(toy(), [0, 3])


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(step, 100, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


@pytest.mark.parametrize("bad, match", [
    (dict(kind="linear"), "--kind 'linear' is not valid"),
    (dict(train_tokens=0), "--train-tokens must be an integer >= 1"),
    (dict(eval_tokens=-5), "--eval-tokens must be an integer >= 1"),
    (dict(ctx_len=1), "--ctx-len must be an integer >= 2"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(train_dtype="float16"), "--train-dtype 'float16' is not valid"),
    (dict(kind="logit", lens_path="x"), "--lens-path needs --kind tuned"),
    (dict(prompt="  "), "--prompt is empty"),
])
def test_config_errors(bad, match, tmp_path):
    with pytest.raises(InterplabError, match=match):
        run_lens(LensConfig(**bad, out=str(tmp_path)), model=object())
    assert list(tmp_path.iterdir()) == []  # validated before the run folder is opened


def test_run_lens_logit_writes_json_and_figures(tiny_gpt2_dir, tmp_path):
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    out = tmp_path / "out"
    cfg = LensConfig(model=str(tiny_gpt2_dir), kind="logit", eval_tokens=60, ctx_len=16, batch_size=2,
                     prompt="The quick brown fox", out=str(out))
    result = run_lens(cfg, model=model, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kind"] == "lens" and json.loads((out / "config.json").read_text())["config"]["kind"] == "logit"
    assert saved["n_tokens"] == result["n_tokens"] == 4 * 15  # ceil(60 / 15) contexts, BOS position not scored
    assert len(saved["logit_lens"]["kl"]) == 3 and abs(saved["logit_lens"]["kl"][-1]) < 1e-6
    assert saved["tuned_lens"] is None and not (out / "tuned_lens").exists()
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["grid_logit_lens.png", "lens_kl.png"]
    grid = saved["prompt"]["logit_lens"]
    assert len(grid) == 3 and len(grid[0]) == len(saved["prompt"]["tokens"]) and len(grid[0][0]) == cfg.top_k
    assert "layer" in format_summary(result)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run_lens(cfg, model=model, progress=False) == saved  # the complete run is reported as done
    with pytest.raises(InterplabError, match=r"differs in: [^;]*\beval_tokens\b"):
        run_lens(LensConfig(**{**cfg.__dict__, "eval_tokens": 30}), model=model, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_run_lens_refuses_a_foreign_folder_and_writes_nothing(tmp_path):
    (tmp_path / "lens.json").write_text("{}")  # e.g. the result of an older interplab
    with pytest.raises(InterplabError, match="is not empty and holds no interplab lens run .*lens.json"):
        run_lens(LensConfig(out=str(tmp_path)))  # refused before the model is loaded
    assert [p.name for p in tmp_path.iterdir()] == ["lens.json"]


def test_run_lens_tuned_trains_saves_and_reuses(tiny_gpt2_dir, tmp_path):
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    out = tmp_path / "out"
    cfg = LensConfig(model=str(tiny_gpt2_dir), kind="tuned", train_tokens=120, eval_tokens=30, ctx_len=16,
                     batch_size=4, train_batch_tokens=16, train_dtype="float32", prompt="The quick brown fox",
                     out=str(out))
    first = run_lens(cfg, model=model, progress=False)
    assert first["tuned_lens"]["trained_layers"] == [0, 1] and first["tuned_lens"]["steps"] == 120 // 16
    assert (out / "figures" / "grid_tuned_lens.png").exists()
    config = json.loads((out / "tuned_lens" / "config.json").read_text())
    assert config["heldout"]["kl"] == first["tuned_lens"]["kl"]
    assert config["train_tokens"] == 120
    summary = format_summary(first)
    assert "tuned KL" in summary and "mean final distribution" in summary
    assert run_lens(cfg, model=model, progress=False) == json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()  # as if interrupted after training: the resumed run reuses the trained lens
    second = run_lens(cfg, model=model, progress=False)
    assert second["tuned_lens"]["reused"] == str(out / "tuned_lens")
    assert second["tuned_lens"]["kl"] == first["tuned_lens"]["kl"]
    reuse = LensConfig(**{**cfg.__dict__, "lens_path": str(out / "tuned_lens"), "out": str(tmp_path / "o2")})
    assert run_lens(reuse, model=model, progress=False)["tuned_lens"]["kl"] == first["tuned_lens"]["kl"]


@pytest.mark.slow
def test_tuned_lens_beats_logit_lens_on_smollm2_middle_layers(tmp_path: Path):
    cfg = LensConfig(kind="tuned", train_tokens=1016, eval_tokens=127, ctx_len=128, batch_size=8, layers=[12, 15],
                     prompt="Hello", out=str(tmp_path / "lens"), device="cpu")
    result = run_lens(cfg, progress=False)
    for layer in (12, 15):
        assert result["tuned_lens"]["kl"][layer] < result["logit_lens"]["kl"][layer] / 2
    untrained = [layer for layer in range(29) if layer not in (12, 15)]
    assert [result["tuned_lens"]["kl"][i] for i in untrained] == [result["logit_lens"]["kl"][i] for i in untrained]
