"""Top activating contexts of graph features: a hand-built feature on a toy whose MLP inputs are known in closed
form (fires exactly on one token id, with an activation computed from the weights by hand), the same through a
cross-layer transcoder and in any batching; then `run_graph` end to end (graph.json's feature nodes against a brute
force over the model's own neurons), off with --examples-contexts 0, and bad values refused with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from graph_toys import clt_from_set, exact_set, toy, transcoder
from interplab.cli import main
from interplab.data import iter_contexts
from interplab.graphs.configs import GraphConfig
from interplab.graphs.run_graph import run_graph
from interplab.graphs.top_examples import top_examples
from interplab.models import ByteTokenizer, ToyConfig, ToyTransformer

A, B = 2, 5  # the planted tokens
D, D_SAE, V, N_CTX = 10, 6, 8, 8
FA, FB, DEAD = 3, 1, 4  # feature 3 of layer 0 reads e_A, feature 1 of layer 1 reads e_B, feature 4 never fires
BIAS = -0.5


def closed_form_model() -> ToyTransformer:
    """No norms, attention writing nothing and layer 0's MLP writing nothing: both layers' MLP input at position p of
    token t is exactly W_E[t] + W_pos[p]. W_E[A, A] = W_E[B, B] = 2; every other entry is small (|x| < 0.15)."""
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=D, n_heads=2, d_head=4, d_mlp=6, n_ctx=N_CTX, d_vocab=V,
                                     act_fn="relu", layer_norm=False, init_std=0.05, seed=5)).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_O.zero_()
            block.attn.b_O.zero_()
        model.blocks[0].mlp.W_out.zero_()
        model.blocks[0].mlp.b_out.zero_()
        model.W_E.clamp_(-0.05, 0.05)
        model.W_pos.clamp_(-0.1, 0.1)
        model.W_E[A, A] = model.W_E[B, B] = 2.0
    return model.eval()


def planted_set(model: ToyTransformer) -> dict:
    """Random features beside the planted ones (so the right columns must be gathered)."""
    gen = torch.Generator().manual_seed(0)
    sets = {}
    for layer, (f, direction) in enumerate([(FA, A), (FB, B)]):
        W_enc = torch.randn(D, D_SAE, generator=gen, dtype=torch.float64) * 0.3
        b_enc = torch.full((D_SAE,), -1.0, dtype=torch.float64)
        W_enc[:, f] = torch.eye(D, dtype=torch.float64)[direction]
        b_enc[f] = BIAS
        b_enc[DEAD] = -100.0
        sets[layer] = transcoder(layer, W_enc, b_enc, torch.zeros(D_SAE, D, dtype=torch.float64),
                                 torch.zeros(D, dtype=torch.float64))
    return sets


def contexts() -> list[torch.Tensor]:
    """12 contexts of 8 tokens without A or B, then A or B put at chosen places (context 9 has A at position 0 only)."""
    gen = torch.Generator().manual_seed(1)
    others = torch.tensor([t for t in range(V) if t not in (A, B)])
    ctxs = [others[torch.randint(0, len(others), (N_CTX,), generator=gen)] for _ in range(12)]
    for c, p in [(1, 3), (4, 6), (4, 2), (7, 5), (9, 0), (11, 1)]:
        ctxs[c][p] = A
    for c, p in [(2, 4), (7, 7)]:
        ctxs[c][p] = B
    return ctxs


def hand_act(model: ToyTransformer, tok: int, pos: int, direction: int) -> float:
    """relu((W_E[tok] + W_pos[pos]) · e_direction + b): the planted feature's activation, from the weights."""
    return max(0.0, (model.W_E[tok, direction] + model.W_pos[pos, direction]).item() + BIAS)


def expected(model, ctxs, token: int, skip: int | None = None) -> list[tuple[float, int, int]]:
    """(max, context, argmax position) of each context holding `token`, largest first: by hand."""
    rows = []
    for c, ctx in enumerate(ctxs):
        vals = [(hand_act(model, t, p, token), p) for p, t in enumerate(ctx.tolist()) if t == token and t != skip]
        if vals:
            value, pos = max(vals, key=lambda v: (v[0], -v[1]))
            rows.append((value, c, pos))
    return sorted(rows, key=lambda r: (-r[0], r[1]))


