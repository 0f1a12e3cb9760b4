"""The `synth` command configs: standard library only, with pure-Python checks."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from interplab.config import DEFAULT_MODEL
from interplab.errors import InterplabError
from interplab.models.configs import HooksConfig
from interplab.synth.configs import PlantedConfig, SynthBenchConfig, SynthScoreConfig, TMSRunConfig


def test_configs_import_no_heavy_library():
    code = ("import sys, interplab.synth.configs, interplab.models.configs; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_validate_refuses_bad_settings():
    with pytest.raises(InterplabError, match="n_samples"):
        PlantedConfig(n_samples=1).validate()
    with pytest.raises(InterplabError, match="unembed_std"):
        PlantedConfig(unembed_std=float("nan")).validate()
    with pytest.raises(InterplabError, match="unknown --archs"):
        SynthBenchConfig(archs=["relu", "nope"]).validate()
    with pytest.raises(InterplabError, match="--sae needs"):
        SynthScoreConfig().validate()
    with pytest.raises(InterplabError, match="--parts"):
        TMSRunConfig(parts=["pictures", "movies"]).validate()
    with pytest.raises(InterplabError, match="--sweep-instances"):
        TMSRunConfig(sweep_instances=1).validate()
    for ok in (PlantedConfig(), SynthBenchConfig(), SynthScoreConfig(sae=["x"]), TMSRunConfig()):
        ok.validate()


def test_quick_bench_shrinks_and_hooks_default_model():
    quick = SynthBenchConfig(quick=True, k=[5, 10], tokens=10**6).resolved()
    assert quick.k == [5] and quick.tokens == 20_000 and not quick.quick
    assert HooksConfig().model == DEFAULT_MODEL == "smollm2-135m"
    assert [f.name for f in fields(HooksConfig)] == ["model"]
