"""The logit lens: read every layer's residual stream through the model's own final norm and unembedding.

For layer l (its residual `blocks.{l}.hook_resid_post`, h_l) the lens distribution is

    q_l = softmax(unembed(final_norm(T_l(h_l))))        T_l = identity for the logit lens (nostalgebraist 2020),
                                                         an affine translator for the tuned lens (tuned_lens.py)

and it is scored against the model's own next-token distribution p = softmax(logits) by

    KL(p ‖ q_l) = Σ_v p_v (log p_v − log q_v)   in nats, per token.

At the last layer T = identity reads exactly the model's logits, so the logit lens's KL there is 0.

Position 0 of every context is left out of training and evaluation: in packed contexts it is BOS, whose
prediction uses no context, and in SmolLM2 its mid-layer residual is an attention sink (norm ~25,000 against ~200
at other positions) that would dominate any fit.

Control: the KL of the best context-free guess, the mean final distribution p̄ of the same held-out tokens:
mean_t KL(p_t ‖ p̄) = H(p̄) − mean_t H(p_t) (since log p̄ is the same for every token), beside the KL of the uniform
distribution, log V − mean_t H(p_t). A layer's lens is informative only where its KL is well below these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel

Translate = Callable[[Tensor, int], Tensor]
"""`translate(resid, layer) -> resid'`: how a lens maps layer `layer`'s residual before the readout."""


def resid_hooks(n_layers: int) -> list[str]:
    """The hook names the lenses read: `blocks.{l}.hook_resid_post` for l = 0 … n_layers − 1."""
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


def layer_residuals(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], *, logits: bool = True
) -> tuple[Float[Tensor, "layer batch pos d_model"], Float[Tensor, "batch pos d_vocab"] | None]:
    """Every layer's residual stream (one forward pass) and the model's logits (None unless `logits`: the pass then
    stops at the last block, and `readout` of the last residual gives the same logits)."""
    names = resid_hooks(model.info.n_layers)
    result = model.run_with_cache(tokens, names, return_logits=logits)
    return torch.stack([result.cache[name] for name in names]), result.logits


