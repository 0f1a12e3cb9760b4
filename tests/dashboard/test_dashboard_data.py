"""The one-pass dashboard builder against brute force over every activation of the corpus read, held at once."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from interplab.dashboard import store
from interplab.dashboard.assemble import round_sig
from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.data import build_dashboard_data
from interplab.data import iter_contexts
from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.sae import SAEConfig, make_sae

HOOK = "blocks.1.hook_resid_post"
NEURONS = "blocks.1.mlp.hook_post"
CTX, N_CTX, BATCH = 16, 40, 6   # 6 does not divide 40: the last batch is short


def close(got, want, rtol=2e-3, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """A TopK SAE (k=4 of 24) whose encoder is scaled up so that latents fire on many tokens, the build, and the
    dense codes and neurons of the same contexts computed all at once."""
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=32, d_sae=24, k=4, hook_name=HOOK, model="tiny"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 24))
        sae.b_dec.zero_()
    site = str(tmp_path_factory.mktemp("site"))
    cfg = DashboardConfig(sae="in-memory", tokens=CTX * N_CTX - 5, ctx_len=CTX, batch_size=BATCH, top_k=6,
                          window=[5, 3], quantile_bins=4, quantile_examples=3, chunk_size=10, out=site)
    summary = build_dashboard_data(cfg, model=model, sae=sae)
    tokens = torch.stack(list(itertools.islice(iter_contexts("python-docs", model.tokenizer, CTX), N_CTX)))
    cache = model.run_with_cache(tokens, [HOOK, NEURONS]).cache
    with torch.no_grad():
        codes = sae.encode(cache[HOOK]).numpy().astype(np.float64)            # [ctx pos d_sae]
    return {"cfg": cfg, "summary": summary, "sae": sae, "tokens": tokens.numpy(), "codes": codes,
            "neurons": cache[NEURONS].numpy().astype(np.float64), "site": site,
            "latents": list(store.iter_latents(site)), "meta": store.load_meta(site),
            "index": store.load_index(site)}


def decode(model, ids) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


def test_frequency_mean_and_histogram(built):
    codes = built["codes"].reshape(-1, 24)
    meta, edges = built["meta"], np.array(built["meta"]["hist_edges"])
    assert meta["n_tokens"] == CTX * N_CTX == built["summary"]["n_tokens"] and meta["d_sae"] == 24
    assert len(edges) == 49 and np.allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]))
    for i, lat in enumerate(built["latents"]):
        fired = codes[:, i][codes[:, i] > 0]
        close(lat["freq"], len(fired) / len(codes))
        close(lat["mean_act"], fired.mean() if len(fired) else 0.0)
        close(lat["max_act"], fired.max() if len(fired) else 0.0)
        # the end bins are open: clamp into the edges' range, then count like np.histogram
        want, _ = np.histogram(np.clip(fired, edges[0], edges[-1] * (1 - 1e-9)), bins=edges)
        assert lat["hist"] == want.tolist(), i
    assert sum(lat["freq"] > 0.01 for lat in built["latents"]) > 12   # the test is not vacuous
    assert built["index"]["freq"] == [lat["freq"] for lat in built["latents"]]


def test_top_examples_values_positions_and_windows(built, model):
    codes, tokens, (before, after) = built["codes"], built["tokens"], built["cfg"].window
    n_cut = 0
    for i, lat in enumerate(built["latents"]):
        per_ctx = codes[:, :, i].max(1)
        want = np.sort(per_ctx[per_ctx > 0])[::-1][:6]
        ctxs = [ex["context"] for ex in lat["top"]]
        # the best contexts, best first, distinct (contexts that start alike tie: any of them may be chosen)
        assert len(set(ctxs)) == len(ctxs) == len(want), i
        close(per_ctx[ctxs], want)
        for ex, c in zip(lat["top"], ctxs):
            p = int(np.argmax(codes[c, :, i]))                              # the first position of the maximum
            lo, hi = max(0, p - before), min(CTX, p + after + 1)
            assert ex["position"] == p and ex["max_pos"] == p - lo
            close(ex["acts"], codes[c, lo:hi, i])                           # cut at the context's edges
            assert ex["tokens"] == decode(model, tokens[c, lo:hi])
            n_cut += hi - lo < before + after + 1
        if lat["top"]:
            assert built["index"]["top_token"][i] == lat["top"][0]["tokens"][lat["top"][0]["max_pos"]]
    assert n_cut > 10


def test_quantile_examples_lie_in_their_bins(built):
    codes, Q, n_examples = built["codes"], 4, 0
    for i, lat in enumerate(built["latents"]):
        assert len(lat["quantiles"]) == Q
        for j, qb in enumerate(lat["quantiles"]):
            close(qb["bin"], [lat["max_act"] * j / Q, lat["max_act"] * (j + 1) / Q])
            assert len(qb["examples"]) <= 3
            assert len({ex["context"] for ex in qb["examples"]}) == len(qb["examples"])
            lo, hi = qb["bin"]
            for ex in qb["examples"]:
                v = codes[ex["context"], ex["position"], i]
                assert lo * (1 - 1e-3) < v <= hi * (1 + 1e-3) and v > 0
                close(ex["acts"][ex["max_pos"]], v)
                n_examples += 1
            n_fired = ((codes[:, :, i] > lo) & (codes[:, :, i] <= hi)).any(1).sum()
            if lat["max_act"] and n_fired >= 3 and j == Q - 1:
                assert len(qb["examples"]) >= 1
    assert n_examples > 100


def test_latent_and_neuron_correlations_equal_corrcoef(built):
    codes = built["codes"].reshape(-1, 24)
    neurons = built["neurons"].reshape(-1, built["neurons"].shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        r_lat = np.corrcoef(codes.T)
        r_nrn = np.corrcoef(codes.T, neurons.T)[:24, 24:]
    for i, lat in enumerate(built["latents"]):
        row = np.delete(np.nan_to_num(r_lat[i], nan=-np.inf), i)
        ids = [j for j, _ in lat["corr_latents"]]
        assert len(ids) == 10 and i not in ids
        close([r for _, r in lat["corr_latents"]], r_lat[i, ids], atol=1e-4)
        close([r for _, r in lat["corr_latents"]], np.sort(row)[::-1][:10], atol=1e-4)
        ids = [j for j, _ in lat["corr_neurons"]]
        close([r for _, r in lat["corr_neurons"]], r_nrn[i, ids], atol=1e-4)
        close([r for _, r in lat["corr_neurons"]], np.sort(np.nan_to_num(r_nrn[i], nan=-np.inf))[::-1][:10],
              atol=1e-4)
    assert built["meta"]["neuron_hook"] == NEURONS and built["meta"]["corr_latents"] is True


def test_logit_effects_equal_the_dense_product(built, model):
    """gpt2's final LayerNorm: centre the decoder direction, scale by γ, then the (tied) unembedding."""
    hf = model.model
    gamma = hf.transformer.ln_f.weight.detach().double()
    W_U = hf.lm_head.weight.detach().double().T                                  # [d_model d_vocab]
    W_dec = built["sae"].W_dec.detach().double()
    eff = ((W_dec - W_dec.mean(1, keepdim=True)) * gamma) @ W_U                   # [d_sae d_vocab]
    edges = np.array(built["meta"]["logit_hist_edges"])
    assert len(edges) == 41 and np.allclose(edges, -edges[::-1])
    for i, lat in enumerate(built["latents"]):
        top = torch.topk(eff[i], 10)
        bot = torch.topk(eff[i], 10, largest=False)
        assert [t for t, _ in lat["logits"]["top"]] == decode(model, top.indices)
        close([v for _, v in lat["logits"]["top"]], top.values)
        assert [t for t, _ in lat["logits"]["bottom"]] == decode(model, bot.indices)
        close([v for _, v in lat["logits"]["bottom"]], bot.values)
        want, _ = np.histogram(eff[i].numpy(), bins=edges)   # one chunk of latents: the range covers every value
        got = np.array(lat["logits"]["hist"])
        # float32 against float64: a value within rounding of an edge may land on either side of it
        near = (np.abs(eff[i].numpy()[:, None] - edges[None]) < 1e-5 * edges[-1]).sum()
        assert got.sum() == want.sum() and np.abs(np.cumsum(got) - np.cumsum(want)).max() <= near
        assert built["index"]["top_logit"][i] == lat["logits"]["top"][0][0]


