"""`train_clt`: the run folder of a CLT sweep, exact resume, folded normalisation, sparse TopK kernels and AuxK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.crosslayer_config import CLTTrainConfig
from interplab.sae.crosslayer_data import ContextBatches, mlp_rows
from interplab.sae.crosslayer_train import train_clt
from interplab.sae.transcoder_files import load_transcoder_set

SENTENCES = ["the quick brown fox jumps over the lazy dog number {i}",
             "sparse codes of a transformer's MLP outputs, entry {i}",
             "a residual stream carries information between layers ({i})"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small text corpus: 37 contexts of 16 tokens, so that the 12-step runs of 4 contexts (48) go on into a
    second pass over it (documents reshuffled), which resuming must reproduce too."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(s.format(i=i) for i in range(15) for s in SENTENCES[i % 3:i % 3 + 1]))
    return str(path)


def config(model: Path, corpus: str, out: Path, **kw) -> CLTTrainConfig:
    base = dict(model=str(model), corpus=corpus, split="all", ctx_len=16, batch_size=4, tokens=12 * 4 * 15,
                d_sae=[24], k=[2, 3], lr=1e-2, log_every=2, checkpoint_every=3, dead_tokens=60, aux_k=4,
                device="cpu", out=str(out))
    return CLTTrainConfig(**{**base, **kw})


def stop_at(step: int):
    def callback(trainer) -> None:
        if trainer.step == step:
            raise KeyboardInterrupt
    return callback


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".lock" and p.name != ".lock.pid"}


def without_speed(files: dict[str, bytes]) -> dict[str, object]:
    """The folder's files with the tokens/s figures (the only thing two identical runs may differ in) removed."""
    out: dict[str, object] = {}
    for name, data in files.items():
        if name.endswith("metrics.json"):
            m = json.loads(data)
            m.pop("tokens_per_s", None)
            for entry in m.get("clts", {}).values():
                entry.pop("tokens_per_s")
            out[name] = m
        else:
            out[name] = data
    return out


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(tiny_gpt2_dir, corpus, tmp_path, activation):
    """12 steps straight against 7 steps, a kill, and a resume from the checkpoint of step 6: every saved file
    (weights, per-CLT metrics and history, summary) is the same, bit for bit."""
    kw = {} if activation == "topk" else dict(activation="jumprelu", k=[2], l0_coefficient=[1e-3, 1e-2])
    train_clt(config(tiny_gpt2_dir, corpus, tmp_path / "whole", **kw), progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_clt(config(tiny_gpt2_dir, corpus, cut, **kw), progress=False, callback=stop_at(7))
    assert sorted(p.name for p in cut.iterdir() if not p.name.startswith(".lock")) == \
        ["checkpoint.pt", "train_config.json"]
    with pytest.raises(InterplabError, match=r"holds a partial run \(checkpoint at step 6\); pass --resume"):
        train_clt(config(tiny_gpt2_dir, corpus, cut, **kw), progress=False)
    resumed = train_clt(config(tiny_gpt2_dir, corpus, cut, resume=True, **kw), progress=False)
    assert resumed.resumed_from == 6 and len(resumed.names) == 2
    assert without_speed(folder_bytes(tmp_path / "whole")) == without_speed(folder_bytes(cut))
    assert not (cut / "checkpoint.pt").exists()
    again = train_clt(config(tiny_gpt2_dir, corpus, cut, resume=True, **kw), progress=False)
    assert again.already_complete and again.names == resumed.names


def test_a_changed_config_is_refused_naming_the_difference(tiny_gpt2_dir, corpus, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_clt(config(tiny_gpt2_dir, corpus, tmp_path, k=[2]), progress=False, callback=stop_at(4))
    before = folder_bytes(tmp_path)
    with pytest.raises(InterplabError, match=r"holds a different CLT run \(differs in: lr 0.01 → 0.02\)"):
        train_clt(config(tiny_gpt2_dir, corpus, tmp_path, k=[2], lr=0.02, resume=True), progress=False)
    assert folder_bytes(tmp_path) == before


def test_a_sweep_member_equals_the_same_clt_trained_alone(tiny_gpt2_dir, corpus, tmp_path):
    sweep = train_clt(config(tiny_gpt2_dir, corpus, tmp_path / "sweep", tokens=4 * 4 * 15), progress=False)
    alone = train_clt(config(tiny_gpt2_dir, corpus, tmp_path / "alone", k=[3], tokens=4 * 4 * 15), progress=False)
    a, b = sweep.clts["clt-topk-k3-f24"].state_dict(), alone.clts["clt-topk-k3-f24"].state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_saved_clt_reads_raw_activations_and_equals_the_trained_one(tiny_gpt2_dir, corpus, tmp_path):
    """Normalisation is folded in exactly: the saved CLT on raw activations predicts raw outputs that, times the
    output scales, are the trained CLT's predictions on scaled inputs (float rounding apart). The scales make the
    first batch's mean squared norm d_model."""
    cfg = config(tiny_gpt2_dir, corpus, tmp_path, tokens=4 * 4 * 15, k=[3])
    result = train_clt(cfg, progress=False)
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    first = next(ContextBatches(model, cfg).batches(0))
    raw = mlp_rows(model, first, cfg)
    d = model.info.d_model
    for x, s in zip(raw.xs, result.in_scales):
        assert float((x * s).pow(2).sum(-1).mean()) == pytest.approx(d, rel=1e-5)
    assert max(abs(s - 1) for s in result.in_scales + result.out_scales) > 0.1  # the scales do something here

    saved = load_transcoder_set(str(tmp_path / "clt-topk-k3-f24"))
    assert isinstance(saved, CrossLayerTranscoder) and saved.activation == "topk" and saved.k == 3
    trained = result.clts["clt-topk-k3-f24"]
    with torch.no_grad():
        on_raw = saved(raw.xs)
        on_scaled = trained([x * s for x, s in zip(raw.xs, result.in_scales)])
    for j, t in enumerate(result.out_scales):
        torch.testing.assert_close(on_raw[j] * t, on_scaled[j], rtol=1e-4, atol=1e-5)


def test_metrics_json_holds_per_layer_figures_written_last(tiny_gpt2_dir, corpus, tmp_path):
    """The summary's per-layer FVU agrees with the saved CLT's FVU recomputed on the last step's batch window."""
    cfg = config(tiny_gpt2_dir, corpus, tmp_path, tokens=4 * 4 * 15, k=[3], log_every=1)
    result = train_clt(cfg, progress=False)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    m = summary["clts"]["clt-topk-k3-f24"]
    assert summary["complete"] and summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 15
    for key in ("fvu_per_layer", "l0_per_layer", "mse_per_layer", "dead_fraction_per_layer"):
        assert len(m[key]) == 3
    assert m["l0_per_layer"] == [3.0, 3.0, 3.0]  # topk: k per layer, exactly (pre-activations are positive here)
    per_clt = json.loads((tmp_path / "clt-topk-k3-f24" / "metrics.json").read_text())
    assert [e["step"] for e in per_clt["history"]] == [1, 2, 3, 4]
    assert result.metrics["clt-topk-k3-f24"]["fvu"] == pytest.approx(m["fvu"])


def test_dead_features_are_counted_per_layer_in_tokens(tiny_gpt2_dir, corpus, tmp_path):
    """Features 0-2 of layer 1 cannot fire after step 1: their counters hold every token since then, and the
    logged dead fraction of layer 1 counts them once that exceeds the dead window (60 tokens = 1 step of 60)."""
    def silence(trainer) -> None:
        if trainer.step == 1:
            for run in trainer.runs.values():
                with torch.no_grad():
                    run.clt.b_enc[1, :3] = -1e4
    cfg = config(tiny_gpt2_dir, corpus, tmp_path, tokens=5 * 4 * 15, k=[3], aux_k=0)
    result = train_clt(cfg, progress=False, callback=silence)
    assert result.clts["clt-topk-k3-f24"].b_enc[1, :3].max() < -1e3  # still silenced at the end
    m = result.metrics["clt-topk-k3-f24"]
    assert m["dead_fraction_per_layer"][1] >= 3 / 24
    assert m["dead_fraction"] == pytest.approx(sum(m["dead_fraction_per_layer"]) / 3)


def test_bad_token_batches_and_hooks_are_refused_before_writing(tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(InterplabError, match=r"unknown hook name\(s\) \['blocks.0.nope'"):
        train_clt(config(tiny_gpt2_dir, corpus, out, in_hook="blocks.{layer}.nope"), progress=False)
    with pytest.raises(InterplabError, match="carries width 128, not d_model=32"):
        train_clt(config(tiny_gpt2_dir, corpus, out, in_hook="blocks.{layer}.mlp.hook_post"), progress=False)
    with pytest.raises(InterplabError, match="2 token batches given for 12 steps"):
        train_clt(config(tiny_gpt2_dir, corpus, out), token_batches=[torch.zeros(4, 16, dtype=torch.long)] * 2,
                  progress=False)
    assert not out.exists()
