"""`interplab demo`: harvest, then a summary whose figures are checked against the stored activations."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.activations import ActivationStore
from interplab.activations.summary import summarize
from interplab.cli import main
from interplab.sae import load_sae


def test_demo_on_a_tiny_model_runs_the_pipeline_and_resumes(tiny_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["demo", "--model", str(tiny_gpt2_dir), "--hook", "blocks.1.hook_resid_post", "--tokens", "2048",
            "--ctx-len", "32", "--k", "8,4", "--eval-tokens", "256", "--other-eval-tokens", "128",
            "--scale-tune-tokens", "64", "--perturb-contexts", "4", "--perturb-steps", "5",
            "--dashboard-tokens", "512", "--out", str(run), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post: 2,048 tokens" in out and "participation ratio" in out
    assert "topk-k8-x16: training FVU" in out and "topk-k4-x16: training FVU" in out
    assert "kl_ratio (sae / epsilon_random)" in out and "decoder scales per latent" in out
    assert f"report: {run}/report.md" in out
    sae = load_sae(str(run / "saes" / "topk-k8-x16"))
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_name) == (32, 512, "blocks.1.hook_resid_post")
    for name in ("kl_histograms", "kl_gap_vs_frequency", "pareto", "perturbation_curves"):
        assert (run / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    evals = {n: json.loads((run / "eval" / f"topk-k{n}-x16.json").read_text()) for n in (8, 4)}
    assert "scale_tuning" in evals[8]["metrics"] and "scale_tuning" not in evals[4]["metrics"]
    assert evals[8]["config"]["split"] == "test"   # evaluated on held-out documents
    report = (run / "report.md").read_text()
    assert "| topk-k8-x16 |" in report and "| topk-k4-x16 |" in report and "## Activation plateaus" in report
    assert "![pareto](figures/pareto.png)" in report
    # the demo ends with the main SAE's dashboard: its data describe that SAE, and the path to open is printed
    from interplab.dashboard.store import load_meta

    meta = load_meta(str(run / "dashboard"))
    assert (meta["d_sae"], meta["hook"], meta["n_tokens"]) == (512, "blocks.1.hook_resid_post", 512)
    assert f"open {(run / 'dashboard' / 'index.html').as_uri()}" in out

    assert main(args) == 0  # a second run finds every step done: it only summarises and rewrites the report
    out = capsys.readouterr().out
    assert "harvested at" not in out and "evaluating" not in out and "already done" in out
    assert "building the feature dashboard" not in out and "dashboard written" in out


def test_summary_statistics_match_a_direct_computation(tiny_gpt2_dir, tmp_path):
    assert main(["harvest", "--model", str(tiny_gpt2_dir), "--hooks", "blocks.0.hook_resid_post", "--tokens", "1024",
                 "--ctx-len", "32", "--contexts-per-shard", "8", "--out", str(tmp_path / "s")]) == 0
    store = ActivationStore(str(tmp_path / "s"))
    stats = summarize(store)["blocks.0.hook_resid_post"]
    acts = torch.cat([c["blocks.0.hook_resid_post"] for c in store.iter_contexts()]).double()  # [n, ctx, d]
    body = acts[:, 1:].reshape(-1, acts.shape[-1])
    eig = torch.linalg.eigvalsh(torch.cov(body.T, correction=0))
    assert stats["tokens"] == 1024
    assert stats["mean_norm"] == pytest.approx(body.norm(dim=-1).mean().item(), rel=1e-9)
    assert stats["bos_mean_norm"] == pytest.approx(acts[:, 0].norm(dim=-1).mean().item(), rel=1e-9)
    assert stats["participation_ratio"] == pytest.approx((eig.sum() ** 2 / (eig**2).sum()).item(), rel=1e-6)
    assert stats["anisotropy"] == pytest.approx((body.mean(0).norm() / body.norm(dim=-1).mean()).item(), rel=1e-9)


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path, capsys):
    assert main(["demo", "--tokens", "4096", "--k", "32,64", "--eval-tokens", "512", "--other-eval-tokens", "256",
                 "--scale-tune-tokens", "256", "--perturb-contexts", "4", "--perturb-steps", "5",
                 "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "blocks.6.hook_resid_post: 4,096 tokens" in out and "kl_ratio (sae / epsilon_random)" in out
    assert (tmp_path / "demo" / "report.md").exists()
    store = ActivationStore(str(tmp_path / "demo" / "activations"))
    assert store.complete and store.d("blocks.6.hook_resid_post") == 576
