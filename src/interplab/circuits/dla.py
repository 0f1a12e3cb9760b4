"""Direct logit attribution: which components write the answer into the final residual stream.

The final residual stream at the last position is a sum of parts,

    resid_final = embed (+ pos_embed) + Σ_l [ Σ_h result_{l,h} + b_O^l ] + Σ_l mlp_out_l,

(per-head results `attn.hook_result`; the attention bias is attn_out − Σ_h result). With the final norm's scale s
frozen at its cached value, ln_final is affine in the residual stream, so the logit difference is

    logit(answer) − logit(wrong) = Σ_parts normalize(part, s) · u + c,

where u is the gradient of the logit difference with respect to the normalised residual (one backward pass gives
it exactly, as the map is affine) and c = the difference at a zero residual (the norm's bias and the unembedding's
bias). The parts sum to the model's logit difference up to float rounding. The accumulated residual (resid_pre of
each layer, then the final one) is read through the same frozen norm: the logit lens of the difference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.models.hooked import HookedModel
from interplab.models.hooks import parse_block_hook


class DLAResult(NamedTuple):
    labels: list[str]
    """Name of each part: embed, pos_embed, L{l}H{h}, L{l} attn bias, L{l} mlp."""
    parts: Float[torch.Tensor, "n part"]
    """Each part's contribution to the logit difference, per prompt."""
    constant: Float[torch.Tensor, " n"]
    """The difference at a zero residual stream (biases of the final norm and the unembedding)."""
    logit_diff: Float[torch.Tensor, " n"]
    """The model's own logit difference (answer − wrong at the last position)."""
    head_parts: Float[torch.Tensor, "n layer head"]
    """The per-head contributions again, as a layer × head array."""
    accumulated: Float[torch.Tensor, "n stage"]
    """Logit difference of the accumulated residual: resid_pre of each layer, then the final residual stream."""


def _part_hooks(model: HookedModel) -> list[str]:
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_names else [])
    for layer in range(model.info.n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_result",
                  f"blocks.{layer}.hook_attn_out"]
        if f"blocks.{layer}.hook_mlp_out" in model.hook_names:
            names.append(f"blocks.{layer}.hook_mlp_out")
    names.append(f"blocks.{model.info.n_layers - 1}.hook_resid_post")
    return names + (["ln_final.hook_scale"] if "ln_final.hook_scale" in model.hook_names else [])


def _parts(model: HookedModel, cache: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The residual parts at the last position, stacked `[n, part, d_model]`, and their labels."""
    labels, parts = [], []
    n = cache["hook_embed"].shape[0]
    for name in _part_hooks(model):
        full = cache[name]
        act = (full if full.ndim > 2 else full.expand(n, *full.shape))[:, -1]  # a position embedding may be batchless
        parsed = parse_block_hook(name)
        if name in ("hook_embed", "hook_pos_embed"):
            labels.append(name.removeprefix("hook_")), parts.append(act)
            continue
        if parsed is None:
            continue
        layer, point = parsed
        if point == "attn.hook_result":  # [n, head, d_model]
            labels += [f"L{layer}H{h}" for h in range(act.shape[1])]
            parts += list(act.unbind(1))
        elif point == "hook_attn_out":
            labels.append(f"L{layer} attn bias")
            parts.append(act - cache[f"blocks.{layer}.attn.hook_result"][:, -1].sum(1))
        elif point == "hook_mlp_out":
            labels.append(f"L{layer} mlp"), parts.append(act)
    return labels, torch.stack(parts, 1)


def logit_direction(
    model: HookedModel, answer: Int[torch.Tensor, " n"], wrong: Int[torch.Tensor, " n"] | None,
) -> tuple[Float[torch.Tensor, "n d_model"], Float[torch.Tensor, " n"]]:
    """(u, c): the logit difference of a normalised final residual n is n · u + c (exact: the map is affine).

    `wrong=None` attributes the answer's logit alone.
    """
    d_model, n = model.info.d_model, answer.shape[0]
    normalized = torch.zeros(n, 1, d_model, device=model.device, requires_grad=True)
    with torch.enable_grad():
        logits = model._unembed(model._weigh_normalized(normalized))[:, 0]
        rows = torch.arange(n, device=logits.device)
        diff = logits[rows, answer.to(logits.device)]
        if wrong is not None:
            diff = diff - logits[rows, wrong.to(logits.device)]
        (u,) = torch.autograd.grad(diff.sum(), normalized)
    return u[:, 0].detach(), diff.detach().float()


@torch.no_grad()
def direct_logit_attribution(
    model: HookedModel,
    tokens: Int[torch.Tensor, "n pos"],
    answer: Int[torch.Tensor, " n"],
    wrong: Int[torch.Tensor, " n"] | None = None,
) -> DLAResult:
    """Split the logit difference (answer − wrong, at the last position) into the parts of the final residual."""
    res = model.run_with_cache(tokens, _part_hooks(model), return_logits=True)
    cache, logits = res.cache, res.logits
    assert logits is not None
    labels, parts = _parts(model, cache)  # [n, part, d_model]
    # [n, 1, 1]: one scale per prompt, shared by its parts (1 for a model without a final norm)
    scale = cache["ln_final.hook_scale"][:, -1:] if "ln_final.hook_scale" in cache else torch.ones(
        tokens.shape[0], 1, 1, device=parts.device)
    u, constant = logit_direction(model, answer, wrong)
    contrib = (model.normalize_final(parts, scale) * u[:, None]).sum(-1).float()  # [n, part]
    rows = torch.arange(tokens.shape[0], device=logits.device)
    own = logits[rows, -1, answer.to(logits.device)]
    if wrong is not None:
        own = own - logits[rows, -1, wrong.to(logits.device)]
    n_layers, n_heads = model.info.n_layers, model.info.n_heads
    head_cols = [i for i, label in enumerate(labels) if label.startswith("L") and "H" in label]
    stages = [cache[f"blocks.{l}.hook_resid_pre"][:, -1] for l in range(n_layers)]
    stages.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, -1])
    stages_normalized = model.normalize_final(torch.stack(stages, 1), scale)  # [n, stage, d_model]
    accumulated = (stages_normalized * u[:, None]).sum(-1).float() + constant[:, None]
    return DLAResult(labels, contrib.cpu(), constant.cpu(), own.float().cpu(),
                     contrib[:, head_cols].reshape(-1, n_layers, n_heads).cpu(), accumulated.cpu())
