"""The planted-truth lab: generators with planted features, the scores that check a learned dictionary against them,
toy models of superposition, and a transformer whose embedding is a generator's samples.

    from interplab.synth import SparseFeatures, SparseFeaturesConfig, score_with_controls
    gen = SparseFeatures(SparseFeaturesConfig(n_features=512, d=256, mean_active=5))
    batch = gen.sample(4096, torch.Generator().manual_seed(0))       # SyntheticBatch(x, coeffs, active)
    scores = score_with_controls(sae.W_dec, gen.features, batch.x, codes=sae.encode(batch.x), coeffs=batch.coeffs)

- sparse.py: sparse features in superposition (Sharkey, Braun & Millidge 2022), optionally correlated.
- animals.py: animals and attributes, two exact ontologies of the same data; `no_common_dictionary`.
- score.py: MMCS both ways, recovery, Hungarian matching, F1 and correlation, with random and PCA controls.
- tms.py, tms_geometry.py, tms_run.py, tms_figures.py: toy models of superposition (Elhage et al. 2022), trained
  many instances at once, and their geometry (feature dimensionality D_i, dimensions per feature D*, fraction
  clusters); `interplab synth tms`.
- specs.py: generator specs ("sparse:mean_active=10") for `interplab sae train --synthetic`; bench.py, figures.py:
  `synth bench` and `synth score`.
- planted.py: the planted model, a small transformer (models.table_embed) whose embedding is a generator's samples,
  so that harvest, SAE training from the store and `sae eval` run where the truth is known (`synth model`).
- configs.py: the command configs (standard library only); sources.py: the generator as the SAE trainer's source.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "animals": ["Animals", "AnimalsBatch", "AnimalsConfig", "NoCommonDictionary", "ONTOLOGIES", "no_common_dictionary"],
        "configs": ["PlantedConfig", "SynthBenchConfig", "SynthScoreConfig", "TMSRunConfig"],
        "planted": ["planted_model", "true_features", "truth"],
        "score": ["Matching", "MaxCosine", "PairScores", "hungarian_match", "max_cosines", "mmcs", "pair_scores", "pca_directions", "random_dictionary", "recovery_rate", "score_dictionary", "score_sae", "score_with_controls"],
        "sparse": ["SparseFeatures", "SparseFeaturesConfig", "SyntheticBatch", "SyntheticSource", "feature_probabilities"],
        "tms": ["TMSConfig", "TMSResult", "train_tms"],
        "tms_geometry": ["dimensions_per_feature", "feature_dimensionality", "fraction_clusters"],
    },
)
