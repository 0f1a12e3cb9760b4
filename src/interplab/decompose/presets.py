"""The settings a decomposition actually runs with: the config's values, else the toy's preset, else the defaults.

SPD presets follow the SPD paper's TMS settings (Bushnaq et al. 2025, App.: Adam, cosine lr, C = 20 (5-2) / 200
(40-10), importance-minimality 3e-3 with p = 1 (5-2) and 1e-4 with p = 2 (40-10), one hidden layer of 16 GELUs per
causal-importance MLP, S = 1 mask sample, reconstruction coefficients 1) with the reference code's current form
(goodfire-ai/spd TMS configs: a 200-step faithfulness warm-up at lr 0.01 with weight decay 0.1, and the delta
component instead of the faithfulness loss; see DecomposeConfig) on a shortened CPU schedule. The paper trains 40k
steps of 4096 at lr 1e-3 (the reference now 10k of 4096; 20k for 40-10+ID); here: 4000 steps of 256 (5-2, 5-2+ID)
and 8000 of 256 (40-10; 16000 for 40-10+ID, the reference's ratio), at lr 5e-3. Measured (benchmarks/decompose.py):
40-10 needs the 8000 steps (4000 left features split: MMCS 0.94). APD presets follow the APD paper's TMS 5-2
settings (Braun et al. 2025, App. B: constant lr 0.03 after a 5% warm-up, batch 2048, batch top-k 0.211,
simplicity 0.7 with p = 1, C = 5) on 4000 steps instead of 20k, with the reference code's normalisation of the
faithfulness and simplicity losses by the number of weight entries (interplab.decompose.apd).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

from interplab.decompose.configs import DecomposeConfig


class Settings(NamedTuple):
    """Every number a decomposition run uses (see DecomposeConfig for their meaning)."""

    C: int
    steps: int
    lr: float
    batch_size: int
    importance_coeff: float
    p: float
    simplicity_coeff: float
    top_k: float


@dataclass(frozen=True)
class Preset:
    """Defaults of one toy for one method (None: use the general default)."""

    C: int | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    importance_coeff: float | None = None
    p: float | None = None
    simplicity_coeff: float | None = None
    top_k: float | None = None


DEFAULTS = Settings(C=64, steps=3000, lr=1e-3, batch_size=1024, importance_coeff=1e-3, p=1.0,
                    simplicity_coeff=1.0, top_k=1.0)
"""For a model without a preset."""
APD_DEFAULTS = Preset(lr=3e-2, batch_size=2048, steps=4000, p=1.0, simplicity_coeff=0.7)

SPD_PRESETS: dict[str, Preset] = {
    "tms-5-2": Preset(C=20, importance_coeff=3e-3, p=1.0, steps=4000, batch_size=256, lr=5e-3),
    "tms-5-2-id": Preset(C=20, importance_coeff=3e-3, p=1.0, steps=4000, batch_size=256, lr=5e-3),
    "tms-40-10": Preset(C=200, importance_coeff=1e-4, p=2.0, steps=8000, batch_size=256, lr=5e-3),
    "tms-40-10-id": Preset(C=200, importance_coeff=1e-4, p=2.0, steps=16000, batch_size=256, lr=5e-3),
    # Reference (goodfire-ai/spd resid_mlp1/2 configs): C = 100 (400 for 2 layers), p = 2, importance 1e-5 (1-layer),
    # lr 2e-3 constant, 20k steps of 2048. On this CPU: 4000 steps of 256 at lr 5e-3 with importance 1e-4 (at 1e-5
    # and 1500 steps every feature keeps ~20 important subcomponents; at 1e-4, 1500 steps give 91/100 features one,
    # 4000 give 100/100: benchmarks/resid_mlp_spd.py). resid-mlp-2: the same schedule, not yet measured.
    "resid-mlp-1": Preset(C=100, importance_coeff=1e-4, p=2.0, steps=4000, batch_size=256, lr=5e-3),
    "resid-mlp-2": Preset(C=400, importance_coeff=1e-4, p=2.0, steps=4000, batch_size=256, lr=5e-3),
}
"""SPD defaults by toy name (other toys' files may add theirs)."""
APD_PRESETS: dict[str, Preset] = {
    "tms-5-2": Preset(C=5, top_k=0.211),
    "tms-5-2-id": Preset(C=7, top_k=0.211),
    "tms-40-10": Preset(C=50, top_k=1.0, lr=1e-3, p=0.9, simplicity_coeff=20.0),
    "tms-40-10-id": Preset(C=60, top_k=1.0, lr=1e-3, p=0.9, simplicity_coeff=20.0),
}
"""APD defaults by toy name."""


def resolve(cfg: DecomposeConfig, name: str) -> Settings:
    """The settings for model `name`: each field from cfg if set, else the method's preset, else the defaults."""
    presets = SPD_PRESETS if cfg.method == "spd" else APD_PRESETS
    preset = presets.get(name, Preset())
    base = APD_DEFAULTS if cfg.method == "apd" else Preset()
    values = {}
    for f in fields(Preset):
        given = getattr(cfg, f.name)
        for candidate in (given, getattr(preset, f.name), getattr(base, f.name), getattr(DEFAULTS, f.name)):
            if candidate is not None:
                values[f.name] = candidate
                break
    return Settings(**values)
