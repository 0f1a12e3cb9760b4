"""Generator specs, and SAE training in synthetic mode recovering planted features."""

from __future__ import annotations

import pytest

from interplab.cli import main
from interplab.errors import InterplabError
from interplab.sae import load_sae
from interplab.synth import AnimalsConfig, SparseFeaturesConfig, score_dictionary
from interplab.synth.specs import generator_config, make_generator


def test_specs_parse_to_typed_configs():
    assert generator_config("sparse") == SparseFeaturesConfig()
    cfg = generator_config("sparse:mean_active=10,correlated=true,n_features=64,noise-std=0.5")
    assert cfg == SparseFeaturesConfig(mean_active=10.0, correlated=True, n_features=64, noise_std=0.5)
    assert generator_config("animals:n_animals=500") == AnimalsConfig(n_animals=500)
    gen = make_generator("sparse:n_features=40,d=8")
    assert gen.features.shape == (40, 8)


@pytest.mark.parametrize("spec, message", [
    ("dense", "unknown synthetic generator 'dense'; valid: sparse, animals"),
    ("sparse:mean_active", "'mean_active' in generator spec .* is not FIELD=VALUE"),
    ("sparse:colour=red", "'colour=red' .* fields: correlated, correlation_rank"),
    ("sparse:n_features=many", "generator field n_features takes a int, got 'many'"),
    ("sparse:correlated=maybe", "generator field correlated takes true or false"),
    ("sparse:mean_active=600", "mean_active"),   # the generator's own validation
])
def test_bad_specs(spec, message):
    with pytest.raises(InterplabError, match=message):
        make_generator(spec)


def test_sae_train_in_synthetic_mode_recovers_planted_features(tmp_path, capsys):
    spec = "sparse:n_features=24,d=16,mean_active=2"
    args = ["sae", "train", "--synthetic", spec, "--arch", "topk", "--k", "2", "--expansion", "2", "--tokens",
            "150000", "--batch-size", "256", "--lr", "1e-2", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    sae = load_sae(str(tmp_path / "run" / "topk-k2-x2"))
    assert sae.cfg.hook_name == f"synthetic:{spec}"
    scores = score_dictionary(sae.W_dec.detach(), make_generator(spec).features)
    assert scores["recovery"] >= 0.9 and scores["mmcs_true"] >= 0.95


def test_synthetic_mode_needs_tokens_and_one_source(tmp_path, capsys):
    assert main(["sae", "train", "--synthetic", "sparse", "--out", str(tmp_path / "a")]) == 2
    assert "synthetic mode (--synthetic) needs --tokens" in capsys.readouterr().err
    assert main(["sae", "train", "--synthetic", "sparse", "--store", "x", "--tokens", "10",
                 "--out", str(tmp_path / "b")]) == 2
    assert "got --store, --synthetic" in capsys.readouterr().err
