"""`interplab perturb`: known answers (step 0, reaching a real target, the later-layer capture), plateau statistics on
hand-made curves, seeding, and every bad input refused before the first forward pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.evals.configs import TARGET_KINDS, PerturbConfig
from interplab.evals.metrics import kl_per_token
from interplab.evals.perturb import (
    activation_stats,
    alive_decoder_directions,
    perturbation_sweep,
    run_suffix_capture,
    sample_directions,
    sweep,
)
from interplab.evals.perturb_stats import curve_summary, plateau_steps, plateau_summary
from interplab.models import load_model
from interplab.sae import SAEConfig, make_sae

HOOK = "blocks.1.hook_resid_post"
LATER = "blocks.2.hook_resid_post"
D = 32  # width of the tiny GPT-2


def tiny_sae(model, d_in=D, hook=HOOK):
    sae = make_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=4 * d_in, k=4, hook_name=hook, model="tiny"))
    sample = model.run_with_cache(torch.randint(1, 200, (2, 16)), [HOOK]).cache[HOOK].reshape(-1, D)
    sae.initialize(sample[:, :d_in], seed=1)
    return sae


def cfg(corpus, /, **kw):
    return PerturbConfig(**{"model": "tiny", "hook": HOOK, "corpus": corpus, "split": "all", "n_contexts": 6,
                            "ctx_len": 8, "batch_size": 8, "n_steps": 3, "max_step": 2.0, "device": "cpu", **kw})


def contexts(model, n=6, ctx_len=8):
    return torch.randint(1, model.info.d_vocab, (n, ctx_len), generator=torch.Generator().manual_seed(5))


# ---- known answers --------------------------------------------------------------------------------------------
def test_step_zero_is_exactly_zero_for_every_kind(corpus, model):
    result = perturbation_sweep(cfg(corpus), model=model, sae=tiny_sae(model), progress=False)
    assert set(result["curves"]) == set(TARGET_KINDS) == set(result["plateau"])
    assert result["steps"] == pytest.approx([0.0, 1.0, 2.0])
    assert result["step_unit"] > 0 and result["config"]["later_hook"] == LATER
    for kind, by_start in result["curves"].items():
        assert set(by_start) == {"real", "synthetic"}
        for start, c in by_start.items():
            for metric in ("kl", "l2", "l2_relative"):
                assert set(c[metric]) == {"mean", "sem", "p10", "p25", "p50", "p75", "p90"}
                assert all(v[0] == 0.0 for v in c[metric].values()), (kind, start, metric)
                assert c[metric]["mean"][-1] > 0                      # moving does change something
            p = result["plateau"][kind][start]
            assert p["n_pairs"] == 6 and len(p["per_pair"]) == 6 and 0 <= p["fraction_never_crossing"] <= 1


def test_real_target_is_reached_at_its_distance(model):
    """At s = ‖t − x‖ the activation is t: the sweep's KL and later change equal an independent splice of t."""
    tokens = contexts(model)
    prefixes = [model.run_prefix(tokens[:4], HOOK), model.run_prefix(tokens[4:], HOOK)]  # uneven batches
    x = torch.cat([p.act for p in prefixes])[:, -1]                                      # [6 d]
    t = x.roll(1, 0)                                                                     # another context's
    dist = (t - x).norm(dim=-1, keepdim=True)
    steps = torch.cat([torch.zeros_like(dist), dist], 1)                                 # per pair: [0, ‖t − x‖]
    s = sweep(model, prefixes, x, (t - x) / dist, steps, LATER)

    def put_t(act, _name):
        act = act.clone()
        act[:, -1] = t
        return act

    clean_logits, clean_cache = model.run_with_cache(tokens, [LATER], return_logits=True)
    logits_t, cache_t = model.run_with_cache(tokens, [LATER], return_logits=True, hooks=[(HOOK, put_t)])
    kl_t = kl_per_token(clean_logits[:, -1:], logits_t[:, -1:])[:, 0].double()
    assert kl_t.min() > 1e-5                                                              # a real difference
    torch.testing.assert_close(s.kl[:, 1], kl_t, rtol=1e-3, atol=1e-7)
    l2_t = (cache_t[LATER][:, -1] - clean_cache[LATER][:, -1]).norm(dim=-1).double()
    torch.testing.assert_close(s.l2[:, 1], l2_t, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.later_norm, clean_cache[LATER][:, -1].norm(dim=-1).double())
    assert (s.kl[:, 0] == 0).all() and (s.l2[:, 0] == 0).all()


_MODELS: dict = {}  # loaded once per architecture for the parametrised test below


