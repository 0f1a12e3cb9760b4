"""The built-in ground-truth models (`interplab decompose --toy NAME`): name -> factory.

A factory takes a `ToyRequest` (seed, cache folder, device, progress) and returns a `GroundTruthModel`
(interplab.decompose.truth). To add one: write the factory in its own file of this package, then add its import
and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable

from interplab.decompose.animals_model import animals_facts_factory
from interplab.decompose.resid_mlp import resid_mlp_factory
from interplab.decompose.tms_models import tms_factory
from interplab.decompose.truth import GroundTruthModel, ToyRequest

ToyFactory = Callable[[ToyRequest], GroundTruthModel]

TOYS: dict[str, ToyFactory] = {
    "tms-5-2": tms_factory(5, 2, identity=False),
    "tms-5-2-id": tms_factory(5, 2, identity=True),
    "tms-40-10": tms_factory(40, 10, identity=False),
    "tms-40-10-id": tms_factory(40, 10, identity=True),
    "resid-mlp-1": resid_mlp_factory(1),
    "resid-mlp-2": resid_mlp_factory(2),
    "animals-facts": animals_facts_factory(),
}
"""Every built-in ground-truth model by name."""
