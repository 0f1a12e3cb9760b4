"""The known answer: SPD on TMS 5-2 recovers the columns of W (Bushnaq et al. 2025, Table 1: MMCS 1.000, ML2R 0.993)
with one live subcomponent per feature, and the random rank-1 basis does not.

The seed (2) and the settings (the `tms-5-2` preset, the benchmark's) were fixed before this test was first run;
seeds 0 and 1 are the benchmark's other seeds. The thresholds are the issue's targets."""

from __future__ import annotations

import pytest
import torch

from interplab.decompose.configs import DecomposeConfig
from interplab.decompose.evaluate import score
from interplab.decompose.presets import resolve
from interplab.decompose.run import decompose
from interplab.decompose.toys import TOYS
from interplab.decompose.truth import ToyRequest

SEED = 2


@pytest.mark.slow
def test_spd_recovers_tms_5_2_columns():
    torch.set_num_threads(1)
    cfg = DecomposeConfig(toy="tms-5-2", seed=SEED, progress=False)
    truth = TOYS["tms-5-2"](ToyRequest(SEED, None, "cpu", False))
    decomposition = decompose(truth, cfg, resolve(cfg, "tms-5-2"), checkpoint=None, desc="known answer")
    scores = score(decomposition, truth, eval_batch=4096, seed=SEED)["layers"]
    first = scores["linear1"]
    assert first["mmcs"] >= 0.999 and abs(first["ml2r"] - 1) <= 0.03, (first["mmcs"], first["ml2r"])
    assert first["random_basis_mmcs"] < 0.999
    assert first["live"] == 5 and scores["linear2"]["live"] == 5
    # Each feature's one-hot input switches on exactly one linear1 subcomponent, a different one per feature.
    on = torch.tensor(first["ci_one_hot"]) > 0.5
    assert bool((on.sum(1) == 1).all()) and len(set(on.float().argmax(1).tolist())) == 5
