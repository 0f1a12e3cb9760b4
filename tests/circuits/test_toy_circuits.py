"""Head patching on toys with known circuits: on the induction toy the effect sits on the heads the detectors
find; on the OV-coherent toy, ablating a head by head patching (a zero source at `attn.hook_z`) reproduces the
per-group ablation read-out of `toy inspect`."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.detectors import detect_heads
from interplab.circuits.metrics import Baseline, MetricTargets, make_metric, normalise
from interplab.circuits.nodes import sweep_grids
from interplab.circuits.patching import Runs, activation_patch, direction_runs
from interplab.toy.configs import ToyTrainConfig
from interplab.toy.induction import BOS, InductionToyConfig, train_induction_toy
from interplab.toy.readouts import _accuracy_row, ablate_heads, readouts
from interplab.toy.toy_run import load_run
from interplab.toy.train import run_toy_train

CFG = InductionToyConfig()


@pytest.fixture(scope="module")
def induction_toy():
    return train_induction_toy(CFG)


def repeat_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """clean [BOS, R, R], corrupted [BOS, R', R] (first copy replaced), the answer r_1 (what induction predicts
    after the final r_L) and a fixed other token."""
    gen = torch.Generator().manual_seed(seed)
    R, R2 = (torch.randint(1, CFG.d_vocab, (n, CFG.max_len), generator=gen) for _ in range(2))
    bos = torch.full((n, 1), BOS)
    answer = R[:, 0]
    return torch.cat([bos, R, R], 1), torch.cat([bos, R2, R], 1), answer, answer % (CFG.d_vocab - 1) + 1


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_head_patching_puts_the_effect_on_the_detected_heads(induction_toy, direction):
    model = induction_toy
    found = detect_heads(model, n_seqs=32, seq_len=CFG.max_len, batch_size=32)
    detected = torch.zeros(2, CFG.n_heads, dtype=torch.bool)
    detected[0] = found.previous_token.score[0] > 0.5
    detected[1] = found.induction.score[1] > 0.5
    clean, corrupted, answer, wrong = repeat_pairs(32, seed=5)
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    metric = make_metric("logit-diff", MetricTargets(answer, wrong, clean_logits[:, -1]))
    baseline = Baseline(metric(clean_logits), metric(corrupted_logits))
    raw = activation_patch(model, direction_runs(direction, clean, corrupted),
                           sweep_grids(model.info, "heads", clean.shape[1]), metric)["head_out"]
    effect = normalise(raw, baseline).mean(0)  # [layer, head]; denoise: 1 = restored
    effect = effect if direction == "denoise" else 1 - effect  # noise: 1 = destroyed
    share = float(effect.abs()[detected].sum() / effect.abs().sum())
    assert share > 0.9, (effect, detected)
    assert float(effect.abs()[~detected].max()) < 0.05
    # the single largest layer-0 effect is on the best previous-token head
    assert int(effect[0].argmax()) == int(found.previous_token.score[0].argmax())


def test_head_ablation_through_hook_z_matches_the_toy_inspect_readout(tmp_path):
    run_toy_train(ToyTrainConfig(task="ov-coherent", steps=400, out=str(tmp_path / "ov"), progress=False))
    toy = load_run(tmp_path / "ov")
    task, model = toy.task, toy.model
    batch = task.sample(1000, torch.Generator().manual_seed(0))
    ro, names = readouts(task, batch), task.token_names()
    with torch.no_grad():
        full = _accuracy_row(model(batch.tokens), ro, names)
    assert full["accuracy"] > 0.95
    readout = [_accuracy_row(logits, ro, names, full) for logits in ablate_heads(model, batch.tokens, "zero")]
    # the same ablation as head patching: activation_patch with a zero source, per pair "the answer is the argmax"
    grid = sweep_grids(model.info, "heads", batch.tokens.shape[1])[0]
    zeros = {"blocks.0.attn.hook_z": torch.zeros(1, 1, model.cfg.n_heads, model.cfg.d_head)}
    correct = activation_patch(model, Runs(batch.tokens, batch.tokens), [grid], _Correct(batch.targets),
                               batch_size=400, source_acts=zeros)["head_out"]  # [n, layer, head]
    for head in range(model.cfg.n_heads):
        per_group = _group_accuracy(correct[:, 0, head], ro, names)
        assert per_group == pytest.approx(readout[head]["per_group"], abs=1e-6)
    for head in range(model.cfg.n_heads):
        def zero_head(z: torch.Tensor, _name: str, head: int = head) -> torch.Tensor:
            z = z.clone()
            z[:, :, head] = 0
            return z

        with torch.no_grad():
            logits = model.run_with_hooks(batch.tokens, [("blocks.0.attn.hook_z", zero_head)])
        ours = _accuracy_row(logits, ro, names, full)
        assert ours["per_group"] == pytest.approx(readout[head]["per_group"], abs=1e-6)
        assert ours["broken"] == readout[head]["broken"] and ours["broken"]  # each head matters for some pairs
    assert readout[0]["broken"] != readout[1]["broken"]  # and the two heads for different ones


class _Correct:
    """A patching metric per example: 1 when the last position's argmax is the exact answer (the read-out's
    accuracy), with `rows` as `PairMetric` has."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def rows(self, rows: slice) -> "_Correct":
        return _Correct(self.targets[rows])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1].argmax(-1) == self.targets[:, -1]).float()


def _group_accuracy(correct: torch.Tensor, ro, names) -> list[float | None]:
    """Per-group mean of the per-example correctness, grouped as the read-out groups its read-offs."""
    hits = torch.zeros(len(ro.groups)).index_add_(0, ro.group, correct[ro.example])
    counts = torch.zeros(len(ro.groups)).index_add_(0, ro.group, torch.ones(len(ro.group)))
    return [None if c == 0 else float(h / c) for h, c in zip(hits, counts)]