@pytest.mark.parametrize("hook, later", [
    ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"),
    ("blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"),
    ("blocks.1.mlp.hook_post", "ln_final.hook_out"),
    ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"),
    ("hook_embed", "blocks.0.hook_resid_post"),
])
def test_later_capture_equals_run_with_cache(tiny_hf_dir, hook, later):
    """Module hooks fire inside run_suffix (which calls the blocks directly), on every architecture."""
    m = _MODELS.get(tiny_hf_dir) or _MODELS.setdefault(tiny_hf_dir, load_model(str(tiny_hf_dir), device="cpu"))
    tokens = contexts(m)
    prefix = m.run_prefix(tokens, hook)
    replacement = prefix.act + torch.randn(prefix.act.shape, generator=torch.Generator().manual_seed(1))
    logits, captured = run_suffix_capture(m, prefix, replacement, later)
    ref_logits, cache = m.run_with_cache(tokens, [later], return_logits=True,
                                         hooks=[(hook, lambda act, name: replacement)])
    torch.testing.assert_close(captured, cache[later], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


# ---- plateau and curve statistics -----------------------------------------------------------------------------
def test_plateau_on_hand_made_curves():
    kl = torch.tensor([[0.0, 0.05, 0.2, 0.5],    # crosses at 1.0
                       [0.0, 0.01, 0.02, 0.03],  # never
                       [0.0, 0.2, 0.05, 0.3],    # crosses at 0.5 (the FIRST crossing, though it dips back)
                       [0.0, 0.1, 0.1, 0.11]])   # exactly at the threshold is not above it: crosses at 1.5
    steps = torch.tensor([0.0, 0.5, 1.0, 1.5])
    p = plateau_steps(kl, steps, 0.1)
    assert p[[0, 2, 3]].tolist() == [1.0, 0.5, 1.5] and math.isnan(p[1])
    s = plateau_summary(kl, steps, 0.1)
    assert s["n_pairs"] == 4 and s["n_crossing"] == 3 and s["fraction_never_crossing"] == 0.25
    assert s["median"] == 1.0 and s["mean"] == pytest.approx(1.0) and s["sem"] == pytest.approx(0.5 / math.sqrt(3))
    assert s["per_pair"] == [1.0, None, 0.5, 1.5]
    none = plateau_summary(kl[1:2], steps, 0.1)
    assert none["fraction_never_crossing"] == 1.0 and none["median"] is None and none["mean"] is None
    one = plateau_summary(kl[:1], steps, 0.1)
    assert one["median"] == 1.0 and one["sem"] is None


def test_curve_summary_matches_numpy():
    np = pytest.importorskip("numpy")
    v = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = curve_summary(v)
    assert c["mean"] == pytest.approx(v.mean(0).tolist())
    assert c["sem"] == pytest.approx((v.std(0) / math.sqrt(50)).tolist())
    for q in (10, 25, 50, 75, 90):
        assert c[f"p{q}"] == pytest.approx(np.percentile(v.numpy(), q, axis=0).tolist())


# ---- directions, statistics, seeding --------------------------------------------------------------------------
def test_directions():
    g = torch.Generator().manual_seed
    x = torch.randn(8, D, generator=g(0))
    iso = sample_directions("isotropic", x, g(1))
    assert torch.allclose(iso.norm(dim=-1), torch.ones(8))
    assert torch.equal(iso, sample_directions("isotropic", x, g(1)))
    assert not torch.equal(iso, sample_directions("isotropic", x, g(2)))
    real = sample_directions("real", x, g(1), real=x)
    # each direction points from x_i at another row x_j, j ≠ i
    cos = torch.einsum("id,ijd->ij", real, torch.nn.functional.normalize(x[None] - x[:, None], dim=-1))
    hits = (cos > 1 - 1e-5)
    assert hits.sum(1).tolist() == [1] * 8 and not hits.diagonal().any()
    stats = activation_stats(x)
    mc = sample_directions("mean_cov", x, g(1), stats=stats)
    assert torch.allclose(mc.norm(dim=-1), torch.ones(8))
    assert stats.step_unit == pytest.approx(x.norm(dim=-1).median().item())
    rows = torch.eye(D)[:3]
    dec = sample_directions("sae_decoder", x, g(1), sae_dirs=rows)
    assert all(any(torch.equal(r, row) for row in rows) for r in dec)


def test_synthetic_activations_follow_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 4, generator=g)
    acts = torch.randn(20_000, 4, generator=g) @ mix + 3.0
    stats = activation_stats(acts)
    syn = stats.sample(20_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(syn.mean(0), acts.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(syn.T.cov(), acts.T.cov(), atol=0.15, rtol=0.05)


def test_alive_decoder_directions(model):
    sae = tiny_sae(model)
    acts = torch.randn(40, D)
    fired = (sae.encode(acts) != 0).any(0)
    dirs = alive_decoder_directions(sae, acts, chunk=7)
    assert dirs.shape == (int(fired.sum()), D)
    torch.testing.assert_close(dirs, torch.nn.functional.normalize(sae.W_dec.detach()[fired], dim=-1))


def test_seeded_and_reproducible(corpus, model):
    c = cfg(corpus, targets=["isotropic", "real"])
    a = perturbation_sweep(c, model=model, progress=False)
    b = perturbation_sweep(c, model=model, progress=False)
    assert a == b
    other = perturbation_sweep(cfg(corpus, targets=["isotropic", "real"], seed=1), model=model,
                               progress=False)
    assert other["curves"]["isotropic"] != a["curves"]["isotropic"]


def test_sae_decoder_skipped_with_a_note_and_json_written(corpus, model, tmp_path, capsys):
    out = tmp_path / "r" / "perturb.json"
    result = perturbation_sweep(cfg(corpus, n_steps=2, out=str(out)), model=model, progress=False)
    assert "sae_decoder skipped" in capsys.readouterr().out
    assert list(result["curves"]) == ["isotropic", "mean_cov", "real"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_default_later_hook_after_the_last_block(corpus, model):
    result = perturbation_sweep(cfg(corpus, hook="blocks.2.hook_resid_post", targets=["isotropic"], n_steps=2),
                                model=model, progress=False)
    assert result["config"]["later_hook"] == "ln_final.hook_out"


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"targets": ["isotropic", "bogus"]}, "unknown target kind.*valid kinds: isotropic, mean_cov, real, sae_decoder"),
    ({"hook": "blocks.9.hook_resid_post"}, "unknown hook name"),
    ({"hook": "blocks.1.attn.hook_pattern"}, "attention patterns"),
    ({"later_hook": "blocks.1.attn.hook_pattern"}, "attention patterns"),
    ({"later_hook": "blocks.0.hook_resid_post"}, "must lie in a later layer"),
    ({"later_hook": "blocks.1.hook_resid_post"}, "must lie in a later layer"),
    ({"hook": "ln_final.hook_normalized"}, "must lie in a later layer"),
    ({"n_steps": 1}, "--n-steps must be >= 2"),
    ({"max_step": 0.0}, "--max-step must be a finite number > 0, got 0.0"),
    ({"max_step": float("inf")}, "--max-step must be a finite number > 0, got inf"),
    ({"kl_threshold": float("nan")}, "--kl-threshold must be a finite number > 0, got nan"),
    ({"kl_threshold": 0.0}, "--kl-threshold must be a finite number > 0"),
    ({"test_fraction": float("nan")}, r"--test-fraction must be a number in \[0, 1\), got nan"),
    ({"split": "test", "test_fraction": 0.0}, "the test split is empty"),
    ({"n_contexts": 1}, "--n-contexts must be >= 2"),
    ({"ctx_len": 65}, "longer than .* allows"),
    ({"split": "bogus"}, "split 'bogus' is not valid"),
    ({"corpus": "no-such-corpus.jsonl"}, "does not exist"),
    ({"targets": ["sae_decoder"]}, "no target kinds to run"),
    ("empty", "yields 0 context"),
    ("sae_width", "SAE d_in 16 does not match the width 32"),
    ("sae_hook", "the SAE was trained at blocks.0.hook_resid_post"),
])
def test_bad_input_is_refused_before_any_forward_pass(corpus, model, tmp_path, overrides, message):
    sae = None
    if overrides == "empty":
        (tmp_path / "tiny.txt").write_text("hi\n")
        overrides = {"corpus": str(tmp_path / "tiny.txt")}
    elif overrides == "sae_width":
        sae, overrides = tiny_sae(model, d_in=16), {}
    elif overrides == "sae_hook":
        sae, overrides = tiny_sae(model, hook="blocks.0.hook_resid_post"), {}
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InterplabError, match=message):
            perturbation_sweep(cfg(corpus, **overrides), model=model, sae=sae, progress=False)
    finally:
        handle.remove()
    assert calls == []


