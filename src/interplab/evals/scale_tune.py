"""Decoder-scale fine-tuning: how much of an SAE's excess KL is a matter of scale?

The encoder (so the codes f) and the decoder directions stay frozen; only a scale vector s is learned to
minimise the downstream KL of the spliced reconstruction:

    per = "latent":  x̂_s = (f ⊙ s) W_dec + b_dec                      s ∈ R^d_sae (one scale per latent)
    per = "output":  x̂_s = b_dec + s ⊙ (f W_dec)                        s ∈ R^d_in  (one scale per output dimension)

    minimise  E_tokens KL( P(· | x) ‖ P(· | x̂_s) )   over s, starting at s = 1 (the SAE as trained).

Both forms are written through `sae.decode`, so they hold for every architecture (x̂ − b_dec is linear in f).
The scales are fitted on contexts that the evaluation does not use (the train split; see `sae_eval`), so the KL the
evaluation then reports for the tuned SAE is a held-out figure, and the gap it closes is
(KL_sae − KL_tuned) / (KL_sae − KL_ε-random).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interplab.errors import InterplabError
from interplab.evals.configs import SCALE_PER
from interplab.evals.metrics import CleanLogProbs, clean_log_probs
from interplab.models.hooked import HookedModel, Prefix
from interplab.sae.base import SparseAutoencoder

class ScaleTuneResult(NamedTuple):
    """Learned decoder scales and the KL on the tuning tokens before and after."""

    scale: Tensor
    """[d_sae] (per latent) or [d_in] (per output), on the model's device."""
    per: str
    kl_before: float
    """Mean KL (BOS excluded) on the tuning tokens with s = 1."""
    kl_after: float
    """Mean KL on the tuning tokens with the learned s (a final pass, not the training average)."""
    history: list[float]
    """Mean training KL of each epoch."""
    n_tokens: int
    """Tuning tokens (BOS excluded)."""


def decode_scaled(sae: SparseAutoencoder, f: Float[Tensor, "... d_sae"], scale: Tensor,
                  per: str) -> Float[Tensor, "... d_in"]:
    """x̂_s for codes `f` (see the module docstring); s = 1 gives `sae.decode(f)` exactly."""
    if per == "latent":
        return sae.decode(f * scale)
    if per == "output":
        bias = sae.decode(torch.zeros_like(f[..., :1, :]))  # b_dec, in whatever form the architecture keeps it
        return bias + scale * (sae.decode(f) - bias)
    raise InterplabError(f"scale per {per!r} is not valid; valid: {', '.join(SCALE_PER)}")


def _mean_kl(model: HookedModel, prefix: Prefix, clean: CleanLogProbs, x_hat: Tensor) -> Tensor:
    """Mean KL(clean ‖ spliced) over non-BOS positions, x̂ spliced after the clean BOS activation; differentiable
    (unlike `kl_and_ce_per_token`, which works in place): KL = Σ_v p_v log p_v − Σ_v p_v log q_v."""
    spliced = torch.cat([prefix.act[:, :1], x_hat.to(prefix.act.dtype)], dim=1)
    logq = model.run_suffix(prefix, spliced).to(clean.logp.dtype).log_softmax(-1)     # [B T d_vocab]
    kl = clean.p_log_p - (clean.p * logq).sum(-1)                                      # [B T]
    return kl[:, 1:].mean()


def tune_decoder_scale(model: HookedModel, sae: SparseAutoencoder, hook: str, contexts: Sequence[Tensor], *,
                       per: str = "latent", epochs: int = 4, lr: float = 0.01, batch_size: int = 8, seed: int = 0,
                       progress: bool = True) -> ScaleTuneResult:
    """Learn the decoder scales by Adam on KL(clean ‖ spliced x̂_s), one step per batch of `contexts` ([T] token ids).

    Each batch's prefix and codes are computed once (the encoder is frozen); every step reruns the clean suffix (its
    log-probs are too large to keep for all batches) and the spliced suffix with gradients for s only.
    """
    if per not in SCALE_PER:
        raise InterplabError(f"--scale-tune-per {per!r} is not valid; valid: {', '.join(SCALE_PER)}")
    if epochs < 1 or lr <= 0:
        raise InterplabError(f"scale tuning needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    if not contexts:
        raise InterplabError("scale tuning got no contexts: the corpus's train split is empty at this ctx_len")
    device = model.device
    batches = []
    with torch.no_grad():
        for i in range(0, len(contexts), batch_size):
            prefix = model.run_prefix(torch.stack(list(contexts[i:i + batch_size])).to(device), hook)
            batches.append((prefix, sae.encode(prefix.act[:, 1:].float())))        # codes f: [B T-1 d_sae]
    width = sae.cfg.d_sae if per == "latent" else sae.cfg.d_in
    scale = torch.ones(width, device=device, requires_grad=True)
    opt = torch.optim.Adam([scale], lr=lr)
    order = torch.Generator().manual_seed(seed)
    history: list[float] = []
    bar = tqdm(total=epochs * len(batches), desc=f"tune decoder scale (per {per})", disable=not progress)
    for _ in range(epochs):
        total = 0.0
        for j in torch.randperm(len(batches), generator=order).tolist():
            prefix, f = batches[j]
            with torch.no_grad():
                clean_lp = clean_log_probs(model.run_suffix(prefix, prefix.act))
            with torch.enable_grad():
                loss = _mean_kl(model, prefix, clean_lp, decode_scaled(sae, f, scale, per))
                # autograd.grad, not backward: only s gets a gradient, the model's parameters are never touched
                (grad,) = torch.autograd.grad(loss, [scale])
            scale.grad = grad
            opt.step()
            total += loss.item()
            bar.update(1)
            bar.set_postfix(kl=f"{loss.item():.4f}")
        history.append(total / len(batches))
    bar.close()
    scale = scale.detach()
    kl_before = kl_after = 0.0
    with torch.no_grad():  # a final pass: the KL at s = 1 and at the learned s, weighted by tokens
        for prefix, f in batches:
            clean_lp = clean_log_probs(model.run_suffix(prefix, prefix.act))
            n = f.shape[0] * f.shape[1]
            kl_before += n * _mean_kl(model, prefix, clean_lp, sae.decode(f)).item()
            kl_after += n * _mean_kl(model, prefix, clean_lp, decode_scaled(sae, f, scale, per)).item()
    n_tokens = sum(f.shape[0] * f.shape[1] for _, f in batches)
    return ScaleTuneResult(scale, per, kl_before / n_tokens, kl_after / n_tokens, history, n_tokens)
