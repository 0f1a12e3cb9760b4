"""`SparseAutoencoder`: the parameters, encode/decode and housekeeping every dictionary architecture shares.

Conventions (the same as SAELens, so that files move between the two unchanged):

    pre = (x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc        W_enc [d_in, d_sae], b_enc [d_sae]
    f   = activation(pre)                                            architecture-specific, f >= 0
    x̂   = f @ W_dec + b_dec                                          W_dec [d_sae, d_in], b_dec [d_in]

A subclass provides `encode` (inference semantics) and `training_forward` (the loss of its paper). The decoder of
every architecture except relu is kept at unit row norm: `before_optimizer_step` removes the gradient component
parallel to each row and `after_optimizer_step` renormalises, which together keep the rows on the unit sphere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch
from jaxtyping import Bool, Float
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.fileio import join, write_url_atomic
from interplab.runs import JSONDict, JSONValue
from interplab.sae.config import SAEConfig
from interplab.sae.layout import CFG_FILE, FORMAT_VERSION, SAELENS_ARCH, SAELENS_FORMAT_VERSION, SAELENS_WEIGHTS


class TrainOutput(NamedTuple):
    recon: Float[Tensor, "batch d_in"]
    """Reconstruction x̂ of the batch."""
    loss: Float[Tensor, ""]
    """Total loss to backprop: mse + sparsity_loss + aux_loss."""
    mse: Float[Tensor, ""]
    """Mean over tokens of the squared error summed over d_in (SAELens's convention)."""
    sparsity_loss: Float[Tensor, ""]
    """L1 or L0 term, already multiplied by its coefficient (0 for topk-style architectures)."""
    aux_loss: Float[Tensor, ""]
    """AuxK term times aux_coefficient (0 when no latent is dead or the architecture has none)."""
    l0: Float[Tensor, ""]
    """Mean number of active latents per token."""
    fired: Bool[Tensor, " d_sae"]
    """Which latents were active on at least one token of the batch (for dead-latent tracking)."""


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


class SparseAutoencoder(nn.Module):
    """A sparse dictionary x ≈ f(x) @ W_dec + b_dec with sparse, non-negative codes f(x)."""

    arch: ClassVar[str] = ""
    """The `SAEConfig.arch` this class implements."""
    decoder_constrained: ClassVar[bool] = True
    """Whether decoder rows are kept at unit norm during training."""

    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        if self.arch and cfg.arch != self.arch:
            raise InterplabError(f"{type(self).__name__} implements arch {self.arch!r}, the config says {cfg.arch!r}")
        self.cfg = cfg
        self.batch_ranks = 1
        """Data-parallel training: the ranks whose local batches make up one training batch. Batch-level choices
        (BatchTopK's selection and threshold) are then taken over all of them; the trainer sets it."""
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._init_directions(seed=0)

    # ---- the forward pass ---------------------------------------------------------------------------------
    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder pre-activations (x - b_dec) @ W_enc + b_enc (b_dec subtracted only if cfg.subtract_b_dec)."""
        if self.cfg.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc  # [... d_sae]

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Dense feature activations f(x) with inference semantics."""
        raise NotImplementedError

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """x̂ = f @ W_dec + b_dec."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        target: Float[Tensor, "batch d_in"] | None = None,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainOutput:
        """Reconstruction and loss of one training batch: encode x, decode, compare with `target` (default x).

        A transcoder is trained with target = the MLP's output for input x = the MLP's input: the MSE and the
        AuxK residual are taken against the target (`recon` predicts it), everything else reads x. A target that
        requires grad (a skip transcoder's y − x W_skip) receives its gradient ∂loss/∂target.
        `sparsity_coefficient` overrides cfg.l1_coefficient / cfg.l0_coefficient (the trainer warms it up);
        `dead_mask` marks the latents the AuxK loss may use.
        """
        raise NotImplementedError

    # ---- initialisation and training housekeeping ---------------------------------------------------------
    @torch.no_grad()
    def _init_directions(self, seed: int) -> None:
        """W_dec rows: random unit vectors from a seeded generator; W_enc = W_dec.T; b_enc = 0."""
        g = torch.Generator().manual_seed(seed)
        set_tied_directions_(self, torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=g, dtype=torch.float32))

    @torch.no_grad()
    def initialize(self, sample: Float[Tensor, "n d_in"], *, b_dec_init: str = "mean", seed: int = 0) -> None:
        """Initialise from a sample of training activations.

        b_dec = the sample's mean, or its geometric median (`b_dec_init="geometric_median"`, a few Weiszfeld
        iterations), or zero (`"zeros"`); W_dec rows random unit vectors (seeded); W_enc = W_dec.T; b_enc = 0.
        """
        initialize_from_sample(self, sample, b_dec_init=b_dec_init, seed=seed)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Decoder-constrained archs: remove from each W_dec row's gradient its component along the row.

        With unit rows w_i, the update g_i ← g_i − (g_i·w_i) w_i moves w_i tangentially to the unit sphere, so that
        the renormalisation after the step changes it as little as possible (Bricken et al. 2023).
        """
        if self.decoder_constrained and self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Decoder-constrained archs: renormalise every W_dec row to unit norm."""
        if self.decoder_constrained:
            normalize_rows_(self.W_dec)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Fold an input scaling into the weights: trained on x·s, the SAE afterwards reads raw x.

        With s = `scale`, the trained SAE computes on x·s
            pre = (x·s − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc
            x̂·s = f W_dec + b_dec  ⇒  x̂ = f (W_dec/s) + b_dec/s,
        so W_enc ← s·W_enc, W_dec ← W_dec/s, b_dec ← b_dec/s gives the same pre-activations (hence the same
        latents; thresholds and b_enc are unchanged) on raw x, and reconstructions in raw units. Without b_dec
        subtraction the first line is pre = x (s·W_enc) + b_enc, which the same rule covers. Decoder rows then
        have norm 1/s instead of 1: fold only once training is over.
        """
        if not scale > 0:
            raise InterplabError(f"fold_input_scale needs a positive scale, got {scale}")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @torch.no_grad()
    def reinit_latents(self, idx: Tensor, directions: Float[Tensor, "n d_in"], enc_scale: float) -> None:
        """Resample latents: W_dec[idx] = unit directions, W_enc[:, idx] = their transpose·enc_scale, b_enc[idx] = 0.

        The trainer should also reset the optimizer state of these latents.
        """
        idx = torch.as_tensor(idx, device=self.W_dec.device).long().flatten()
        if directions.shape != (idx.numel(), self.cfg.d_in):
            raise InterplabError(f"reinit_latents: directions must have shape [{idx.numel()}, {self.cfg.d_in}], "
                                 f"got {tuple(directions.shape)}")
        unit = directions.to(self.W_dec) / directions.norm(dim=1, keepdim=True).to(self.W_dec).clamp_min(1e-12)
        self.W_dec[idx] = unit
        self.W_enc[:, idx] = unit.T * enc_scale
        self.b_enc[idx] = 0.0

    # ---- files --------------------------------------------------------------------------------------------
    def save(self, path: str, *, metadata: Mapping[str, JSONValue] | None = None) -> None:
        """Save in the SAELens layout (`cfg.json` + `sae_weights.safetensors`, see files.py), loadable by sae_lens
        and by `interplab.sae.files.load_sae`. Each file is written atomically, the weights first: a folder whose
        cfg.json exists is complete."""
        cfg = self.cfg
        tensors = {name: getattr(self, name).detach() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if cfg.arch == "jumprelu":
            tensors["threshold"] = self.threshold.detach()
        elif cfg.arch in ("batchtopk", "matryoshka"):  # saved as the JumpReLU they are at inference
            tensors["threshold"] = self.threshold.detach().to(self.b_enc.dtype).expand(cfg.d_sae)
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}

        meta: JSONDict = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                          "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                          "hook_name": cfg.hook_name, "model_name": cfg.model}
        meta.update(metadata or {})
        ours: JSONDict = {"format": FORMAT_VERSION, **cfg.to_dict()}
        if cfg.arch in ("batchtopk", "matryoshka"):
            ours["threshold_updates"] = int(self.threshold_updates)
        saved: JSONDict = {
            "architecture": SAELENS_ARCH[cfg.arch],
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "dtype": _DTYPE_NAMES.get(self.W_enc.dtype, "float32"),
            "device": "cpu",
            "apply_b_dec_to_input": cfg.subtract_b_dec,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": meta,
            "interplab": ours,
        }
        if cfg.arch == "topk":
            saved.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
        write_url_atomic(join(path, SAELENS_WEIGHTS), save_safetensors(tensors))
        write_url_atomic(join(path, CFG_FILE), json.dumps(saved, indent=2).encode())

    # ---- helpers for subclasses ---------------------------------------------------------------------------
    @staticmethod
    def _mse(recon: Float[Tensor, "batch d_in"], x: Float[Tensor, "batch d_in"]) -> Float[Tensor, ""]:
        """Mean over tokens of the squared error summed over d_in."""
        return (recon - x).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"arch={self.cfg.arch}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"


@torch.no_grad()
def set_tied_directions_(sae: nn.Module, W: Float[Tensor, "d_sae d_in"]) -> None:
    """W_dec = W with unit rows, W_enc = W_decᵀ, b_enc = 0 (W is normalised in place)."""
    W /= W.norm(dim=1, keepdim=True)
    sae.W_dec.copy_(W)
    sae.W_enc.copy_(W.T)
    sae.b_enc.zero_()


@torch.no_grad()
def initialize_from_sample(sae: nn.Module, sample: Float[Tensor, "n d_in"], *, b_dec_init: str, seed: int) -> None:
    """`SparseAutoencoder.initialize` for any module with W_dec, b_dec and `_init_directions(seed)` (also the
    latent-sharded SAE, whose `_init_directions` draws only its own rows)."""
    d_in = sae.b_dec.shape[0]
    if sample.ndim != 2 or sample.shape[1] != d_in:
        raise InterplabError(f"initialize needs a sample of shape [n, {d_in}], got {tuple(sample.shape)}")
    if b_dec_init not in ("mean", "geometric_median", "zeros"):
        raise InterplabError(f"unknown b_dec_init {b_dec_init!r}; valid: mean, geometric_median, zeros")
    sae._init_directions(seed)
    sample = sample.to(sae.b_dec.device, torch.float32)
    if b_dec_init == "mean":
        sae.b_dec.copy_(sample.mean(0))
    elif b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample))
    else:
        sae.b_dec.zero_()


@torch.no_grad()
def remove_parallel_component_(grad: Float[Tensor, "n d"], W: Float[Tensor, "n d"]) -> None:
    """g_i ← g_i − (g_i·w_i) w_i / ‖w_i‖² for every row, in place (row-wise, so it applies to any slice of rows)."""
    parallel = torch.linalg.vecdot(grad, W, dim=1) / torch.linalg.vecdot(W, W, dim=1).clamp_min(1e-12)  # [n]
    grad.addcmul_(W, parallel[:, None], value=-1.0)


@torch.no_grad()
def normalize_rows_(W: Float[Tensor, "n d"]) -> None:
    """Every row of W to unit norm, in place."""
    W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def geometric_median(points: Float[Tensor, "n d"], iters: int = 20, eps: float = 1e-8) -> Float[Tensor, " d"]:
    """Weiszfeld's iteration for argmin_y Σ_n ‖points_n − y‖, started at the mean."""
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(eps)  # [n]
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * (y.norm() + eps):
            return y_new
        y = y_new
    return y