def test_chunk_layout_and_summary(built):
    meta, site = built["meta"], built["site"]
    assert meta["n_chunks"] == 3 and meta["chunk_size"] == 10 and meta["window"] == [5, 3]
    assert meta["quantile_bins"] == [[0.0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]]
    assert [x["id"] for x in store.load_chunk(site, 2)] == [20, 21, 22, 23]
    assert store.load_latent(site, 13) == built["latents"][13]
    s = built["summary"]
    assert s["n_contexts"] == N_CTX and s["hook"] == HOOK and s["total_s"] >= s["forward_s"] > 0


def test_planted_latent_fires_exactly_on_its_token(model, tmp_path):
    """hook_embed reads W_E[token]; latent 3's encoder is that token's unit embedding direction, with a bias
    that leaves it silent on every other token of the vocabulary: its firings are exactly that token's."""
    tokens = torch.stack(list(itertools.islice(iter_contexts("python-docs", model.tokenizer, CTX), 20)))
    W_E = model.model.transformer.wte.weight.detach()
    ids, counts = torch.unique(tokens, return_counts=True)
    best = None
    for t in ids[counts >= 5]:                      # a frequent token that stands out along its own direction
        u = W_E[t] / W_E[t].norm()
        proj = W_E @ u
        margin = proj[t] - torch.cat([proj[:t], proj[t + 1:]]).max()
        if margin > 0 and (best is None or margin > best[1]):
            best = (int(t), float(margin), u, float(torch.cat([proj[:t], proj[t + 1:]]).max()))
    assert best is not None
    tok, margin, u, runner_up = best
    sae = make_sae(SAEConfig(arch="relu", d_in=32, d_sae=8, hook_name="hook_embed"))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 3] = u
        sae.b_enc[3] = -(runner_up + margin / 2)
    cfg = DashboardConfig(sae="planted", tokens=20 * CTX, ctx_len=CTX, batch_size=7, top_k=5, out=str(tmp_path))
    build_dashboard_data(cfg, model=model, sae=sae)
    lat = store.load_latent(str(tmp_path), 3)
    text = model.tokenizer.decode([tok])
    close(lat["freq"], float((tokens == tok).float().mean()))
    assert len(lat["top"]) == 5 and all(ex["tokens"][ex["max_pos"]] == text for ex in lat["top"])
    assert store.load_index(str(tmp_path))["top_token"][3] == text
    assert store.load_meta(str(tmp_path))["neuron_hook"] is None and lat["corr_neurons"] == []


