"""The induction toy (known answer): trained on repeated random tokens it predicts the repeats, and the head
detectors find the textbook circuit — a previous-token head in layer 0, an induction head in layer 1 — well above
both controls."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.detectors import detect_heads, top_heads
from interplab.errors import InterplabError
from interplab.toy.induction import InductionToyConfig, repeat_accuracy, sample_repeats, train_induction_toy

CFG = InductionToyConfig()


@pytest.fixture(scope="module")
def toy():
    return train_induction_toy(CFG)


def test_sequences_repeat_and_the_mask_counts_only_predictable_tokens():
    batch = sample_repeats(CFG, 64, torch.Generator().manual_seed(0))
    tokens, mask = batch.tokens, batch.mask
    assert bool((tokens[:, 0] == 0).all()) and bool((tokens[:, 1:] > 0).all())
    for row, m in zip(tokens, mask):
        positions = m.nonzero().squeeze(1)
        first = int(positions[0])  # the second copy's first position: r_1 again
        # every counted prediction's target is the token one period earlier: some L in min_len … max_len fits all
        periods = [length for length in range(CFG.min_len, CFG.max_len + 1)
                   if all(row[p + 1] == row[p + 1 - length] for p in positions.tolist())
                   and row[first] == row[first - length]]
        assert periods, row
        assert int(positions[-1]) == CFG.n_ctx - 2  # to the end of the context
    fixed = sample_repeats(CFG, 4, torch.Generator().manual_seed(1), length=5, start=1)
    assert torch.equal(fixed.tokens[:, 1:6], fixed.tokens[:, 6:11])
    assert fixed.mask[0].nonzero().squeeze(1).tolist() == list(range(6, CFG.n_ctx - 1))


def test_the_trained_toy_predicts_the_repeats(toy):
    assert repeat_accuracy(toy, CFG, 512, seed=123) > 0.9
    # [BOS, R, R] (what the detectors read): the repeats of a fixed |R| with no prefix
    assert repeat_accuracy(toy, CFG, 512, seed=124, length=CFG.max_len, start=1) > 0.9


def test_detectors_find_previous_token_then_induction_heads(toy):
    found = detect_heads(toy, n_seqs=32, seq_len=CFG.max_len, batch_size=32, seed=0)
    (prev_layer, prev_head), = top_heads(found.previous_token, 1)
    (ind_layer, ind_head), = top_heads(found.induction, 1)
    assert (prev_layer, ind_layer) == (0, 1)
    for scores, (layer, head) in ((found.previous_token, (prev_layer, prev_head)),
                                  (found.induction, (ind_layer, ind_head))):
        score = float(scores.score[layer, head])
        assert score > 0.5
        assert score > 5 * float(scores.shuffled[layer, head]) and score > 5 * float(scores.random_weights[layer, head])
        assert score - 5 * float(scores.sem[layer, head]) > float(scores.random_weights[layer, head])
    # the induction head copies what it attends to: its full OV circuit has a positive spectrum
    assert float(found.copying.score[ind_layer, ind_head]) > 0.5


def test_bad_config_is_refused():
    with pytest.raises(InterplabError, match="max_len"):
        train_induction_toy(InductionToyConfig(min_len=8, max_len=4))
