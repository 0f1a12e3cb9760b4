"""`interplab sae eval`: known answers (a perfect SAE), sign of KL, seeded controls, one prefix per batch, the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from interplab.cli import main
from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.evals.configs import EvalConfig
from interplab.evals import sae_eval
from interplab.evals.metrics import reconstruction_metrics
from interplab.evals.sae_eval import VARIANTS, evaluate
from interplab.sae import SAEConfig, load_sae, make_sae

HOOK = "blocks.1.hook_resid_post"
D = 32  # width of the tiny GPT-2


def perfect_sae(tiny_gpt2_dir, folder):
    """ReLU SAE with W_enc = [I, −I], W_dec = [I; −I], biases 0: decode(encode(x)) = relu(x) − relu(−x) = x."""
    sae = make_sae(SAEConfig(arch="relu", d_in=D, d_sae=2 * D, hook_name=HOOK, model=str(tiny_gpt2_dir)))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save(str(folder))
    return str(folder)


def random_sae(tiny_gpt2_dir, folder, model):
    sae = make_sae(SAEConfig(arch="topk", d_in=D, d_sae=4 * D, k=4, hook_name=HOOK, model=str(tiny_gpt2_dir)))
    sample = model.run_with_cache(torch.randint(1, 200, (2, 16)), [HOOK]).cache[HOOK].reshape(-1, D)
    sae.initialize(sample, seed=1)
    sae.save(str(folder))
    return str(folder)


def cfg(sae, corpus, **kw):
    return EvalConfig(**{"sae": sae, "corpus": corpus, "split": "all", "tokens": 160, "ctx_len": 16,
                         "batch_size": 4, "device": "cpu", **kw})


def test_perfect_sae_known_answers(tiny_gpt2_dir, tmp_path, corpus, model):
    result = evaluate(cfg(perfect_sae(tiny_gpt2_dir, tmp_path / "p"), corpus), model=model, progress=False)
    m = result["metrics"]
    assert abs(m["model_behavior"]["kl_div_with_sae"]) < 1e-6
    assert m["reconstruction"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction"]["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_performance"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["model_performance"]["ce_loss_with_sae"] == pytest.approx(m["model_performance"]["ce_loss_without_sae"],
                                                                      abs=1e-6)
    # zero error norm: ε-random and the norm-matched controls are the clean activation too; the ratio is undefined
    for name in ("epsilon_random", "sae_norm_patch", "sae_output_at_original_norm", "covariance_matched"):
        assert abs(m["kl"][name]["mean"]) < 1e-6
    assert m["model_behavior"]["kl_ratio"] is None
    assert m["sparsity"]["l0"] == pytest.approx(D, abs=1.0)  # each coordinate fires one of its two latents
    assert result["n_tokens"] == 10 * 15  # 160 tokens → 10 contexts of 16, BOS excluded


def test_random_sae_controls(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = random_sae(tiny_gpt2_dir, tmp_path / "r", model)
    a = evaluate(cfg(sae, corpus, seed=3), model=model, progress=False)["metrics"]
    b = evaluate(cfg(sae, corpus, seed=3), model=model, progress=False)["metrics"]
    for name in VARIANTS:
        assert a["kl"][name]["mean"] >= -1e-6
        assert a["kl"][name]["sem"] >= 0
    assert a["kl"]["epsilon_random"] == b["kl"]["epsilon_random"]  # seeded: reproducible
    assert a["kl"]["covariance_matched"] == b["kl"]["covariance_matched"]
    beh = a["model_behavior"]
    assert beh["kl_ratio"] == pytest.approx(a["kl"]["sae"]["mean"] / a["kl"]["epsilon_random"]["mean"], rel=1e-9)
    assert beh["kl_ratio_sem"] > 0
    assert a["model_performance"]["ce_loss_with_ablation"] > a["model_performance"]["ce_loss_without_sae"]
    assert a["reconstruction"]["explained_variance"] < 1
    assert set(a["sparsity"]) >= {"l0", "l1", "dead_fraction", "dense_fraction", "feature_density_hist"}
    assert a["sparsity"]["l0"] == pytest.approx(4.0)


def test_reconstruction_without_massive_tokens_matches_a_direct_computation(tiny_gpt2_dir, tmp_path, corpus, model,
                                                                          monkeypatch):
    monkeypatch.setattr(sae_eval, "MASSIVE_NORM_FACTOR", 1.0)  # "massive" = above the median: about half the tokens
    sae_dir = random_sae(tiny_gpt2_dir, tmp_path / "r", model)
    m = evaluate(cfg(sae_dir, corpus), model=model, progress=False)["metrics"]
    tokens = torch.stack(list(itertools.islice(iter_contexts(corpus, model.tokenizer, 16, split="all", seed=0), 10)))
    x = model.run_with_cache(tokens, [HOOK]).cache[HOOK][:, 1:]                          # [10 15 d]
    cut = x[:4].norm(dim=-1).median()                                                   # the first batch's median
    keep = x.norm(dim=-1) <= cut
    sae = load_sae(sae_dir)
    expected = reconstruction_metrics(x[keep], sae(x[keep]))
    typical = m["reconstruction_typical"]
    assert typical["n_massive"] == int((~keep).sum()) and 0.3 < typical["massive_fraction"] < 0.7
    for key in ("mse", "explained_variance", "cossim", "l2_ratio"):
        assert typical[key] == pytest.approx(expected[key], rel=1e-4)


def test_prefix_runs_once_per_batch(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    calls = {"block0": 0, "block2": 0}
    h0 = model.blocks[0].register_forward_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1))
    h2 = model.blocks[2].register_forward_hook(lambda *a: calls.__setitem__("block2", calls["block2"] + 1))
    try:
        evaluate(cfg(sae, corpus), model=model, progress=False)  # 10 contexts, batches of 4 → 3 batches
    finally:
        h0.remove()
        h2.remove()
    assert calls["block0"] == 3
    assert calls["block2"] == 3 * (1 + len(VARIANTS))  # clean + each variant run the suffix


def test_cli_writes_json(tiny_gpt2_dir, tmp_path, corpus, capsys):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    out = tmp_path / "m" / "metrics.json"
    argv = ["sae", "eval", "--sae", sae, "--corpus", corpus, "--split", "all", "--tokens", "64", "--ctx-len", "16",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"config", "sae_config", "n_tokens", "metrics"}
    assert data["config"]["hook"] == HOOK and data["config"]["model"] == str(tiny_gpt2_dir)
    assert set(data["metrics"]) == {"reconstruction", "sparsity", "model_performance", "model_behavior", "kl",
                                    "ce_loss", "per_token", "reconstruction_typical", "reconstruction_quality",
                                    "shrinkage", "model_performance_preservation", "model_behavior_preservation",
                                    "token_stats"}
    assert data["kind"] == "sae eval"
    assert "figures" not in data  # only with --figures
    assert "kl_ratio" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"hook": "blocks.9.hook_nonsense"}, "valid names"),
    ({"hook": "blocks.0.mlp.hook_post"}, "d_in"),
    ({"tokens": "8"}, "less than one context"),
    ({"corpus": "EMPTY"}, "no context"),
])
def test_cli_errors_exit_2_one_line(tiny_gpt2_dir, tmp_path, corpus, capsys, change, message):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    if change.get("corpus") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
        change = {"corpus": str(tmp_path / "empty.jsonl")}
    opts = {"sae": sae, "corpus": corpus, "split": "all", "tokens": "64", "ctx-len": "16", "device": "cpu", **change}
    argv = ["sae", "eval"] + [a for k, v in opts.items() for a in (f"--{k}", str(v))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_sae_without_hook_needs_one(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = make_sae(SAEConfig(arch="relu", d_in=D, d_sae=2 * D))
    sae.save(str(tmp_path / "n"))
    with pytest.raises(InterplabError, match="--hook"):
        evaluate(cfg(str(tmp_path / "n"), corpus), model=model, progress=False)
    assert load_sae(str(tmp_path / "n")).cfg.hook_name == ""


def test_per_token_analysis_and_figures(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = random_sae(tiny_gpt2_dir, tmp_path / "r", model)
    figs = tmp_path / "figs"
    result = evaluate(cfg(sae, corpus, figures=str(figs)), model=model, progress=False)
    m = result["metrics"]
    pt = m["per_token"]
    assert pt["n_tokens"] == result["n_tokens"] == sum(b["n_tokens"] for b in pt["bins"])
    assert sum(b["n_token_types"] for b in pt["bins"]) == pt["n_token_types"]
    assert pt["gap_mean"] == pytest.approx(m["kl"]["sae"]["mean"] - m["kl"]["epsilon_random"]["mean"], rel=1e-4,
                                           abs=1e-7)  # float32 per-token arrays
    assert -1 <= pt["corr_gap_log10_freq"] <= 1
    assert len(pt["bins"]) == 8 and all("kl_sae_norm_patch_mean" in b for b in pt["bins"])
    assert set(result["figures"]) == {"kl_histograms", "kl_gap_vs_frequency"}
    for name, path in result["figures"].items():
        assert path == str(figs / f"{name}.png")
        data = (figs / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_per_token_perfect_sae(tiny_gpt2_dir, tmp_path, corpus, model):
    result = evaluate(cfg(perfect_sae(tiny_gpt2_dir, tmp_path / "p"), corpus, figures=str(tmp_path / "f")),
                      model=model, progress=False)
    pt = result["metrics"]["per_token"]
    assert abs(pt["gap_mean"]) < 1e-6
    assert all(b["mean_gap"] is None or abs(b["mean_gap"]) < 1e-6 for b in pt["bins"])
    assert (tmp_path / "f" / "kl_histograms.png").exists()
    json.dumps(result, allow_nan=False)  # NaNs (e.g. the correlation of a constant gap) became null


# ---- SAELens's eval file layout (issue 20) ----------------------------------------------------------------------
SAELENS_GROUPS = {  # sae_lens/evals.py run_evals: its groups and keys (explained_variance_legacy left out, documented)
    "reconstruction_quality": {"explained_variance", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"},
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
}


def test_result_holds_sae_lens_groups_with_the_same_numbers(tiny_gpt2_dir, tmp_path, corpus, model):
    result = evaluate(cfg(random_sae(tiny_gpt2_dir, tmp_path / "r", model), corpus), model=model, progress=False)
    m = result["metrics"]
    for group, keys in SAELENS_GROUPS.items():
        assert set(m[group]) >= keys, group
    assert "explained_variance_legacy" not in m["reconstruction_quality"]
    for key in ("explained_variance", "mse", "cossim"):
        assert m["reconstruction_quality"][key] == m["reconstruction"][key]
    for key in SAELENS_GROUPS["shrinkage"]:
        assert m["shrinkage"][key] == m["reconstruction"][key]
    assert m["model_performance_preservation"] == {k: m["model_performance"][k]
                                                   for k in SAELENS_GROUPS["model_performance_preservation"]}
    assert m["model_behavior_preservation"] == {k: m["model_behavior"][k]
                                                for k in SAELENS_GROUPS["model_behavior_preservation"]}
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == result["n_tokens"]


# ---- outputs checked before any work (issue 20) -----------------------------------------------------------------
def refused_before_work(model, run, message):
    """`run()` raises an InterplabError with `message` before the model's first forward pass."""
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InterplabError) as e:
            run()
    finally:
        handle.remove()
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert calls == []


