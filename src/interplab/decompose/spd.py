"""Stochastic Parameter Decomposition (Bushnaq et al. 2025, arXiv 2506.20790).

Every target weight W^l is written as C rank-1 subcomponents, W^l ≈ Σ_c U^l[c] ⊗ V^l[:, c]; each subcomponent has
a causal importance g^l_c(x) ∈ [0, 1] (interplab.decompose.importance) and is masked by

    m^l_c = g^l_c + (1 − g^l_c) r^l_c,      r^l_c ~ U(0, 1)     (ablated by a random amount it is allowed to be)

and the loss is

    L = L_faithfulness + β₁ L_stochastic-recon + β₂ L_stochastic-recon-layerwise + β₃ L_importance-minimality
    L_faithfulness = mean over every weight entry of (W − Σ_c U[c] ⊗ V[:, c])²
    L_stochastic-recon = D(f(x | all layers masked), f(x))
    L_stochastic-recon-layerwise = mean_l D(f(x | only layer l masked), f(x))
    L_importance-minimality = mean_x Σ_l Σ_c |g^l_c(x)|^p          (g from the upper-leaky sigmoid)

with D the mean squared error (or the KL divergence for logits) and one mask sample per step (S = 1, as in the
paper). Before training, `warmup_steps` faithfulness-only AdamW steps at lr 0.01 (weight decay 0.1 by default) move
the components near W, as the reference implementation does. With `delta_component` (the reference code's form
since Sept. 2025, the default of `interplab decompose`) every masked layer also adds its residual
Δ = W − Σ_c U[c] ⊗ V[:, c] times a fresh r ~ U(0, 1) per input, and the faithfulness coefficient defaults to 0: a
residual that is randomly scaled costs reconstruction, so it is driven to 0 without a separate loss. The target
model is never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from interplab.decompose.components import (
    capture_inputs,
    check_masks_apply,
    make_components,
    masked_forward,
    module_key,
    target_modules,
)
from interplab.decompose.importance import (
    ImportanceMLPs,
    importance_minimality,
    lower_leaky_hard_sigmoid,
    upper_leaky_hard_sigmoid,
)
from interplab.decompose.loop import train, weights_digest
from interplab.decompose.presets import Settings
from interplab.decompose.truth import GroundTruthModel, OutputLoss, output_loss_of

WARMUP_LR = 0.01
"""Learning rate of the faithfulness-only warm-up."""


class Decomposition(NamedTuple):
    """A trained decomposition of some weights of a model (SPD or APD)."""

    method: str
    """"spd" or "apd"."""
    targets: list[str]
    """The decomposed weights (module names)."""
    components: nn.ModuleDict
    """LayerComponents per target (key: components.module_key(name)); APD's component c is index c in every layer."""
    importance: nn.ModuleDict | None
    """SPD: the causal-importance MLPs per target; APD: None (its importances are attributions)."""
    history: list[dict[str, float]]
    """The loss terms every few steps."""
    settings: Settings
    """The numbers it was trained with."""
    seconds: float
    """Training wall time (all sessions)."""
    resumed_from: int
    """The step this session resumed from (0: fresh)."""


class Importances(NamedTuple):
    """Causal importances of every subcomponent on a batch."""

    lower: dict[str, Float[Tensor, "... C"]]
    """σ_lower(γ(h)): sets the masks."""
    upper: dict[str, Float[Tensor, "... C"]]
    """σ_upper(γ(h)): enters the importance-minimality penalty."""


