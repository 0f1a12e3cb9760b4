"""The Markdown run report: tables carry the numbers they are given, figures link relative to the report."""

from __future__ import annotations

import pytest

from interplab.errors import InterplabError
from interplab.report.eval_report import write_eval_report


def fake_result(sae: str, l0: float, kl_sae: float, kl_eps: float, tuned: bool = False) -> dict:
    kl = {"sae": {"mean": kl_sae, "sem": 0.01}, "epsilon_random": {"mean": kl_eps, "sem": 0.002}}
    m = {
        "kl": kl,
        "ce_loss": {"clean": {"mean": 2.5}, "sae": {"mean": 2.75}, "epsilon_random": {"mean": 2.55}},
        "model_behavior": {"kl_div_with_sae": kl_sae, "kl_div_with_sae_sem": 0.01,
                           "kl_ratio": kl_sae / kl_eps if kl_sae else None, "kl_ratio_sem": 0.05},
        "model_performance": {"ce_loss_score": 0.93},
        "sparsity": {"l0": l0},
        "reconstruction": {"fvu": 0.125},
        "reconstruction_typical": {"fvu": 0.25},
    }
    if tuned:
        m["scale_tuning"] = {"per": "latent", "n_tokens_tuned": 8192, "held_out": True, "kl_div_with_sae": kl_sae,
                             "kl_div_with_sae_scale_tuned": 0.2, "gap_closed": 0.25, "kl_ratio_tuned": 1.5,
                             "kl_ratio_tuned_sem": 0.1, "fvu_tuned": 0.13}
    return {"config": {"sae": f"/runs/saes/{sae}", "model": "tiny", "hook": "blocks.1.hook_resid_post",
                       "corpus": "docs", "split": "test"}, "n_tokens": 4064, "metrics": m}


def test_report_tables_and_links(tmp_path):
    evals = [fake_result("topk-k32", 32.0, 0.3, 0.15, tuned=True), fake_result("topk-k16", 16.0, None, 0.2)]
    perturb = {"step_unit": 12.5, "n_pairs": 8, "plateau": {"isotropic": {
        "real": {"threshold": 0.1, "median": 0.4, "mean": 0.45, "sem": 0.02, "fraction_never_crossing": 0.125},
        "synthetic": {"threshold": 0.1, "median": None, "mean": None, "sem": None, "fraction_never_crossing": 1.0}}}}
    (tmp_path / "figures").mkdir()
    path = write_eval_report(str(tmp_path / "report.md"), evals, perturb=perturb,
                             figures={"pareto": str(tmp_path / "figures" / "pareto.png")})
    text = (tmp_path / "report.md").read_text()
    assert path == str(tmp_path / "report.md")
    assert "| topk-k32 | 4,064 | 32.0 | 0.125 | 0.25 | 0.93 | 0.3 ± 0.01 | 0.15 ± 0.002 | 2 ± 0.05 | 25.0% |" in text
    assert "| topk-k16 | 4,064 | 16.0 | 0.125 | 0.25 | 0.93 | – ± 0.01 |" in text  # missing: a dash
    assert "| sae | 0.3 ± 0.01 | 2.75 |" in text and "| clean | 0 | 2.5 |" in text
    assert "closing 25.0% of the gap" in text and "held out from" in text
    assert "| isotropic | real | 0.4 | 0.45 ± 0.02 | 12.5% |" in text and "median ‖x‖ at the hook (12.5)" in text
    assert "| isotropic | synthetic | – | – ± – | 100.0% |" in text and "threshold 0.1 nats; 8 pairs" in text
    assert "![pareto](figures/pareto.png)" in text


def test_report_needs_an_evaluation(tmp_path):
    with pytest.raises(InterplabError, match="at least one evaluation"):
        write_eval_report(str(tmp_path / "r.md"), [])
    assert not (tmp_path / "r.md").exists()