def test_out_folder_file_parent_and_figures_file_are_refused_before_work(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    (tmp_path / "d").mkdir()
    (tmp_path / "afile").write_text("x")
    for kw, message in [({"out": str(tmp_path / "d")}, "is a folder; --out names the JSON file"),
                        ({"out": str(tmp_path / "afile" / "m.json")}, "afile is a file, not a folder"),
                        ({"figures": str(tmp_path / "afile")}, "--figures " + str(tmp_path / "afile") + " is a file"),
                        ({"scale_tune": "latent", "scale_tune_lr": float("nan")},
                         "--scale-tune-lr must be a finite number > 0, got nan")]:
        refused_before_work(model, lambda: evaluate(cfg(sae, corpus, **kw), model=model, progress=False), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d", "p"] and not any((tmp_path / "d").iterdir())


def test_existing_out_file_is_replaced_only_by_the_same_evaluation(tiny_gpt2_dir, tmp_path, corpus, model):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    foreign = tmp_path / "notes.json"
    foreign.write_bytes(b"\xff\xfe not json")
    refused_before_work(model, lambda: evaluate(cfg(sae, corpus, out=str(foreign)), model=model, progress=False),
                        "exists and holds something else, not an interplab sae eval result")
    assert foreign.read_bytes() == b"\xff\xfe not json"
    other = tmp_path / "probe.json"
    other.write_text(json.dumps({"kind": "probe", "config": {}}))
    refused_before_work(model, lambda: evaluate(cfg(sae, corpus, out=str(other)), model=model, progress=False),
                        "holds a probe result, not an interplab sae eval result")

    out = tmp_path / "m.json"
    first = evaluate(cfg(sae, corpus, out=str(out)), model=model, progress=False)
    before = out.read_bytes()
    refused_before_work(model, lambda: evaluate(cfg(sae, corpus, out=str(out), tokens=320), model=model,
                                                progress=False),
                        "holds a different sae eval (differs in: tokens 160 → 320)")
    refused_before_work(model, lambda: evaluate(cfg(sae, corpus, out=str(out), hook="blocks.0.hook_resid_post"),
                                                model=model, progress=False), "differs in: hook")
    assert out.read_bytes() == before
    stale = json.loads(before)
    stale["metrics"]["sparsity"]["l0"] = -1.0  # the same evaluation, with numbers that are no longer right
    out.write_text(json.dumps(stale))
    again = evaluate(cfg(sae, corpus, out=str(out), device="cpu", figures=str(tmp_path / "f")), model=model,
                     progress=False)  # where it runs and where figures go are not what it computes
    assert json.loads(out.read_text())["metrics"]["sparsity"]["l0"] == first["metrics"]["sparsity"]["l0"] == \
        again["metrics"]["sparsity"]["l0"]


@pytest.mark.parametrize("setup, message", [
    ("out_dir", "is a folder; --out names the JSON file"),
    ("bad_cfg", "is not UTF-8 text"),
    ("list_cfg", "holds JSON list, not an object"),
])
def test_cli_bad_outputs_and_sae_files_exit_2_one_line(tiny_gpt2_dir, tmp_path, corpus, capsys, setup, message):
    sae = perfect_sae(tiny_gpt2_dir, tmp_path / "p")
    out = tmp_path / "out"
    out.mkdir()
    if setup == "bad_cfg":
        (tmp_path / "p" / "cfg.json").write_bytes(b"{\"d_in\": \"\xff\"}")
    elif setup == "list_cfg":
        (tmp_path / "p" / "cfg.json").write_text("[1, 2]")
    target = out if setup == "out_dir" else out / "m.json"
    argv = ["sae", "eval", "--sae", sae, "--corpus", corpus, "--split", "all", "--tokens", "64", "--ctx-len", "16",
            "--device", "cpu", "--out", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not any(out.iterdir())
