"""SPD and APD resume from their last checkpoint bit for bit, and refuse a changed target."""

from __future__ import annotations

import pytest
import torch

from interplab.decompose.apd import run_apd
from interplab.decompose.presets import Settings
from interplab.decompose.spd import run_spd
from interplab.decompose.tms_models import tms_factory
from interplab.decompose.truth import ToyRequest
from interplab.errors import InterplabError

SETTINGS = Settings(C=6, steps=30, lr=3e-3, batch_size=32, importance_coeff=3e-3, p=1.0, simplicity_coeff=0.7,
                    top_k=0.3)


def _truth():
    return tms_factory(5, 2, identity=False, steps=30, batch_size=64)(ToyRequest(0, None, "cpu", False))


class Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["spd", "apd"])
def test_interrupted_run_resumes_bit_for_bit(method, tmp_path):
    run = run_spd if method == "spd" else run_apd
    kwargs = {"warmup_steps": 5} if method == "spd" else {}
    whole = run(_truth(), SETTINGS, seed=3, checkpoint=tmp_path / "whole.pt", checkpoint_every=10, progress=False,
                **kwargs)

    truth = _truth()
    sample, calls = truth.sample, []

    def failing_sample(batch, gen):
        calls.append(batch)
        if len(calls) == 26:  # the 25th training batch (the first call checks the forward): after checkpoint 20
            raise Stop
        return sample(batch, gen)

    truth.sample = failing_sample
    with pytest.raises(Stop):
        run(truth, SETTINGS, seed=3, checkpoint=tmp_path / "cut.pt", checkpoint_every=10, progress=False, **kwargs)
    resumed = run(_truth(), SETTINGS, seed=3, checkpoint=tmp_path / "cut.pt", checkpoint_every=10, progress=False,
                  **kwargs)
    assert resumed.resumed_from == 20
    for a, b in zip(whole.components.parameters(), resumed.components.parameters()):
        assert torch.equal(a, b)
    assert whole.history == resumed.history


def test_resume_onto_changed_target_is_refused(tmp_path):
    run_spd(_truth(), SETTINGS._replace(steps=10), seed=0, checkpoint=tmp_path / "c.pt", checkpoint_every=5,
            progress=False, warmup_steps=0)
    changed = _truth()
    with torch.no_grad():
        changed.model.linear2.bias.add_(0.1)
    with pytest.raises(InterplabError, match="changed model"):
        run_spd(changed, SETTINGS._replace(steps=20), seed=0, checkpoint=tmp_path / "c.pt", progress=False,
                warmup_steps=0)


def test_non_finite_loss_is_one_error_and_no_checkpoint(tmp_path):
    truth = _truth()
    sample = truth.sample
    truth.sample = lambda batch, gen: sample(batch, gen) * float("inf")
    with pytest.raises(InterplabError, match="non-finite"):
        run_spd(truth, SETTINGS, seed=0, checkpoint=tmp_path / "c.pt", progress=False, warmup_steps=0)
    assert not (tmp_path / "c.pt").exists()
