"""Figures: valid, non-trivial PNGs written where asked; the Pareto plot from metrics.json files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from interplab.errors import InterplabError
from interplab.evals.figures import kl_gap_vs_frequency, kl_histograms, pareto, pareto_from_metrics, point_from_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5_000):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def test_kl_histograms(tmp_path):
    rng = np.random.default_rng(0)
    kl = {"sae": rng.lognormal(-3, 1, 500).astype(np.float32), "epsilon_random": rng.lognormal(-4, 1, 500),
          "sae_norm_patch": np.concatenate([np.zeros(10), rng.lognormal(-5, 1, 490)])}
    out = tmp_path / "sub" / "h.png"
    assert kl_histograms(kl, str(out)) == str(out)
    assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["h.png"]  # no temporary file left behind


def test_kl_histograms_all_zero(tmp_path):
    assert_png(kl_histograms({"sae": np.zeros(20), "epsilon_random": np.zeros(20)}, str(tmp_path / "z.png")),
               min_bytes=2_000)


def test_kl_gap_vs_frequency(tmp_path):
    bins = [{"log10_freq_lo": i / 2, "log10_freq_hi": (i + 1) / 2, "log10_freq_mean": i / 2 + 0.25,
             "n_tokens": 10 * (i + 1), "mean_gap": 0.1 / (i + 1), "sem_gap": 0.01} for i in range(6)]
    bins.append({"log10_freq_lo": 3, "log10_freq_hi": 3.5, "log10_freq_mean": None, "n_tokens": 0,
                 "mean_gap": None, "sem_gap": None})  # an empty bin as it comes back from the JSON
    assert_png(kl_gap_vs_frequency(bins, str(tmp_path / "g.png"), corr=-0.4))


def fake_metrics(sae, l0, fvu, score):
    return {"config": {"sae": sae}, "metrics": {"sparsity": {"l0": l0}, "reconstruction": {"fvu": fvu},
                                                "model_performance": {"ce_loss_score": score}}}


def test_pareto_from_metrics(tmp_path):
    paths = []
    for name, l0, fvu, score in (("runs/k16", 16.0, 0.2, 0.9), ("runs/k64/", 64.0, 0.1, 0.97)):
        p = tmp_path / f"{l0:.0f}.json"
        p.write_text(json.dumps(fake_metrics(name, l0, fvu, score)))
        paths.append(str(p))
    assert_png(pareto_from_metrics(paths, str(tmp_path / "pareto.png")))
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(InterplabError, match="bad.json"):
        pareto_from_metrics([str(tmp_path / "bad.json")], str(tmp_path / "x.png"))


def test_pareto_missing_values(tmp_path):
    pts = [{"label": "a", "l0": 8, "fvu": 0.3, "ce_loss_score": None}, {"label": "b", "l0": 32, "fvu": 0.1,
                                                                        "ce_loss_score": 0.95}]
    assert_png(pareto(pts, str(tmp_path / "p.png")))
    with pytest.raises(InterplabError):
        pareto([], str(tmp_path / "e.png"))


def test_point_from_metrics_reads_the_typical_fvu(tmp_path):
    metrics = {"sparsity": {"l0": 16.0}, "reconstruction": {"fvu": 0.05}, "model_performance": {"ce_loss_score": 0.9},
               "reconstruction_typical": {"fvu": 0.25}}
    point = point_from_metrics({"config": {"sae": "runs/topk-k16-x16/"}, "metrics": metrics})
    assert point == {"label": "topk-k16-x16", "l0": 16.0, "fvu": 0.05, "ce_loss_score": 0.9, "fvu_typical": 0.25}
    assert_png(pareto([point, {**point, "label": "older", "fvu_typical": None}], str(tmp_path / "p.png")))
