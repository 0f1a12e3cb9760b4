"""Generator specs: one string names a synthetic generator and its settings, so the CLI can train on it.

    sparse                                   SparseFeatures with every default (G=512, d=256, 5 active)
    sparse:mean_active=10,correlated=true    the same with two fields changed
    animals:n_animals=500                    Animals (animals and attributes, two ontologies; dense animals)
    animals:membership=binary                the earlier variant: each animal the sum of 5 attributes

Field names are those of the generator's config dataclass; values are parsed to the field's type.
"""

from __future__ import annotations

import dataclasses
import typing

from interplab.config import parse_spec_settings
from interplab.errors import InterplabError
from interplab.synth.animals import Animals, AnimalsBatch, AnimalsConfig
from interplab.synth.sparse import SparseFeatures, SparseFeaturesConfig, SyntheticBatch

Generator = SparseFeatures | Animals
"""A generator a spec can name."""
GeneratorConfig = SparseFeaturesConfig | AnimalsConfig
Batch = SyntheticBatch | AnimalsBatch
"""What a generator's `sample` returns: the samples `x` and their planted truth."""

GENERATORS: dict[str, tuple[type, type]] = {
    "sparse": (SparseFeaturesConfig, SparseFeatures),
    "animals": (AnimalsConfig, Animals),
}
"""Generator name → (config dataclass, generator class)."""


def generator_config(spec: str) -> GeneratorConfig:
    """The config dataclass a spec describes (validated by the generator when it is built)."""
    name = spec.partition(":")[0]
    if name not in GENERATORS:
        raise InterplabError(f"unknown synthetic generator {name!r}; valid: {', '.join(GENERATORS)} "
                             "(e.g. sparse:mean_active=5)")
    config_cls = GENERATORS[name][0]
    hints = typing.get_type_hints(config_cls)
    kinds = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    values = parse_spec_settings(spec, "generator", kinds)
    return config_cls(**values)


def make_generator(spec: str) -> Generator:
    """Build the generator a spec names, e.g. make_generator("sparse:mean_active=5")."""
    cfg = generator_config(spec)
    return GENERATORS[spec.partition(":")[0]][1](cfg)
