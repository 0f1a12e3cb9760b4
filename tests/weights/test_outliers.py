"""Residual-stream outliers: planted massive activations are found (dim, layers, position, token), the rotated-basis
control separates basis-aligned spikes from isotropic noise, and the streaming statistics equal dense ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.weights.outlier_stats import BasisStats, collect_stats, random_rotation, stage_hooks
from interplab.weights.configs import OutliersConfig
from interplab.weights.outliers import corpus_contexts, format_summary, run_outliers

CTX, VOCAB = 16, 20


def toy(d_model: int = 128, n_layers: int = 3, seed: int = 0) -> ToyTransformer:
    cfg = ToyConfig(n_layers=n_layers, d_model=d_model, n_heads=4, d_head=16, d_mlp=64, n_ctx=32, d_vocab=VOCAB,
                    seed=seed)
    return ToyTransformer(cfg).eval()


def contexts(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CTX), generator=torch.Generator().manual_seed(seed))


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its modification time: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run(model, ctx, out, **kw):
    cfg = OutliersConfig(ctx_len=CTX, tokens=ctx.numel(), batch_size=6, out=str(out), **kw)
    return run_outliers(cfg, model=model, contexts=ctx, progress=False)


def test_planted_position_0_outlier_is_found_and_basis_aligned(tmp_path):
    model = toy()
    with torch.no_grad():
        model.W_pos[0, 7] = 5000.0  # every context's first position carries 5000 in dim 7 from the embedding on
    ctx = contexts()
    out = tmp_path / "out"
    result = run(model, ctx, out)
    massive = result["massive"]
    assert [r["dim"] for r in massive["dims"]] == [7]
    assert (massive["dims"][0]["first_layer"], massive["dims"][0]["last_layer"]) == ("embed", "2")
    assert massive["n_carriers"] == len(ctx) and massive["share_position_0"] == 1.0
    assert massive["n_values"] == len(ctx) * 4  # one value per context per stage (embed + 3 blocks)
    for row in result["layers"]:
        top = row["top_dims"][0]
        assert top["dim"] == 7 and top["position"] == 0 and top["max_abs"] == pytest.approx(5000, rel=0.01)
        assert top["token"] == f"#{int(ctx[top['context'], 0])}"
        assert row["basis_ratio"] >= 3 and row["basis_ratio"] == pytest.approx(row["spike_ratio"], rel=0.02)
        assert row["n_massive"] == len(ctx) and row["rogue_dims"] == []
    # A first-token spike is a massive activation, not a rogue dim: the rogue statistics skip position 0 ...
    assert result["rogue_dims"] == []
    # The rotated basis sees the same spike spread over many coordinates, not one dim.
    assert result["rotated_n_massive_dims"] > 50
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kind"] == "weights outliers" and saved["massive"]["dims"][0]["dim"] == 7
    assert all((out / "figures" / name).stat().st_size > 1000
               for name in ("outlier_magnitudes.png", "massive_tokens.png"))
    text = format_summary(result)
    assert "massive activations in dim(s) 7" in text and "100% at position 0" in text
    # ... unless told not to: then mean |x_7| = 5000 / 16 dwarfs the other dims' ~0.02.
    before = snapshot(out)
    with pytest.raises(InterplabError, match=r"differs in: [^;]*\brogue_skip_first\b"):
        run(model, ctx, out, rogue_skip_first=False)  # another config into the same folder: refused, not written
    assert snapshot(out) == before
    assert run(model, ctx, out) == saved  # the complete run is reported as done
    result = run(model, ctx, tmp_path / "out2", rogue_skip_first=False)
    assert [r["dim"] for r in result["rogue_dims"]] == [7] and result["rogue_dims"][0]["n_layers"] == 4
    assert result["layers"][0]["rogue_dims"][0]["var_share"] > 0.99


def test_outlier_planted_in_layer_1_spans_layers_1_on(tmp_path):
    model = toy()

    def add_spike(_module, _inputs, out):  # attention output of block 1: position 0, dim 3
        out = out.clone()
        out[:, 0, 3] += 3000.0
        return out

    handle = model.blocks[1].attn.register_forward_hook(add_spike)
    try:
        result = run(model, contexts(), tmp_path)
    finally:
        handle.remove()
    dims = result["massive"]["dims"]
    assert [r["dim"] for r in dims] == [3] and (dims[0]["first_layer"], dims[0]["last_layer"]) == ("1", "2")
    by_layer = {r["layer"]: r for r in result["layers"]}
    assert by_layer["embed"]["n_massive"] == by_layer["0"]["n_massive"] == 0
    assert by_layer["1"]["n_massive"] == by_layer["2"]["n_massive"] == 20
    assert by_layer["0"]["basis_ratio"] < 3 <= by_layer["1"]["basis_ratio"]


def test_token_carried_outlier_reports_that_token_at_its_positions(tmp_path):
    model = toy()
    with torch.no_grad():
        model.W_E[5, 11] = -4000.0  # token 5, wherever it stands, carries -4000 in dim 11
    ctx = contexts()
    result = run(model, ctx, tmp_path)
    massive = result["massive"]
    where = (ctx == 5).nonzero()
    assert massive["n_carriers"] == len(where) > 0
    assert massive["tokens"] == [{"token": "#5", "id": 5, "count": len(where)}]
    expected_positions = torch.bincount(where[:, 1], minlength=CTX)
    assert {p["position"]: p["count"] for p in massive["positions"]} == {
        p: int(c) for p, c in enumerate(expected_positions) if c}
    assert result["layers"][0]["top_dims"][0]["value"] == pytest.approx(-4000, rel=0.01)
    later = massive["later_carriers"]
    assert len(later) == min(20, int((where[:, 1] > 0).sum())) and all(e["token"] == "#5" for e in later)
    assert all(e["previous"] == f"#{int(ctx[e['context'], e['position'] - 1])}" and e["dims"] == [11] for e in later)
    # Token 5 is ~1/20 of the tokens at every position, so dim 11 is also a consistent rogue dim, in no rotated coord
    assert [r["dim"] for r in result["rogue_dims"]] == [11] and result["rogue_dims"][0]["n_layers"] == 4
    assert all(row["rotated_max_mean_abs_ratio"] < 10 for row in result["layers"])


def test_model_without_outliers_is_not_basis_aligned(tmp_path):
    result = run(toy(), contexts(), tmp_path)
    assert result["massive"]["n_values"] == 0 and result["rogue_dims"] == []
    for row in result["layers"]:
        assert row["basis_ratio"] < 2 and row["n_massive"] == 0 and row["rogue_dims"] == []
    assert result["verdict"].startswith("no massive activations")
    assert "basis-aligned (>= 3x) at 0/4 layers" in result["verdict"]


def test_streaming_statistics_equal_dense_ones():
    model, ctx = toy(d_model=32), contexts(n=11)
    rotation = random_rotation(32, seed=3)
    cfg = OutliersConfig(ctx_len=CTX, tokens=ctx.numel(), massive_abs=0.05, massive_ratio=1.0, max_records=10**6)
    std, rot, n = collect_stats(model, ctx.split(4), rotation, cfg)  # 4 + 4 + 3 contexts
    assert n == ctx.numel()
    hooks = stage_hooks(model.info.n_layers)
    cache = model.run_with_cache(ctx, hooks).cache
    assert std.threshold_used == rot.threshold_used == [0.05] * len(hooks)  # medians < 0.1: the floor decides
    for stats, basis in ((std, torch.eye(32)), (rot, rotation)):
        median = stats.median_abs()
        for s, hook in enumerate(hooks):
            x = (cache[hook].reshape(-1, 32) @ basis).double()
            a = x.abs()
            later = (cache[hook][:, 1:].reshape(-1, 32) @ basis).double()  # the means skip position 0
            torch.testing.assert_close(stats.max_abs[s].double(), a.max(0).values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.mean_abs()[s], later.abs().mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(stats.mean()[s], later.mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(stats.var()[s], later.var(0, unbiased=False), rtol=1e-4, atol=1e-7)
            unit = later / later.norm(dim=1, keepdim=True)
            torch.testing.assert_close(stats.cos_contrib()[s], unit.mean(0).square(), rtol=1e-4, atol=1e-9)
            where = a.argmax(0)
            assert stats.max_index[s].tolist() == where.tolist()
            assert stats.max_token[s].tolist() == ctx.reshape(-1)[where].tolist()
            exact = a.flatten().median()  # torch's lower median; the histogram estimate is within one bin
            assert float(median[s]) == pytest.approx(float(exact), rel=0.01)
            rows, values = stats.recorded()
            mine = rows[:, 0] == s
            assert int(mine.sum()) == int((a > 0.05).sum())
            torch.testing.assert_close(values[mine].double(), x[rows[mine, 2], rows[mine, 1]], rtol=1e-5, atol=1e-6)


def test_record_cap_counts_what_it_drops():
    stats = BasisStats(1, 4, torch.device("cpu"), OutliersConfig(massive_abs=1.0, massive_ratio=1.0, max_records=3))
    x = torch.tensor([[2.0, 0.5, -3.0, 0.0], [5.0, 5.0, 0.1, 0.1]])
    stats.update(0, x, torch.tensor([7, 8]), first=10)
    rows, values = stats.recorded()
    assert stats.n_candidates == 4 and stats.n_recorded == 3 and not stats.records_complete()
    assert rows.tolist() == [[0, 0, 10, 7], [0, 2, 10, 7], [0, 0, 11, 8]] and values.tolist() == [2.0, -3.0, 5.0]


def test_recording_threshold_follows_the_running_median_and_flags_a_falling_one():
    cfg = OutliersConfig(massive_abs=1.0, massive_ratio=10.0)
    stats = BasisStats(1, 1, torch.device("cpu"), cfg)
    stats.update(0, torch.tensor([[0.5]] * 9 + [[2.0], [3.0], [40.0]]), torch.zeros(12).long(), first=0)
    # running median 0.5 (to within a bin): threshold max(1, 0.5 * 10 * 0.5) = 2.5, so 3 and 40 are kept, 2 not
    assert stats.recorded()[1].tolist() == [3.0, 40.0] and stats.records_complete()
    stats.update(0, torch.full((40, 1), 0.01), torch.zeros(40).long(), first=12)
    # the median fell to 0.01: 2.0 is now massive (> 1 and > 10 * 0.01) but was not recorded
    assert float(stats.median_abs()[0]) == pytest.approx(0.01, rel=0.01) and not stats.records_complete()


def test_random_rotation_is_orthogonal_and_seeded():
    q = random_rotation(50, seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(50), atol=1e-5, rtol=0)
    assert torch.equal(q, random_rotation(50, seed=1)) and not torch.equal(q, random_rotation(50, seed=2))


@pytest.mark.parametrize("change, message", [
    ({"tokens": 0}, "--tokens must be an integer >= 1"),
    ({"ctx_len": 1}, "--ctx-len must be an integer >= 2"),
    ({"tokens": 10, "ctx_len": 16}, "below --ctx-len"),
    ({"top": 0}, "--top must be"),
    ({"massive_ratio": 0.5}, "--massive-ratio must be >= 1"),
    ({"rogue_layers": 0}, "--rogue-layers must lie in (0, 1]"),
    ({"aligned_ratio": 1.0}, "--aligned-ratio must be > 1"),
    ({"split": "val"}, "--split 'val'"),
])
def test_config_errors(change, message, tmp_path):
    cfg = OutliersConfig(**{"ctx_len": CTX, "out": str(tmp_path), **change})
    with pytest.raises(InterplabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_outliers(cfg, model=toy(d_model=16))
    assert list(tmp_path.iterdir()) == []  # validated before the run folder is opened


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    with pytest.raises(InterplabError, match="is not empty and holds no interplab weights outliers run"):
        run_outliers(OutliersConfig(ctx_len=CTX, tokens=CTX, out=str(tmp_path)), model=toy(d_model=16),
                     contexts=contexts(n=1), progress=False)
    assert snapshot(tmp_path) == before


def test_model_dependent_errors(tmp_path):
    model = toy(d_model=16)
    with pytest.raises(InterplabError, match="longer than toy allows"):
        run_outliers(OutliersConfig(ctx_len=64, out=str(tmp_path / "a")), model=model)
    with pytest.raises(InterplabError, match="no tokenizer"):
        run_outliers(OutliersConfig(ctx_len=CTX, out=str(tmp_path / "b")), model=model)
    with pytest.raises(InterplabError, match=r"shape \[n, ctx_len=16\]"):
        run_outliers(OutliersConfig(ctx_len=CTX, out=str(tmp_path / "c")), model=model,
                     contexts=torch.zeros(2, 8).long())


def test_runs_on_a_tiny_hf_model_with_the_corpus(tiny_gpt2_dir, tmp_path):
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    cfg = OutliersConfig(model=str(tiny_gpt2_dir), tokens=256, ctx_len=32, out=str(tmp_path / "o"), top=3)
    result = run_outliers(cfg, model=model, progress=False)
    assert result["n_tokens"] == 256 and len(result["layers"]) == model.info.n_layers + 1
    assert all(len(r["top_dims"]) == 3 and r["median_abs"] > 0 for r in result["layers"])
    assert "layer" in format_summary(result) and (tmp_path / "o" / "metrics.json").is_file()


@pytest.mark.slow
def test_smollm2_reported_max_equals_a_direct_forward_pass(tmp_path):
    model = load_model("smollm2-135m", device="cpu")
    cfg = OutliersConfig(tokens=512, ctx_len=64, batch_size=4, out=str(tmp_path / "o"))
    result = run_outliers(cfg, model=model)
    print(format_summary(result))
    ctx = corpus_contexts(cfg, model)
    hooks = stage_hooks(model.info.n_layers)
    cache = model.run_with_cache(ctx, hooks).cache
    for row, hook in zip(result["layers"], hooks):
        a = cache[hook].abs().reshape(-1, model.info.d_model)
        peak, flat = a.max(0).values.max(0)
        assert row["max_abs"] == pytest.approx(float(peak), rel=1e-4) and row["top_dims"][0]["dim"] == int(flat)
        rotated = (cache[hook].reshape(-1, model.info.d_model) @ random_rotation(model.info.d_model, 0)).abs().max()
        assert row["rotated_max_abs"] == pytest.approx(float(rotated), rel=1e-4)
        assert row["median_abs"] == pytest.approx(float(a.flatten().median()), rel=0.01)
        assert math.isfinite(row["basis_ratio"])