def test_a_planted_feature_has_the_contexts_of_its_token_with_hand_activations():
    model, ctxs = closed_form_model(), contexts()
    tcs = planted_set(model)
    found = top_examples(model, tcs, [(0, FA), (1, FB), (0, DEAD)], ctxs, n_contexts=12, k=6, window=2,
                         batch_size=5, progress=False)
    assert found.n_contexts == 12 and found.examples[(0, DEAD)] == []
    a_rows = expected(model, ctxs, A)
    assert [c for _, c, _ in a_rows] != [1, 4, 7, 9, 11] and sorted(c for _, c, _ in a_rows) == [1, 4, 7, 9, 11]
    for token, key, rows in [(A, (0, FA), a_rows), (B, (1, FB), expected(model, ctxs, B))]:
        got = found.examples[key]
        assert [(e.context, e.pos) for e in got] == [(c, p) for _, c, p in rows]  # only contexts holding the token
        for e, (value, c, p) in zip(got, rows):
            assert e.max == pytest.approx(value, abs=1e-12)
            lo = max(0, p - 2)
            ids = ctxs[c][lo: p + 3].tolist()
            assert e.tokens == [f"#{t}" for t in ids] and e.tokens[p - lo] == f"#{token}"
            assert e.acts == pytest.approx([hand_act(model, t, lo + i, token) for i, t in enumerate(ids)], abs=1e-12)
    # k caps the list; one at a time or through a cross-layer transcoder, the same answer
    top3 = top_examples(model, tcs, [(0, FA)], ctxs, n_contexts=12, k=3, window=2, batch_size=1, progress=False)
    assert top3.examples[(0, FA)] == found.examples[(0, FA)][:3]
    clt = top_examples(model, clt_from_set(tcs, activation="relu"), [(0, FA), (1, FB)], ctxs, n_contexts=12, k=6,
                       window=2, batch_size=12, progress=False)
    assert clt.examples[(0, FA)] == found.examples[(0, FA)] and clt.examples[(1, FB)] == found.examples[(1, FB)]


def test_skipped_token_positions_and_the_context_budget():
    model, ctxs = closed_form_model(), contexts()
    tcs = planted_set(model)
    skipped = top_examples(model, tcs, [(0, FA)], ctxs, n_contexts=12, k=6, skip_token=A, progress=False)
    assert skipped.examples[(0, FA)] == []  # every place it fires holds the skipped token
    first8 = top_examples(model, tcs, [(0, FA)], ctxs, n_contexts=8, k=6, progress=False)
    assert first8.n_contexts == 8
    assert [e.context for e in first8.examples[(0, FA)]] == [c for _, c, _ in expected(model, ctxs[:8], A)]


# ---------------------------------------------------------------- run_graph end to end

TEXT = ("The cat sat on the mat. A dog ran in the park; the cat saw the dog. " * 30)


@pytest.fixture
def byte_toy():
    model = toy(d_vocab=ByteTokenizer.vocab_size)
    model.tokenizer = ByteTokenizer()
    return model


def _cfg(tmp_path, name: str, **kw) -> GraphConfig:
    (tmp_path / "corpus.txt").write_text(TEXT)
    return GraphConfig(model="toy", transcoders="x", prompt="the cat", out=str(tmp_path / name), device="cpu",
                       corpus=str(tmp_path / "corpus.txt"), ctx_len=16, **kw)


def test_run_graph_writes_top_examples_found_by_brute_force(byte_toy, tmp_path):
    cfg = _cfg(tmp_path, "run", examples_contexts=20, examples_k=3, examples_window=3)
    metrics = run_graph(cfg, model=byte_toy, transcoders=exact_set(byte_toy))
    graph = json.loads((tmp_path / "run" / "graph.json").read_text())
    feats = [n for n in graph["nodes"] if n["type"] == "feature"]
    assert feats and all("top_examples" in n for n in feats)
    assert metrics["top_examples"]["contexts"] == 20 and metrics["top_examples"]["nodes"] == len(feats)
    # brute force: an exact transcoder's features are the MLP's neurons, read straight from the model
    ctxs = torch.stack(list(iter_contexts(str(tmp_path / "corpus.txt"), byte_toy.tokenizer, 16)))[:20]
    checked = 0
    for node in feats:
        l, f = node["layer"], node["feature"]
        post = byte_toy.run_with_cache(ctxs, [f"blocks.{l}.mlp.hook_post"]).cache[f"blocks.{l}.mlp.hook_post"][..., f]
        peaks, where = post.masked_fill(ctxs == ByteTokenizer.bos_token_id, float("-inf")).max(dim=1)
        want = sorted(((float(v), c) for c, v in enumerate(peaks) if v > 0), key=lambda r: (-r[0], r[1]))[:3]
        got = node["top_examples"]
        assert [e["max"] for e in got] == pytest.approx([v for v, _ in want], abs=1e-9)
        for e, (_, c) in zip(got, want):
            t = int(where[c])
            ids = ctxs[c, max(0, t - 3): t + 4].tolist()
            assert e["tokens"] == [byte_toy.tokenizer.decode([i]) for i in ids]
            assert e["acts"] == pytest.approx(post[c, max(0, t - 3): t + 4].tolist(), abs=1e-9)
        checked += bool(got)
    assert checked > 0


def test_examples_off_and_bad_values(byte_toy, tmp_path, capsys):
    run_graph(_cfg(tmp_path, "off", examples_contexts=0), model=byte_toy, transcoders=exact_set(byte_toy))
    graph = json.loads((tmp_path / "off" / "graph.json").read_text())
    assert not any("top_examples" in n for n in graph["nodes"])
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["top_examples"] == {
        "skipped": "--examples-contexts 0"}
    for flag, value in [("--examples-contexts", "-1"), ("--examples-k", "0"), ("--ctx-len", "1")]:
        code = main(["graph", "--model", "toy", "--transcoders", "x", "--prompt", "1 2", "--out",
                     str(tmp_path / "bad"), flag, value])
        err = capsys.readouterr().err.strip()
        assert code == 2 and flag in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