def output_distance(out: Tensor, target: Tensor, kind: OutputLoss) -> Float[Tensor, ""]:
    """mse: mean of (out − target)²; kl: KL(softmax target ‖ softmax out) summed over the last axis, averaged."""
    if kind == "kl":
        return F.kl_div(out.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    return (out - target).square().mean()


def faithfulness_loss(model: nn.Module, components: nn.ModuleDict, targets: list[str]) -> Float[Tensor, ""]:
    """Σ_l Σ_ij (W^l − Σ_c U^l[c] ⊗ V^l[:, c])²_ij / (number of weight entries)."""
    modules = target_modules(model, targets)
    total = sum((modules[t].weight - components[module_key(t)].weight()).square().sum() for t in targets)
    return total / sum(modules[t].weight.numel() for t in targets)


def residual_weights(model: nn.Module, components: nn.ModuleDict, targets: list[str]) -> dict[str, Tensor]:
    """Per target, Δ = W − Σ_c U[c] ⊗ V[:, c] (differentiable in the components)."""
    modules = target_modules(model, targets)
    return {t: modules[t].weight - components[module_key(t)].weight() for t in targets}


def causal_importances(components: nn.ModuleDict, importance: nn.ModuleDict,
                       inputs: dict[str, Tensor]) -> Importances:
    """g^l_c(x) for every target from its recorded input a^l(x): σ(γ_c(V[:, c] · a))."""
    lower, upper = {}, {}
    for name, a in inputs.items():
        key = module_key(name)
        pre = importance[key](components[key].inner(a))
        lower[name], upper[name] = lower_leaky_hard_sigmoid(pre), upper_leaky_hard_sigmoid(pre)
    return Importances(lower, upper)


def stochastic_mask(g: Tensor, gen: torch.Generator) -> Tensor:
    """m = g + (1 − g) r with r ~ U(0, 1) drawn from `gen` (reparametrised: the gradient reaches g)."""
    r = torch.rand(g.shape, generator=gen, device=g.device)
    return g + (1 - g) * r


def spd_loss_terms(truth: GroundTruthModel, components: nn.ModuleDict, importance: nn.ModuleDict, x: Tensor,
                   gen: torch.Generator, p: float, delta_component: bool = False) -> dict[str, Tensor]:
    """The four SPD losses on the batch x (see the module docstring); with `delta_component`, each masked layer also
    adds its residual Δ = W − Σ_c U[c] ⊗ V[:, c] scaled by a fresh r ~ U(0, 1) per input."""
    model, targets, kind = truth.model, truth.targets, output_loss_of(truth)
    with torch.no_grad(), capture_inputs(model, targets) as inputs:
        target_out = model(x)
    g = causal_importances(components, importance, inputs)
    residuals = residual_weights(model, components, targets) if delta_component else None

    def deltas(names: list[str]) -> dict[str, tuple[Tensor, Tensor]] | None:
        if residuals is None:
            return None
        lead = g.lower[names[0]].shape[:-1]
        return {n: (residuals[n], torch.rand(lead, generator=gen, device=x.device)) for n in names}

    masks = {name: stochastic_mask(g.lower[name], gen) for name in targets}
    with masked_forward(model, components, masks, deltas(targets)):
        recon = output_distance(model(x), target_out, kind)
    layerwise = []
    for name in targets:
        with masked_forward(model, components, {name: stochastic_mask(g.lower[name], gen)}, deltas([name])):
            layerwise.append(output_distance(model(x), target_out, kind))
    return {"faithfulness": faithfulness_loss(model, components, targets), "recon": recon,
            "recon_layerwise": torch.stack(layerwise).mean(), "importance_minimality": importance_minimality(g.upper, p)}


def run_spd(truth: GroundTruthModel, settings: Settings, *, seed: int, ci_hidden: int = 16,
            coeffs: tuple[float, float, float] = (1.0, 1.0, 1.0), warmup_steps: int = 200,
            warmup_weight_decay: float = 0.0, delta_component: bool = False,
            checkpoint: Path | None = None, checkpoint_every: int = 500, progress: bool = True,
            desc: str = "spd") -> Decomposition:
    """Decompose truth.targets of truth.model with SPD; coeffs = (faithfulness, β₁, β₂), β₃ = importance_coeff.

    Resumes from `checkpoint` when it exists. Raises InterplabError for a bad target, C < 1, a forward that does
    not call the targets as modules, or a non-finite loss."""
    model = truth.model.requires_grad_(False)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    components = make_components(model, truth.targets, settings.C, gen)
    importance = nn.ModuleDict({module_key(t): ImportanceMLPs(settings.C, ci_hidden, gen, device)
                                for t in truth.targets})
    check_masks_apply(model, components, truth.targets, truth.sample(2, torch.Generator(device).manual_seed(seed)))
    if not (checkpoint is not None and checkpoint.is_file()):
        _warmup(model, components, truth.targets, warmup_steps, warmup_weight_decay)
    trainable = nn.ModuleDict({"components": components, "importance": importance})
    f_coeff, b1, b2 = coeffs

    def step_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        terms = spd_loss_terms(truth, components, importance, truth.sample(settings.batch_size, gen), gen,
                               settings.p, delta_component)
        loss = (f_coeff * terms["faithfulness"] + b1 * terms["recon"] + b2 * terms["recon_layerwise"]
                + settings.importance_coeff * terms["importance_minimality"])
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    result = train(trainable, step_loss, steps=settings.steps, lr=settings.lr, gen=gen, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, digest=weights_digest(model), desc=desc, progress=progress)
    return Decomposition("spd", list(truth.targets), components, importance, result.history, settings, result.seconds,
                         result.resumed_from)


def _warmup(model: nn.Module, components: nn.ModuleDict, targets: list[str], steps: int,
            weight_decay: float = 0.0) -> None:
    """`steps` AdamW steps on the faithfulness loss alone (lr 0.01, decoupled weight decay `weight_decay`): the
    components start near the target, the decay keeping the superfluous ones small."""
    if steps == 0:
        return
    opt = torch.optim.AdamW(components.parameters(), lr=WARMUP_LR, weight_decay=weight_decay)
    for _ in range(steps):
        loss = faithfulness_loss(model, components, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
