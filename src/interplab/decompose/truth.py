"""What a decomposition is checked against: a trained model whose true mechanisms are known.

A ground-truth model (`GroundTruthModel`) is a trained `nn.Module` with named weight matrices to decompose
(`targets`: names in `model.named_modules()` of `nn.Linear` or `nn.Embedding` modules), a sampler of its training
inputs, and, per target, the true mechanisms as full matrices that sum to the target's weight:

    W_target = Σ_k T_k,     T_k ∈ R^{d_out × d_in}   (rank 1 for TMS: T_i = W[:, i] e_iᵀ)

The matrix convention is the one of `y = W x`: for `nn.Linear` W is `.weight` ([out_features, in_features]); for
`nn.Embedding` W is `.weight.T` ([embedding_dim, num_embeddings]), so that a token's embedding is W times its
one-hot vector, and "d_in" is the vocabulary.

Optional attribute `output_loss` ("mse", the default, or "kl" for models whose output is logits): how SPD and APD
compare the decomposed model's output with the target's (`output_loss_of`).

The registry of built-in ground-truth models (`--toy NAME`) is `interplab.decompose.toys.TOYS`: a dict from name to a
factory `ToyRequest -> GroundTruthModel`. To add a model, write its factory in its own file of this package and add
one import and one entry to that dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

OutputLoss = Literal["mse", "kl"]
"""How a decomposed model's output is compared with the target's: mean squared error, or KL(target ‖ decomposed)
of the softmax over the last dimension (logits)."""


@runtime_checkable
class GroundTruthModel(Protocol):
    """A trained model with known mechanisms (see the module docstring)."""

    name: str
    """Registry name, e.g. "tms-5-2", "tms-5-2-id", "resid-mlp-1", "animals-facts"."""
    model: nn.Module
    """The trained target model; forward(x) -> output. Its parameters are never changed by a decomposition."""
    targets: list[str]
    """Names (model.named_modules()) of the nn.Linear / nn.Embedding modules to decompose."""

    def sample(self, batch: int, gen: torch.Generator) -> Tensor:
        """`batch` inputs drawn from the training distribution with `gen` (the only source of randomness)."""
        ...

    def true_components(self) -> dict[str, Float[Tensor, "n_true d_out d_in"]]:
        """Per target, the true mechanisms as full [d_out, d_in] matrices summing to the target's weight."""
        ...

    def one_hot_inputs(self) -> Tensor:
        """[n_features, ...] inputs with exactly one feature on (at value 1, or the task's typical magnitude): the
        rows of the causal-importance matrix."""
        ...


class ToyRequest(NamedTuple):
    """What a registered factory is asked for: train (or load from `cache`) the model of this seed."""

    seed: int
    """Seed of the target model's training (its initialisation and data)."""
    cache: Path | None
    """A folder where the trained target may be saved and found again (e.g. RUN/target); None: train in memory."""
    device: str
    """Torch device."""
    progress: bool
    """Show a progress bar while training the target."""


def output_loss_of(truth: GroundTruthModel) -> OutputLoss:
    """The model's `output_loss` attribute, "mse" when it has none."""
    return getattr(truth, "output_loss", "mse")


def target_weight(module: nn.Module) -> Float[Tensor, "d_out d_in"]:
    """The module's weight in the y = W x convention (Linear: weight; Embedding: weight.T)."""
    if isinstance(module, nn.Embedding):
        return module.weight.T
    return module.weight
