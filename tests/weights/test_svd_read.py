"""Reading singular directions through the vocabulary: planted directions come back, proxies by hand, the CLI run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.weights.svd_read import (
    Vocabulary,
    matrix_directions,
    proxy_summary,
    random_directions,
    read_directions,
    token_kind,
    vocabulary,
)
from interplab.weights.configs import SVDConfig
from interplab.weights.svd_run import format_summary, run_svd
from tests.weights.test_circuits import D_VOCAB, copying_model


def test_ov_directions_read_back_the_planted_tokens():
    model = copying_model()
    (head0,) = matrix_directions(model, "ov", 0, 0, n=3)
    readings = read_directions(vocabulary(model), head0.sides["writes"], k=2)
    # Direction i writes token i (strength 8 - i); its sign is arbitrary, so the token is at one end.
    for i, reading in enumerate(readings):
        ends = {reading.top[0][0], reading.bottom[0][0]}
        assert f"#{i}" in ends
    assert readings[0].kind_share is None  # no tokenizer: token kinds are not read


def test_matrix_directions_of_every_kind_are_unit_vectors_with_descending_spectrum(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir))
    gated = model.info.arch == "llama"
    for kind in ("ov", "qk", "mlp-in", "mlp-out", "embed", "unembed", *(["mlp-gate"] if gated else [])):
        found = matrix_directions(model, kind, 1, None, n=3)
        assert len(found) == (model.info.n_heads if kind in ("ov", "qk") else 1)
        for directions in found:
            assert torch.all(directions.S[:-1] >= directions.S[1:])
            for vectors in directions.sides.values():
                assert vectors.shape == (3, model.info.d_model)
                torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=1e-5)


def test_token_kinds():
    assert [token_kind(t) for t in [" the", " The", "ing", "Ing", "42", " 7", ",", " (", "\n", "x2", "é"]] == [
        "word", "Word", "subword", "Subword", "number", "number", "punctuation", "punctuation", "whitespace",
        "mixed", "non-ascii"]


def test_proxies_by_hand():
    # Four tokens with unembedding columns e0, e0, e1, -e0 in 2-D; two are numbers.
    W_U = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]])
    vocab = Vocabulary(W_U, W_U.T.clone(), ["1", "2", " a", " b"], ["number", "number", "word", "word"])
    (reading,) = read_directions(vocab, torch.tensor([[1.0, 0.1]]), k=2)
    # Top end: tokens 0 and 1 (logit 1.0 each); bottom end: token 3 (-1.0) then token 2 (0.1).
    assert {t for t, _ in reading.top} == {"1", "2"} and [t for t, _ in reading.bottom] == [" b", " a"]
    assert reading.kind_share == pytest.approx((1.0 + 1.0) / 2)  # both ends are one kind
    assert reading.coherence == pytest.approx((1.0 + 0.0) / 2)  # cos(e0, e0) = 1; cos(-e0, e1) = 0
    summary = proxy_summary([reading, reading._replace(kind_share=0.5, coherence=0.0)])
    assert summary["kind_share"]["mean"] == pytest.approx(0.75)
    assert summary["coherence"]["mean"] == pytest.approx(0.25)


def test_random_directions_are_seeded_unit_vectors():
    a, b = random_directions(16, 5, seed=3), random_directions(16, 5, seed=3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))


def test_run_svd_writes_readings_controls_and_figures(tiny_gpt2_dir, tmp_path):
    model = load_model(str(tiny_gpt2_dir))
    cfg = SVDConfig(model=str(tiny_gpt2_dir), what="all", layer=1, directions=2, top_k=5, controls=20,
                    out=str(tmp_path / "svd"))
    result = run_svd(cfg, model=model)
    out = tmp_path / "svd"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kind"] == "weights svd" and json.loads((out / "config.json").read_text())["config"]["what"] == "all"
    assert list(saved["matrices"]) == ["ov", "qk", "mlp-in", "mlp-out", "embed", "unembed"]  # gpt2: no gate
    assert len(saved["matrices"]["ov"]["entries"]) == model.info.n_heads
    assert saved["control"]["n"] == 20 and saved["control"]["kind_share"]["mean"] > 0
    assert len(saved["copying"]["heads"]) == model.info.n_heads
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["proxies.png", "spectra.png"]
    assert sorted(result["figures"].values()) == sorted(str(p) for p in (out / "figures").iterdir())
    text = format_summary(result)
    assert "random" in text and "L1.H0 ov" in text and "copying" in text
    assert run_svd(cfg, model=model) == saved  # the complete run is reported as done
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(InterplabError, match=r"differs in: [^;]*\btop_k\b"):
        run_svd(replace(cfg, top_k=6), model=model)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_run_svd_refuses_a_foreign_folder_and_writes_nothing(tmp_path):
    (tmp_path / "weights.txt").write_text("mine")
    with pytest.raises(InterplabError, match="is not empty and holds no interplab weights svd run"):
        run_svd(SVDConfig(out=str(tmp_path)))  # refused before the model is loaded
    assert [p.name for p in tmp_path.iterdir()] == ["weights.txt"]


@pytest.mark.parametrize("overrides,message", [
    (dict(what="attn"), "--what 'attn' is not valid"),
    (dict(layer=3), r"--layer in \[0, 2\]"),
    (dict(head=4), "head 4 is out of range"),
    (dict(what="mlp-out", head=0), "--head applies to ov and qk only"),
    (dict(what="mlp-gate"), "no gated MLP"),
    (dict(top_k=1), "--top-k >= 2"),
])
def test_run_svd_errors(tiny_gpt2_dir, tmp_path, overrides, message):
    cfg = SVDConfig(model=str(tiny_gpt2_dir), out=str(tmp_path / "svd"), **overrides)
    with pytest.raises(InterplabError, match=message):
        run_svd(cfg, model=load_model(str(tiny_gpt2_dir)))


def test_attention_only_model_has_no_mlp_matrix():
    with pytest.raises(InterplabError, match="attention-only"):
        matrix_directions(copying_model(), "mlp-in", 0, None, n=1)
    assert D_VOCAB == 8