# ---- outputs checked before any work (issue 20) -----------------------------------------------------------------
def test_out_is_checked_before_the_first_forward_pass(corpus, model, tmp_path):
    (tmp_path / "d").mkdir()
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": 1}))
    out = tmp_path / "r.json"
    base = {"targets": ["isotropic"], "n_steps": 2}
    perturbation_sweep(cfg(corpus, out=str(out), **base), model=model, progress=False)
    before = out.read_bytes()
    assert json.loads(before)["kind"] == "perturb"
    for kw, message in [({"out": str(tmp_path / "d")}, "is a folder; --out names the JSON file"),
                        ({"out": str(foreign)}, "holds something else, not an interplab perturb result"),
                        ({"out": str(out), "max_step": 3.0}, "holds a different perturb (differs in: max_step 2.0 → 3.0)"),
                        ({"out": str(out), "later_hook": "ln_final.hook_normalized"}, "differs in: later_hook"),
                        ({"figures": str(foreign)}, "is a file; --figures names a folder")]:
        calls = []
        handle = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            with pytest.raises(InterplabError) as e:
                perturbation_sweep(cfg(corpus, **{**base, **kw}), model=model, progress=False)
        finally:
            handle.remove()
        assert message in str(e.value) and calls == []
    assert out.read_bytes() == before and json.loads(foreign.read_text()) == {"hello": 1}
    assert not any((tmp_path / "d").iterdir())
    # the same sweep again (the later hook resolved the same way): recomputed into its own file
    again = perturbation_sweep(cfg(corpus, out=str(out), device="cpu", **base), model=model, progress=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(again)) == json.loads(before)
