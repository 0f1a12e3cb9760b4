"""The tuned lens (Belrose et al. 2023): one affine translator per layer, trained so the lens matches the model.

Layer l's translator is T_l(h) = h + h A_l + s_l b_l (s_l a fixed scale, see `TunedLens`), with A_l = 0 and
b_l = 0 at the start (the identity: an untrained tuned lens is the logit lens). All layers' A_l sit in one
parameter [n_layers, d_model, d_model]. Training minimises Σ_l mean_t KL(p_t ‖ softmax(unembed(final_norm(
T_l(h_l,t))))) over the trained layers, on residuals cached once from a training corpus (see `lens.py` for p, the
KL and why position 0 is left out).

Choices (documented here because they change the numbers):
- the last layer is not trained by default: its logit lens is exact (KL 0), so at the identity the loss is at its
  minimum and the gradient is exactly 0; its translator stays the identity.
- AdamW, lr 3e-3, 32 tokens per step, 10% linear warm-up then cosine decay to 0, no weight decay. Belrose et al.
  used SGD with Nesterov momentum over hundreds of millions of tokens; a CPU budget is a few thousand tokens and
  ~100-200 steps, where Adam's per-parameter step sizes need no tuned momentum/lr pair. On SmolLM2 (4k tokens,
  layers 10 and 15) lr 3e-3 beat 1e-3 and 3e-4 and matched 1e-2; within a fixed token budget, more and smaller
  steps helped (held-out KL at 16 tokens/step 3.4/2.9 nats, at 32 3.8/3.3, at 128 ~6/5.5 in an earlier variant),
  so the budget goes to steps rather than batch size (32 by default: 16 was ~1.7× slower per token here).
- compute dtype: the unembedding matmuls run under autocast in `dtype` (bfloat16 by default: 1.6× faster than
  float32 on an AVX-512-BF16 CPU, with KL differing by ~1e-3 nats); the KL itself, the parameters and the optimiser
  are float32, and evaluation is always float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from safetensors.torch import load as load_bytes
from safetensors.torch import save
from torch import Tensor, nn
from tqdm.auto import tqdm

from interplab.dtypes import DTYPES
from interplab.errors import InterplabError
from interplab.fileio import open_url, write_url_atomic
from interplab.lens.evaluate import FinalDist, kl_to_final, layer_residuals, readout
from interplab.models.hooked import HookedModel

WEIGHTS_FILE, CONFIG_FILE = "tuned_lens.safetensors", "config.json"
MARKER = "interplab.tuned_lens"


class TunedLens(nn.Module):
    """Affine translators for every layer of one model, identity at the start:

        T_l(h) = h + h A_l + s_l b_l

    s_l, a fixed statistic of the training residuals (their RMS entry, `set_stats`), only sets the unit of b_l: A_l
    acts multiplicatively, so one optimiser step moves h A_l by about the same fraction of ‖h‖ at every layer, and
    s_l does the same for the bias (SmolLM2's residual RMS grows from ~5 to ~36 with depth).
    (Standardising h per dimension before A_l, which SmolLM2's outlier dimensions seemed to call for, trained
    markedly worse in our short-budget runs: mid-layer KL 6-7 against 3.3-3.8 nats with this form.)
    """

    def __init__(self, n_layers: int, d_model: int, *, spec: str = "", trained_layers: Sequence[int] = ()):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))
        self.register_buffer("scale", torch.ones(n_layers))
        self.spec = spec
        self.trained_layers = sorted(trained_layers)
        self.meta: dict[str, Any] = {}
        """What `save` writes beside the shapes: training settings, tokens, held-out KL per layer."""

    @classmethod
    def for_model(cls, model: HookedModel, trained_layers: Sequence[int] | None = None) -> "TunedLens":
        """An identity lens shaped for `model` on its device; trained_layers defaults to all but the last."""
        n = model.info.n_layers
        layers = list(range(n - 1)) if trained_layers is None else list(trained_layers)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise InterplabError(f"layers {bad} do not exist; {model.info.spec} has layers 0..{n - 1}")
        return cls(n, model.info.d_model, spec=model.info.spec, trained_layers=layers).to(model.device)

    def translate(self, resid: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """T_layer(resid) = resid + resid A_layer + s_layer b_layer."""
        return resid + resid @ self.A[layer].to(resid.dtype) + (self.scale[layer] * self.b[layer]).to(resid.dtype)

    @torch.no_grad()
    def set_stats(self, resid: Float[Tensor, "token layer d_model"]) -> None:
        """s_l = sqrt(mean h²) over the tokens and entries of layer l (call before training: it sets b's unit)."""
        self.scale.copy_(resid.float().pow(2).mean((0, 2)).sqrt().clamp_min(1e-6))

    __call__ = translate  # a TunedLens is a `Translate`

    def check_matches(self, model: HookedModel) -> None:
        """Raise an InterplabError naming what differs if this lens was not made for `model`'s shape."""
        n, d = self.A.shape[0], self.A.shape[1]
        got = (model.info.n_layers, model.info.d_model)
        if got != (n, d):
            raise InterplabError(f"tuned lens (trained for {self.spec or 'unknown model'}) has n_layers = {n}, "
                                 f"d_model = {d}, but {model.info.spec} has n_layers = {got[0]}, d_model = {got[1]}")

    # ---- files ---------------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Write `tuned_lens.safetensors` and `config.json` into `folder`, each atomically (weights first, so a
        config.json is only ever beside the weights it describes)."""
        root = folder.rstrip("/")
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in
                   (("A", self.A), ("b", self.b), ("scale", self.scale))}
        write_url_atomic(f"{root}/{WEIGHTS_FILE}", save(tensors, metadata={"format": "pt"}))
        config = {"interplab": MARKER, "model": self.spec, "n_layers": self.A.shape[0], "d_model": self.A.shape[1],
                  "trained_layers": self.trained_layers, **self.meta}
        write_url_atomic(f"{root}/{CONFIG_FILE}", (json.dumps(config, indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: str, model: HookedModel | None = None) -> "TunedLens":
        """Read a folder written by `save`; with `model`, check it fits that model and move it to its device."""
        root = folder.rstrip("/")
        fs, path = open_url(root)
        if not fs.exists(f"{path}/{CONFIG_FILE}") or not fs.exists(f"{path}/{WEIGHTS_FILE}"):
            raise InterplabError(f"{folder} is not a saved tuned lens (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = json.loads(fs.cat_file(f"{path}/{CONFIG_FILE}"))
        if config.get("interplab") != MARKER:
            raise InterplabError(f"{folder}/{CONFIG_FILE} is not a tuned-lens config (lacks the marker {MARKER})")
        tensors = load_bytes(fs.cat_file(f"{path}/{WEIGHTS_FILE}"))
        lens = cls(config["n_layers"], config["d_model"], spec=config.get("model", ""),
                   trained_layers=config.get("trained_layers", []))
        state = {**dict(lens.named_parameters()), **dict(lens.named_buffers())}
        if set(tensors) != set(state) or any(tensors[k].shape != v.shape for k, v in state.items()):
            raise InterplabError(f"{folder}: weights { {k: tuple(v.shape) for k, v in tensors.items()} } do not match "
                                 f"its config (n_layers {config['n_layers']}, d_model {config['d_model']})")
        with torch.no_grad():
            for name, value in state.items():
                value.copy_(tensors[name])
        lens.meta = {k: v for k, v in config.items()
                     if k not in ("interplab", "model", "n_layers", "d_model", "trained_layers")}
        if model is not None:
            lens.check_matches(model)
            lens = lens.to(model.device)
        return lens


# ---- training ------------------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """How a tuned lens is trained (saved in its config.json)."""

    epochs: int = 1
    """Passes over the cached training residuals."""
    batch_tokens: int = 32
    """Tokens per optimiser step (every trained layer sees the same tokens)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (10% linear warm-up, then cosine decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (it pulls A and b towards 0, i.e. towards the identity translator)."""
    dtype: str = "bfloat16"
    """Compute dtype of the readout matmuls during training (float32 or bfloat16); evaluation is float32."""
    seed: int = 0
    """Seed of the token order."""


@torch.no_grad()
def cache_residuals(
    model: HookedModel, batches: Sequence[Int[Tensor, "batch pos"]], progress: Callable[[int], None] | None = None
) -> Float[Tensor, "token layer d_model"]:
    """Every layer's residual at positions >= 1 of every context, on the model's device in float32
    ([tokens, n_layers, d_model]: 16k SmolLM2 tokens take 1.1 GB). The last layer's gives the model's p."""
    chunks = []
    for tokens in batches:
        resid, _ = layer_residuals(model, tokens, logits=False)
        chunks.append(resid[:, :, 1:].flatten(1, 2).transpose(0, 1).float())
        if progress is not None:
            progress(chunks[-1].shape[0])
    if not chunks:
        raise InterplabError("no training tokens for the tuned lens")
    return torch.cat(chunks)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps (at least 1), then cosine decay to 0."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_tuned_lens(
    model: HookedModel,
    lens: TunedLens,
    resid: Float[Tensor, "token layer d_model"],
    settings: TrainSettings,
    *,
    progress: bool = True,
) -> list[float]:
    """Train `lens.trained_layers` on cached residuals (from `cache_residuals`); return the loss of every step
    (Σ over trained layers of the batch-mean KL, computed in the compute dtype).

    The optimiser holds copies of the trained layers' A_l, b_l only (written back at the end), so untrained layers
    cost nothing: no optimiser state, no gradient of the full [n_layers, d, d] stack at every layer.
    """
    lens.check_matches(model)
    if settings.dtype not in ("float32", "bfloat16"):
        raise InterplabError(f"tuned-lens training dtype {settings.dtype!r} is not float32 or bfloat16")
    if not lens.trained_layers:
        return []
    layers = torch.tensor(lens.trained_layers, device=resid.device)
    A = lens.A.detach()[layers].clone().requires_grad_()                              # [k d d]
    b = lens.b.detach()[layers].clone().requires_grad_()                              # [k d]
    scale = lens.scale[layers]
    n = resid.shape[0]
    steps_per_epoch = max(1, n // settings.batch_tokens)
    total = steps_per_epoch * settings.epochs
    opt = torch.optim.AdamW([A, b], lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    dtype = DTYPES[settings.dtype]
    losses: list[float] = []
    bar = tqdm(total=total, desc="tuned lens", unit="step", disable=not progress)
    # One autocast region for the whole loop: autocast caches its low-precision copy of the unembedding (a
    # parameter) only while the region lasts, and re-casting 28M weights every layer cost more than the matmul.
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(n, generator=gen).to(resid.device)
            idx = order[(step % steps_per_epoch) * settings.batch_tokens:][:settings.batch_tokens]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, settings.lr)
            batch = resid[idx]
            translated = batch[:, layers] + torch.einsum("tkd,kde->tke", batch[:, layers], A) + scale[:, None] * b
            losses.append(_step(model, translated, batch[:, -1]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    with torch.no_grad():
        lens.A[layers] = A.detach()
        lens.b[layers] = b.detach()
    return losses


def _step(model: HookedModel, translated: Float[Tensor, "token k d_model"], last: Float[Tensor, "token d_model"]) -> float:
    """Backpropagate Σ_l mean KL(p ‖ lens_l) into `translated` (the k trained layers' translated residuals).

    The readout runs one layer at a time behind a detached copy (memory: one [token, d_vocab] block at a time),
    then the collected gradients go through the translators in one backward pass. Runs inside the caller's
    autocast region; the model's own p is computed outside it, in float32.
    """
    with torch.no_grad(), torch.autocast(model.device.type, enabled=False):
        final = FinalDist.from_logits(readout(model, last))
    grads = torch.empty_like(translated)
    total = 0.0
    for i in range(translated.shape[1]):
        x = translated[:, i].detach().requires_grad_()
        loss = kl_to_final(readout(model, x), final).mean()
        # inputs=: only x's gradient, not the (frozen) unembedding's, which would cost another matmul
        loss.backward(inputs=[x])
        grads[:, i] = x.grad
        total += loss.item()
    translated.backward(grads)
    return total


def train_from_batches(
    model: HookedModel,
    batches: Sequence[Int[Tensor, "batch pos"]],
    settings: TrainSettings,
    *,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[TunedLens, list[float]]:
    """Cache the residuals of `batches`, train a fresh identity-initialised lens on them, return it and its losses."""
    lens = TunedLens.for_model(model, layers)
    resid = cache_residuals(model, batches)
    lens.set_stats(resid)
    losses = train_tuned_lens(model, lens, resid, settings, progress=progress)
    lens.meta.update({"train_tokens": resid.shape[0], "train": asdict(settings), "final_loss": losses[-1:]})
    return lens, losses