def readout(model: HookedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """unembed(final_norm(resid)): the model's own last two steps, applied to any residual."""
    return model._unembed(model._final_norm(resid))


class FinalDist(NamedTuple):
    """The model's own next-token distribution p, in float32, as the KL needs it."""

    p: Float[Tensor, "token d_vocab"]
    neg_entropy: Float[Tensor, " token"]
    """Σ_v p_v log p_v (terms with p_v = 0 count 0)."""

    @classmethod
    def from_logits(cls, logits: Float[Tensor, "token d_vocab"]) -> "FinalDist":
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        p = logp.exp()
        return cls(p, torch.xlogy(p, p).sum(-1))


class _KLFromLogits(torch.autograd.Function):
    """KL(p ‖ softmax(z)) = Σ p log p − Σ p log q with log q = z − logsumexp(z); gradient g·(q − p).

    Fused by hand because on a 49k vocabulary the elementwise passes of log_softmax and its autograd cost more
    than the unembedding matmul. (Σ p z − logsumexp(z) would save a pass but cancels two numbers of the size of
    the logits: in float32 it left KL ≈ −2e-4 where it is 0 on SmolLM2.)
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, p: Tensor, neg_entropy: Tensor) -> Tensor:  # type: ignore[override]
        zf = z.to(torch.promote_types(z.dtype, torch.float32))
        logq = zf - torch.logsumexp(zf, -1, keepdim=True)
        ctx.save_for_backward(logq, p)
        ctx.z_dtype = z.dtype
        return neg_entropy - (p * logq).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logq, p = ctx.saved_tensors
        dz = torch.exp(logq).sub_(p).mul_(grad[:, None])
        return dz.to(ctx.z_dtype), None, None


def kl_to_final(lens_logits: Float[Tensor, "token d_vocab"], final: FinalDist) -> Float[Tensor, " token"]:
    """KL(p ‖ q) per token in nats, q = softmax(lens_logits), computed in ≥ float32 (differentiable in the logits;
    p and its negative entropy are constants)."""
    if lens_logits.shape != final.p.shape:
        raise InterplabError(f"lens logits {tuple(lens_logits.shape)} and final distribution {tuple(final.p.shape)} "
                             "differ in shape")
    return _KLFromLogits.apply(lens_logits, final.p, final.neg_entropy)


def lens_logits(
    model: HookedModel, resid: Float[Tensor, "layer batch pos d_model"], translate: Translate | None = None
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """The lens logits of every layer (translated first if `translate` is given)."""
    outs = [readout(model, resid[layer] if translate is None else translate(resid[layer], layer))
            for layer in range(resid.shape[0])]
    return torch.stack(outs)


# ---- evaluation on held-out tokens ---------------------------------------------------------------------------
@dataclass
class LensScores:
    """Per-layer scores of one lens on held-out tokens (layer order = model order)."""

    kl: list[list[float]] = field(default_factory=list)
    """Per layer, the KL(final ‖ lens) of every scored token."""
    top1_agree: list[int] = field(default_factory=list)
    """Per layer, how many tokens' lens top-1 equals the model's top-1."""

    def summary(self) -> dict[str, list[float]]:
        means = [sum(v) / len(v) for v in self.kl]
        sems = [_sem(v) for v in self.kl]
        n = len(self.kl[0]) if self.kl else 0
        return {"kl": means, "kl_sem": sems, "top1_agreement": [a / n for a in self.top1_agree]}


def _sem(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass
class LensEval:
    """Both lenses (the tuned one if given) and the context-free controls on the same held-out tokens."""

    n_tokens: int
    logit: dict[str, list[float]]
    tuned: dict[str, list[float]] | None
    baseline: dict[str, float]
    """mean_distribution_kl = H(p̄) − mean H(p); uniform_kl = log V − mean H(p); final_entropy = mean H(p)."""

    def to_json(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "logit_lens": self.logit, "tuned_lens": self.tuned,
                "baseline": self.baseline}


@torch.no_grad()
def evaluate_lenses(
    model: HookedModel,
    batches: Iterable[Int[Tensor, "batch pos"]],
    translate: Translate | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> LensEval:
    """Per-layer KL(final ‖ lens) and top-1 agreement of the logit lens (and of `translate`'s lens), float32.

    Positions ≥ 1 of each context are scored (see the module docstring). `progress(n)` is told each batch's tokens.
    """
    n_layers = model.info.n_layers
    logit, tuned = _empty(n_layers), _empty(n_layers) if translate is not None else None
    p_sum: Tensor | None = None
    neg_h_sum, n_tokens = 0.0, 0
    for tokens in batches:
        resid, logits = layer_residuals(model, tokens)
        resid = resid[:, :, 1:].flatten(1, 2).float()                                   # [layer token d_model]
        final = FinalDist.from_logits(logits[:, 1:].flatten(0, 1))
        top = final.p.argmax(-1)
        for layer in range(n_layers):
            _score(logit, layer, readout(model, resid[layer]), final, top)
            if tuned is not None:
                _score(tuned, layer, readout(model, translate(resid[layer], layer)), final, top)  # type: ignore[misc]
        p_sum = final.p.double().sum(0) if p_sum is None else p_sum + final.p.double().sum(0)
        neg_h_sum += final.neg_entropy.double().sum().item()
        n_tokens += final.p.shape[0]
        if progress is not None:
            progress(final.p.shape[0])
    if not n_tokens:
        raise InterplabError("no held-out tokens to evaluate the lenses on (each context needs >= 2 tokens)")
    p_mean = p_sum / n_tokens                                                             # type: ignore[operator]
    mean_h = -neg_h_sum / n_tokens
    baseline = {"mean_distribution_kl": (-torch.xlogy(p_mean, p_mean).sum()).item() - mean_h,
                "uniform_kl": math.log(model.info.d_vocab) - mean_h, "final_entropy": mean_h}
    return LensEval(n_tokens, logit.summary(), tuned.summary() if tuned is not None else None, baseline)


def _empty(n_layers: int) -> LensScores:
    return LensScores([[] for _ in range(n_layers)], [0] * n_layers)


def _score(scores: LensScores, layer: int, z: Tensor, final: FinalDist, top: Tensor) -> None:
    scores.kl[layer] += kl_to_final(z.float(), final).tolist()
    scores.top1_agree[layer] += int((z.argmax(-1) == top).sum())


# ---- top predictions for one prompt --------------------------------------------------------------------------
@torch.no_grad()
def top_predictions(
    model: HookedModel, tokens: Int[Tensor, " pos"], translate: Translate | None = None, k: int = 5
) -> tuple[Int[Tensor, "layer pos k"], Float[Tensor, "layer pos k"]]:
    """Each layer's top-k next-token ids and probabilities at every position of one prompt (float32)."""
    resid, _ = layer_residuals(model, tokens[None])
    probs = lens_logits(model, resid[:, 0].float(), translate).float().softmax(-1)      # [layer pos d_vocab]
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.indices, top.values


def prediction_grid(
    model: HookedModel, tokens: Sequence[int], translate: Translate | None = None, k: int = 5
) -> list[list[list[dict[str, Any]]]]:
    """[layer][position] → the top-k predictions as {"id", "token", "prob"} (token text if there is a tokenizer)."""
    ids, probs = top_predictions(model, torch.tensor(list(tokens), dtype=torch.long), translate, k)
    decode = token_text(model)
    return [[[{"id": int(i), "token": decode(int(i)), "prob": float(q)} for i, q in zip(row_i, row_p)]
             for row_i, row_p in zip(layer_i, layer_p)] for layer_i, layer_p in zip(ids, probs)]


def token_text(model: HookedModel) -> Callable[[int], str]:
    """Token id → its text (the id in angle brackets for models without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return lambda i: f"<{i}>"
    return lambda i: tok.decode([i])