def test_large_dictionaries_skip_latent_correlations(model, tmp_path, monkeypatch):
    monkeypatch.setattr("interplab.dashboard.data.MAX_CORRELATED_LATENTS", 7)
    sae = make_sae(SAEConfig(arch="topk", d_in=32, d_sae=8, k=2, hook_name=HOOK))
    build_dashboard_data(DashboardConfig(sae="x", tokens=64, ctx_len=CTX, out=str(tmp_path)), model=model, sae=sae)
    assert store.load_meta(str(tmp_path))["corr_latents"] is False
    latents = list(store.iter_latents(str(tmp_path)))
    assert all(lat["corr_latents"] == [] for lat in latents)
    assert any(lat["corr_neurons"] for lat in latents)


@pytest.mark.parametrize("change, message", [
    (dict(sae=""), "--sae is required"),
    (dict(tokens=0), "--tokens must be an integer >= 1"),
    (dict(window=[3]), "--window must be two integers"),
    (dict(window=[3, -1]), "--window must be two integers"),
    (dict(split="dev"), "--split 'dev' is not valid"),
    (dict(ctx_len=1), "--ctx-len must be an integer >= 2"),
])
def test_config_errors(change, message):
    with pytest.raises(InterplabError, match=message):
        DashboardConfig(**{"sae": "x", **change}).validate()


def test_model_and_hook_mismatches_are_refused(model, tmp_path):
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=8, k=2, hook_name=HOOK))
    with pytest.raises(InterplabError, match="SAE d_in 16 does not match the width 32 of blocks.1.hook_resid_post"):
        build_dashboard_data(DashboardConfig(sae="x", out=str(tmp_path)), model=model, sae=sae)
    sae = make_sae(SAEConfig(arch="topk", d_in=32, d_sae=8, k=2))
    with pytest.raises(InterplabError, match="names no hook"):
        build_dashboard_data(DashboardConfig(sae="x", out=str(tmp_path)), model=model, sae=sae)
    with pytest.raises(InterplabError, match="unknown hook name"):
        build_dashboard_data(DashboardConfig(sae="x", hook="blocks.9.hook_resid_post", out=str(tmp_path)),
                             model=model, sae=sae)
    with pytest.raises(InterplabError, match="exceeds the model's context length 64"):
        build_dashboard_data(DashboardConfig(sae="x", hook=HOOK, ctx_len=65, out=str(tmp_path)), model=model,
                             sae=sae)


def test_round_sig():
    got = round_sig([0.123456, 12345.6, -0.00098766, 0.0, np.nan, 1e-30])
    assert got[:4].tolist() == [0.1235, 12350.0, -0.0009877, 0.0] and np.isnan(got[4]) and got[5] == 1e-30
    assert repr(float(round_sig(0.1234)[()])) == "0.1234"


@pytest.mark.slow
def test_smollm2_logit_effects_through_rmsnorm_and_readable_tokens(tmp_path):
    """SmolLM2 (RMSNorm, tied embeddings): logit effects are W_dec (γ ⊙ W_U) with no centring; token texts keep
    their leading spaces and a window's texts join to the decoded text of its tokens."""
    model = load_model("smollm2-135m")
    hook = "blocks.2.hook_resid_post"
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=576, d_sae=64, k=8, hook_name=hook, model="smollm2-135m"))
    cfg = DashboardConfig(sae="x", tokens=1024, ctx_len=64, batch_size=8, out=str(tmp_path))
    build_dashboard_data(cfg, model=model, sae=sae)
    hf = model.model
    gamma = hf.model.norm.weight.detach().double()
    eff = (sae.W_dec.detach().double() * gamma) @ hf.lm_head.weight.detach().double().T
    tokens = torch.stack(list(itertools.islice(iter_contexts("python-docs", model.tokenizer, 64), 16)))
    n_space = 0
    for i, lat in enumerate(store.iter_latents(str(tmp_path))):
        top = torch.topk(eff[i], 10)
        assert [t for t, _ in lat["logits"]["top"]] == decode(model, top.indices)
        close([v for _, v in lat["logits"]["top"]], top.values)
        for ex in lat["top"][:3]:
            lo = ex["position"] - ex["max_pos"]
            ids = tokens[ex["context"], lo:lo + len(ex["tokens"])]
            assert "".join(ex["tokens"]) == model.tokenizer.decode(ids)
            n_space += sum(t.startswith(" ") and len(t) > 1 for t in ex["tokens"])
    assert n_space > 20
