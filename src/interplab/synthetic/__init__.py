"""Generators with planted ground truth, and the scores that check a learned dictionary against it.

    from interplab.synthetic import SparseFeatures, SparseFeaturesConfig, score_with_controls
    gen = SparseFeatures(SparseFeaturesConfig(n_features=512, d=256, mean_active=5))
    batch = gen.sample(4096, torch.Generator().manual_seed(0))       # SyntheticBatch(x, coeffs, active)
    scores = score_with_controls(sae.W_dec, gen.features, batch.x, codes=sae.encode(batch.x), coeffs=batch.coeffs)

- sparse.py: sparse features in superposition (Sharkey, Braun & Millidge 2022), optionally correlated.
- animals.py: animals and attributes, two exact ontologies of the same data; `no_common_dictionary`.
- score.py: MMCS both ways, recovery, Hungarian matching, F1 and correlation, with random and PCA controls.
- tms.py, tms_geometry.py: toy models of superposition (Elhage et al. 2022), trained many instances at once, and
  their geometry (feature dimensionality D_i, dimensions per feature D*, fraction clusters).
- specs.py: generator specs ("sparse:mean_active=10") for `interplab sae train --synthetic`; bench.py: `synth bench`
  and `synth score`.
- planted.py: `PlantedTransformer`, a small transformer whose embedding is a generator's samples, so that harvest,
  SAE training from the store and `sae eval` run where the truth is known (`synth model`).
- tasks.py: toy-transformer tasks with the exact answer (ov-coherent pairs, skip-trigrams, modular addition, a
  Python generator); phases.py: an evaluation schedule of named phases with start conditions and gates;
  toy_train.py: `interplab toy train`; toy_inspect.py, toy_fourier.py: `interplab toy inspect`, the circuit read-outs.
"""

from interplab.synthetic.animals import (
    ONTOLOGIES,
    Animals,
    AnimalsBatch,
    AnimalsConfig,
    NoCommonDictionary,
    no_common_dictionary,
)
from interplab.synthetic.phases import Phase, Schedule, parse_condition
from interplab.synthetic.planted import ByteTokenizer, PlantedConfig, PlantedTransformer
from interplab.synthetic.score import (
    Matching,
    MaxCosine,
    PairScores,
    hungarian_match,
    max_cosines,
    mmcs,
    pair_scores,
    pca_directions,
    random_dictionary,
    recovery_rate,
    score_dictionary,
    score_sae,
    score_with_controls,
)
from interplab.synthetic.sparse import (
    SparseFeatures,
    SparseFeaturesConfig,
    SyntheticBatch,
    SyntheticSource,
    feature_probabilities,
)
from interplab.synthetic.tasks import (
    ModularAdditionTask,
    OVCoherentTask,
    SkipTrigramTask,
    Task,
    TaskBatch,
    make_task,
)
from interplab.synthetic.tms import TMSConfig, TMSResult, train_tms
from interplab.synthetic.tms_geometry import dimensions_per_feature, feature_dimensionality, fraction_clusters

__all__ = [
    "ModularAdditionTask",
    "OVCoherentTask",
    "Phase",
    "Schedule",
    "SkipTrigramTask",
    "Task",
    "TaskBatch",
    "make_task",
    "parse_condition",
    "ONTOLOGIES",
    "Animals",
    "AnimalsBatch",
    "AnimalsConfig",
    "ByteTokenizer",
    "Matching",
    "MaxCosine",
    "NoCommonDictionary",
    "PairScores",
    "PlantedConfig",
    "PlantedTransformer",
    "SparseFeatures",
    "SparseFeaturesConfig",
    "SyntheticBatch",
    "SyntheticSource",
    "TMSConfig",
    "TMSResult",
    "dimensions_per_feature",
    "feature_dimensionality",
    "feature_probabilities",
    "fraction_clusters",
    "hungarian_match",
    "max_cosines",
    "mmcs",
    "no_common_dictionary",
    "pair_scores",
    "pca_directions",
    "random_dictionary",
    "recovery_rate",
    "score_dictionary",
    "score_sae",
    "score_with_controls",
    "train_tms",
]
