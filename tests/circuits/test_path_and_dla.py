"""Path patching and direct logit attribution against hand computations on small toys."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.dla import direct_logit_attribution
from interplab.circuits.metrics import MetricTargets, make_metric
from interplab.circuits.path import path_patch
from interplab.circuits.patching import Runs
from interplab.errors import InterplabError
from interplab.models.toy import ToyConfig, ToyTransformer

N, POS, VOCAB = 4, 6, 19


def _toy(**kw) -> ToyTransformer:
    base = dict(n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=None, n_ctx=16, d_vocab=VOCAB, seed=5,
                init_std=0.3)
    return ToyTransformer(ToyConfig(**{**base, **kw}))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, VOCAB, (N, POS), generator=g)
    source = torch.randint(0, VOCAB, (N, POS), generator=g)
    answer, wrong = torch.randint(0, VOCAB, (N,), generator=g), torch.randint(0, VOCAB, (N,), generator=g)
    return Runs(target, source), answer, wrong


def _metric(model, runs, answer, wrong):
    with torch.no_grad():
        clean = model.forward(runs.source)[:, -1]
    return make_metric("logit-diff", MetricTargets(answer, wrong, clean))


def _head_delta(model, runs, layer, head) -> torch.Tensor:
    """Δresult of one head: its source output minus its target output, [n, pos, d_model]."""
    name = f"blocks.{layer}.attn.hook_result"
    src = model.run_with_cache(runs.source, [name]).cache[name][:, :, head]
    tgt = model.run_with_cache(runs.target, [name]).cache[name][:, :, head]
    return src - tgt


@pytest.mark.parametrize("layer_norm", [False, True])
def test_path_to_the_logits_is_the_sender_s_direct_effect(layer_norm):
    """With no receivers, a sender's path reaches the logits only directly: the final residual of the target plus
    the sender's Δresult, through the (recomputed) final norm."""
    model = _toy(layer_norm=layer_norm)
    runs, answer, wrong = _data()
    metric = _metric(model, runs, answer, wrong)
    got = path_patch(model, runs, [], metric, batch_size=3)
    last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    for layer in range(2):
        for head in range(3):
            delta = _head_delta(model, runs, layer, head)
            with torch.no_grad():
                expected = metric(model.run_with_hooks(runs.target, [(last, lambda a, n: a + delta)]))
            torch.testing.assert_close(got[:, layer, head], expected, atol=1e-5, rtol=1e-5)


def test_path_to_a_receiver_query_uses_only_that_path():
    """Sender L0Hs → receiver L1Hr:q in an attention-only 2-layer toy: only head r's query at layer 1 sees
    resid_pre + Δresult; everything else keeps the target run's values."""
    model = _toy(layer_norm=True)
    runs, answer, wrong = _data(1)
    metric = _metric(model, runs, answer, wrong)
    got = path_patch(model, runs, [(1, 2, "q")], metric)
    assert torch.isnan(got[:, 1]).all()  # layer-1 senders cannot reach a layer-1 receiver
    for sender in range(3):
        delta = _head_delta(model, runs, 0, sender)
        q_name = "blocks.1.attn.hook_q"
        moved = model.run_with_cache(runs.target, [q_name],
                                     hooks=[("blocks.1.hook_resid_pre", lambda a, n: a + delta)]).cache[q_name]

        def receiver(act, name):
            act = act.clone()
            act[:, :, 2] = moved[:, :, 2]
            return act

        with torch.no_grad():
            expected = metric(model.run_with_hooks(runs.target, [(q_name, receiver)]))
        torch.testing.assert_close(got[:, 0, sender], expected, atol=1e-5, rtol=1e-5)


def test_path_patching_refuses_receivers_out_of_range():
    model = _toy()
    runs, answer, wrong = _data()
    with pytest.raises(InterplabError, match="out of range"):
        path_patch(model, runs, [(2, 0, "q")], _metric(model, runs, answer, wrong))
    with pytest.raises(InterplabError, match="out of range"):
        path_patch(model, runs, [(1, 3, "k")], _metric(model, runs, answer, wrong))


def test_dla_of_a_linear_toy_is_each_part_through_the_unembedding():
    """Without LayerNorm the logit difference is linear in the residual: head h's part is result_h · (W_U[:, a] −
    W_U[:, w]) exactly, computed here from the weights."""
    model = _toy(layer_norm=False)
    runs, answer, wrong = _data()
    dla = direct_logit_attribution(model, runs.target, answer, wrong)
    direction = (model.W_U[:, answer] - model.W_U[:, wrong]).T  # [n, d_model]
    for layer in range(2):
        name = f"blocks.{layer}.attn.hook_result"
        result = model.run_with_cache(runs.target, [name]).cache[name][:, -1]  # [n, head, d_model]
        expected = torch.einsum("nhd,nd->nh", result, direction)
        torch.testing.assert_close(dla.head_parts[:, layer], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_dla_parts_sum_to_the_logit_difference(layer_norm):
    model = _toy(layer_norm=layer_norm, d_mlp=32)
    runs, answer, wrong = _data(2)
    dla = direct_logit_attribution(model, runs.target, answer, wrong)
    total = dla.parts.sum(1) + dla.constant
    torch.testing.assert_close(total, dla.logit_diff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dla.accumulated[:, -1], dla.logit_diff, atol=1e-4, rtol=1e-4)
    assert dla.labels[:2] == ["embed", "pos_embed"] and "L1 mlp" in dla.labels
