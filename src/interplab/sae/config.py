"""`SAEConfig`: what a sparse dictionary is (architecture, sizes, sparsity knobs), independent of how it is trained.

Every field has its docstring under it: the `interplab sae` command-line options are generated from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from interplab.errors import InterplabError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
"""The dictionary architectures interplab builds, trains and saves."""
_FLOATS = ("l1_coefficient", "l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold", "aux_coefficient")
_STRINGS = ("arch", "hook_name", "model")


@dataclass
class SAEConfig:
    """Architecture and sparsity settings of a sparse autoencoder."""

    arch: str = "topk"
    """Architecture: relu (L1 penalty), topk, batchtopk, jumprelu (L0 penalty) or matryoshka (nested BatchTopK)."""
    d_in: int = 576
    """Width of the activations the dictionary reads (e.g. d_model for the residual stream)."""
    d_sae: int = 9216
    """Number of latents (dictionary size)."""
    k: int = 32
    """topk/batchtopk/matryoshka: active latents per token (batchtopk and matryoshka: on average over the batch)."""
    l1_coefficient: float = 5.0
    """relu: weight of the L1 term sum_i f_i(x)*||W_dec[i]|| (Anthropic's April 2024 update)."""
    l0_coefficient: float = 1.0
    """jumprelu: weight of the L0 penalty (mean count of active latents per token). The three jumprelu defaults are
    SAELens's, sized for activations normalised to E‖x‖² = d_in (per-coordinate scale 1, as `--normalize` does):
    the paper's 0.001 bandwidth and threshold never sparsified there (L0 ≈ 495 of 512 on the planted generator)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through estimator (Rajamanoharan et al. 2024)."""
    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial value of every latent's threshold."""
    aux_k: int = 512
    """topk/batchtopk/matryoshka: dead latents used by the AuxK loss (Gao et al. 2024)."""
    aux_coefficient: float = 1 / 32
    """topk/batchtopk/matryoshka: weight of the AuxK loss."""
    matryoshka_prefixes: list[int] | None = None
    """matryoshka: nested dictionary sizes, increasing and ending at d_sae (default: d_sae/16, d_sae/4, d_sae)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding (default: true for topk/batchtopk/matryoshka, false otherwise)."""
    hook_name: str = ""
    """TransformerLens hook name the SAE reads (saved in cfg.json metadata)."""
    model: str = ""
    """Model spec the SAE was trained on (saved in cfg.json metadata)."""

    # ---- derived --------------------------------------------------------------------------------------------
    @property
    def prefixes(self) -> list[int]:
        """matryoshka: the nested sizes actually used (`matryoshka_prefixes` or its default), ending at d_sae."""
        if self.matryoshka_prefixes:
            return list(self.matryoshka_prefixes)
        sizes = [self.d_sae // 16, self.d_sae // 4, self.d_sae]
        return sorted({s for s in sizes if s >= 1})

    @property
    def subtract_b_dec(self) -> bool:
        """Whether encode() reads x - b_dec (`apply_b_dec_to_input`, or the architecture's default)."""
        if self.apply_b_dec_to_input is not None:
            return bool(self.apply_b_dec_to_input)
        return self.arch in ("topk", "batchtopk", "matryoshka")

    def validate(self) -> None:
        """Raise an InterplabError naming the first invalid field (also a value of the wrong type, as a hand-edited
        cfg.json can hold, or a float that is not finite)."""
        self._check_types()
        if self.arch not in ARCHS:
            raise InterplabError(f"unknown SAE architecture {self.arch!r}; valid: {', '.join(ARCHS)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}")
        if self.arch in ("topk", "batchtopk", "matryoshka"):
            if self.k < 1:
                raise InterplabError(f"k={self.k} must be >= 1")
            if self.k >= self.d_sae:
                raise InterplabError(f"k={self.k} must be < d_sae={self.d_sae}")
            if self.aux_k < 1:
                raise InterplabError(f"aux_k must be >= 1, got {self.aux_k}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):  # finite: _check_types
            if getattr(self, name) < 0:
                raise InterplabError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise InterplabError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.arch == "matryoshka":
            p = self.prefixes
            if any(b <= a for a, b in zip(p, p[1:])) or p[0] < 1:
                raise InterplabError(f"matryoshka_prefixes must be positive and strictly increasing, got {p}")
            if p[-1] != self.d_sae:
                raise InterplabError(f"the last of matryoshka_prefixes must equal d_sae={self.d_sae}, got {p}")

    def _check_types(self) -> None:
        """Each field holds a value of its type: ints are not bools or floats, floats are finite numbers."""
        for name in _STRINGS:
            if not isinstance(getattr(self, name), str):
                raise InterplabError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("d_in", "d_sae", "k", "aux_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InterplabError(f"{name} must be a positive integer, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InterplabError(f"{name} must be a finite number, got {value!r}")
        if self.apply_b_dec_to_input is not None and not isinstance(self.apply_b_dec_to_input, bool):
            raise InterplabError(f"apply_b_dec_to_input must be true, false or null, got {self.apply_b_dec_to_input!r}")
        prefixes = self.matryoshka_prefixes
        if prefixes is not None and (not isinstance(prefixes, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in prefixes)):
            raise InterplabError(f"matryoshka_prefixes must be a list of integers, got {prefixes!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Build from a dict, ignoring keys this version does not know (written by a newer interplab)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
