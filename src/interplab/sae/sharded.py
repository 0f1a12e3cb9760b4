"""`ShardedTopKSAE`: a TopK SAE whose latents are split over the ranks of a torchrun job (tensor parallelism).

For dictionaries too large for one device. With W ranks and m = d_sae / W, rank r holds latents [r·m, (r+1)·m):

    W_enc[:, r·m:(r+1)·m]  (column-parallel encoder)     b_enc[r·m:(r+1)·m]
    W_dec[r·m:(r+1)·m]     (row-parallel decoder)        b_dec  (replicated)

Every rank sees the same full batch x. One training step (parallel_ops.py has the two autograd ops):

    x_in  = copy_to_ranks(x − b_dec)                       backward: all-reduce of ∂L/∂x_in   [batch d_in]
    pre_r = x_in W_enc,r + b_enc,r                          local  [batch m]
    f_r   = ReLU(pre_r) on the token's global top k         all-gather of local top-k values  [batch W·k]
    x̂     = sum_over_ranks(f_r W_dec,r) + b_dec             all-reduce                         [batch d_in]
    L     = mean_b ‖x_b − x̂_b‖² + α · AuxK                  the same on every rank

AuxK is TopKSAE's: the top min(aux_k, n_dead) pre-activations among dead latents per token (no ReLU), selected over
all ranks, ê = sum_over_ranks(z_aux,r W_dec,r) (no bias) and AuxK = mean_b ‖e_b − ê_b‖² with e = x − x̂ detached.
Since L is replicated, the gradients of the replicated b_dec agree on all ranks and no gradient all-reduce is
needed: each rank runs its own (e.g. fused Adam) optimiser on its own parameters, which is exactly the unsharded
update, Adam being element-wise.

The local products are dense ([batch, m] pre-activations with gradients, f_r dense with zeros): simple and exact.
The sparse kernels of topk.py (kernels.sparse_encode / sparse_decode on the locally selected pairs) could replace
them to cut the backward cost from O(batch·m·d_in) to O(batch·k·d_in).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.sae.base import (
    TrainOutput,
    initialize_from_sample,
    normalize_rows_,
    remove_parallel_component_,
    set_tied_directions_,
)
from interplab.sae.config import SAEConfig
from interplab.sae.parallel_ops import all_reduce_sum, copy_to_ranks, global_topk, sum_over_ranks
from interplab.sae.topk import TopKSAE

INIT_CHUNK_ELEMENTS = 1 << 22
"""The seeded decoder initialisation draws the full [d_sae, d_in] matrix in blocks of about this many numbers
(16 MiB) and keeps this rank's rows, so no rank ever holds the whole matrix."""


class ShardedTopKSAE(nn.Module):
    """Rank `rank`'s slice of a TopK SAE split over `world_size` ranks; equal, as a whole, to the unsharded TopKSAE."""

    def __init__(self, cfg: SAEConfig, rank: int, world_size: int):
        super().__init__()
        cfg.validate()
        if cfg.arch != "topk":
            raise InterplabError(f"ShardedTopKSAE implements arch 'topk' only, the config says {cfg.arch!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise InterplabError(f"rank={rank}, world_size={world_size}: expected integers with 0 <= rank < world_size")
        if cfg.d_sae % world_size:
            raise InterplabError(f"d_sae={cfg.d_sae} is not divisible by world_size={world_size}: every rank must "
                                 "hold the same number of latents")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.m = cfg.d_sae // world_size
        """Latents on this rank: global latents [rank·m, (rank+1)·m)."""
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, self.m))
        self.b_enc = nn.Parameter(torch.zeros(self.m))
        self.W_dec = nn.Parameter(torch.empty(self.m, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self._init_directions(seed=0)

    @property
    def latents(self) -> slice:
        """This rank's latents as a slice of the global latent axis."""
        return slice(self.rank * self.m, (self.rank + 1) * self.m)

    # ---- building and gathering -------------------------------------------------------------------------------
    @classmethod
    def from_full(cls, sae: TopKSAE, rank: int, world_size: int) -> "ShardedTopKSAE":
        """This rank's slice of an unsharded TopKSAE (on the full SAE's device and dtype)."""
        if type(sae).arch != "topk":
            raise InterplabError(f"from_full needs a TopKSAE, got {type(sae).__name__} (arch {type(sae).arch!r})")
        out = cls(sae.cfg, rank, world_size).to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        s = out.latents
        with torch.no_grad():
            out.W_enc.copy_(sae.W_enc[:, s])
            out.b_enc.copy_(sae.b_enc[s])
            out.W_dec.copy_(sae.W_dec[s])
            out.b_dec.copy_(sae.b_dec)
        return out

    @torch.no_grad()
    def gather_full(self) -> TopKSAE | None:
        """The whole SAE on rank 0 (on the CPU, in this module's dtype); None on the other ranks.

        Slices travel one rank at a time by point-to-point send/recv, so rank 0's device never holds more than
        its own slice plus one other; only its CPU memory holds the whole dictionary. Every rank must call this.
        """
        self._check_group()
        import torch.distributed as dist

        full = TopKSAE(self.cfg).to(self.W_dec.dtype) if self.rank == 0 else None
        m = self.m
        for name in ("W_enc", "b_enc", "W_dec"):
            local = getattr(self, name).detach()
            local = local.T.contiguous() if name == "W_enc" else local.contiguous()  # latents on dim 0
            if full is not None:
                dest = getattr(full, name).detach()
                dest = dest.T if name == "W_enc" else dest                          # a view: writes land in full
                dest[:m] = local.cpu()
            for src in range(1, self.world_size):
                if self.rank == src:
                    dist.send(local, dst=0)
                elif full is not None:
                    buf = torch.empty_like(local)
                    dist.recv(buf, src=src)
                    dest[src * m:(src + 1) * m] = buf.cpu()
        if full is not None:
            full.b_dec.copy_(self.b_dec.detach().cpu())
        return full

    # ---- initialisation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_directions(self, seed: int) -> None:
        """This rank's rows of SparseAutoencoder._init_directions: W_dec = seeded random unit rows, W_enc = W_dec.T.

        The full [d_sae, d_in] normal matrix is drawn in row blocks from one generator and only this rank's rows
        are kept. torch's CPU normal sampler turns consecutive blocks of 16 uniform draws into 16 normals (and
        redraws the last 16 numbers of a request whose size is not a multiple of 16), so blocks holding a multiple
        of 16 numbers, the last one ending at the end of the matrix and holding at least 16, reproduce exactly
        the numbers of one torch.randn(d_sae, d_in) call (checked by the tests).
        """
        d_sae, d_in = self.cfg.d_sae, self.cfg.d_in
        g = torch.Generator().manual_seed(seed)
        rows_per_block = 16 * max(1, INIT_CHUNK_ELEMENTS // (16 * d_in))  # a multiple of 16 rows: 16·d_in numbers
        lo, hi = self.latents.start, self.latents.stop
        kept = []
        start = 0
        while start < hi:
            stop = min(start + rows_per_block, d_sae)
            if stop < d_sae and (d_sae - stop) * d_in < 16:  # a last block under 16 numbers joins this one
                stop = d_sae
            block = torch.randn(stop - start, d_in, generator=g, dtype=torch.float32)
            if stop > lo:
                kept.append(block[max(lo - start, 0):min(hi, stop) - start])
            start = stop
        set_tied_directions_(self, torch.cat(kept))

    @torch.no_grad()
    def initialize(self, sample: Float[Tensor, "n d_in"], *, b_dec_init: str = "mean", seed: int = 0) -> None:
        """SparseAutoencoder.initialize of the full SAE, then sliced: this rank's seeded unit decoder rows,
        W_enc = W_dec.T, b_enc = 0, and b_dec the sample's mean / geometric median / zero (the same sample must be
        given on every rank, so that the replicated b_dec agrees). No communication."""
        initialize_from_sample(self, sample, b_dec_init=b_dec_init, seed=seed)

    # ---- the forward pass -------------------------------------------------------------------------------------
    def _check_group(self) -> None:
        """A sharded SAE of W > 1 ranks must run inside a matching process group, or it would compute on its
        slice alone without any error."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InterplabError(f"this ShardedTopKSAE is rank {self.rank} of {self.world_size} but no process group "
                                 "is initialised: launch with torchrun and call interplab.distributed.init() first")
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise InterplabError(f"this ShardedTopKSAE is rank {self.rank} of {self.world_size}, the process group "
                                 f"says rank {dist.get_rank()} of {dist.get_world_size()}")

    def _check_input(self, x: Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            raise InterplabError(f"expected activations of shape [..., {self.cfg.d_in}] (d_in), got {tuple(x.shape)}")
        self._check_group()

    def _copy(self, x: Tensor) -> Tensor:
        return copy_to_ranks(x) if self.world_size > 1 else x

    def _sum(self, partial: Tensor) -> Tensor:
        return sum_over_ranks(partial) if self.world_size > 1 else partial

    def pre_acts(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch m"]:
        """Local pre-activations x_in W_enc,r + b_enc,r with x_in = copy_to_ranks(x − b_dec) (b_dec subtracted
        only if cfg.subtract_b_dec), so that the backward pass sums every rank's gradient into x and b_dec."""
        x_in = x - self.b_dec if self.cfg.subtract_b_dec else x
        return self._copy(x_in) @ self.W_enc + self.b_enc

    def _select(self, pre: Float[Tensor, "batch m"]) -> Bool[Tensor, "batch m"]:
        """This rank's latents among each token's global top k (see parallel_ops.global_topk for the tie rule)."""
        return global_topk(pre.detach(), self.cfg.k, self.rank, self.world_size)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... m"]:
        """This rank's slice of TopKSAE.encode: ReLU of the pre-activations in each token's global top k."""
        self._check_input(x)
        lead = x.shape[:-1]
        pre = self.pre_acts(x.reshape(-1, self.cfg.d_in))                # [batch m]
        f = torch.where(self._select(pre), pre, 0.0).relu()
        return f.reshape(*lead, self.m)

    def decode(self, f: Float[Tensor, "... m"]) -> Float[Tensor, "... d_in"]:
        """x̂ = sum_over_ranks(f_r W_dec,r) + b_dec: the full reconstruction, the same on every rank."""
        return self._sum(f @ self.W_dec) + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))

    # ---- training -------------------------------------------------------------------------------------------
    def _aux_loss(self, pre: Float[Tensor, "batch m"], e: Float[Tensor, "batch d_in"],
                  dead_mask: Bool[Tensor, " m"] | None, n_dead: int) -> Float[Tensor, ""]:
        """α · mean_b ‖e_b − ê_b‖²: ê from each token's top min(aux_k, n_dead) dead pre-activations over all ranks."""
        k_aux = min(self.cfg.aux_k, n_dead)
        if k_aux == 0 or dead_mask is None:
            return torch.zeros((), device=pre.device, dtype=pre.dtype)
        masked = pre.detach().masked_fill(~dead_mask, -torch.inf)        # live latents never chosen
        chosen = global_topk(masked, k_aux, self.rank, self.world_size)  # [batch m]
        z = torch.where(chosen, pre, 0.0)                                # no ReLU: dead latents with pre < 0 learn
        e_hat = self._sum(z @ self.W_dec)                                # [batch d_in], no bias
        return self.cfg.aux_coefficient * (e_hat - e).pow(2).sum(-1).mean()

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " m"] | None = None,
    ) -> TrainOutput:
        """MSE + AuxK of TopKSAE.training_forward, computed across ranks.

        `dead_mask` is this rank's slice (its own latents); `sparsity_coefficient` is ignored (k fixes the
        sparsity). recon, loss, mse, aux_loss and l0 are global and the same on every rank; `fired` is this rank's
        slice [m]. Every rank must call this with the same x.
        """
        if x.ndim != 2:
            raise InterplabError(f"training_forward needs a batch of shape [batch, {self.cfg.d_in}], got "
                                 f"{tuple(x.shape)}")
        self._check_input(x)
        if dead_mask is not None:
            if dead_mask.shape != (self.m,):
                raise InterplabError(f"dead_mask must be this rank's slice of shape [{self.m}], got "
                                     f"{tuple(dead_mask.shape)}")
            dead_mask = dead_mask.to(device=x.device, dtype=torch.bool)
        pre = self.pre_acts(x)                                            # [batch m]
        f = torch.where(self._select(pre), pre, 0.0).relu()              # [batch m]
        recon = self.decode(f)                                            # [batch d_in]
        mse = (recon - x).pow(2).sum(-1).mean()
        active = f.detach() > 0
        n_dead_local = 0 if dead_mask is None else int(dead_mask.sum())
        counts = torch.tensor([float(active.sum()), float(n_dead_local)], dtype=torch.float64)
        n_active, n_dead = (all_reduce_sum(counts.to(x.device)) if self.world_size > 1 else counts).tolist()
        aux = self._aux_loss(pre, (x - recon).detach(), dead_mask, int(n_dead))
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        l0 = torch.tensor(n_active / x.shape[0], device=x.device, dtype=x.dtype)
        return TrainOutput(recon=recon, loss=mse + aux, mse=mse, sparsity_loss=zero, aux_loss=aux, l0=l0,
                           fired=active.any(0))

    # ---- training housekeeping ----------------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """SparseAutoencoder.before_optimizer_step on this rank's decoder rows: g_i ← g_i − (g_i·w_i) w_i/‖w_i‖²,
        which is row-wise, hence the same as on the whole decoder."""
        if self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise this rank's decoder rows to unit norm (as SparseAutoencoder.after_optimizer_step)."""
        normalize_rows_(self.W_dec)

    def extra_repr(self) -> str:
        return (f"d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, k={self.cfg.k}, rank={self.rank}, "
                f"world_size={self.world_size}, latents=[{self.latents.start}, {self.latents.stop})")


def communication_bytes(batch: int, d_in: int, k: int, world_size: int, dtype_bytes: int = 4, *,
                        aux_k: int = 0) -> dict[str, int]:
    """Bytes each rank sends in one ShardedTopKSAE training step (forward + backward), with ring collectives.

    A ring all-reduce of N numbers sends 2·(W−1)/W·N numbers per rank (reduce-scatter, then all-gather); a ring
    all-gather in which each rank contributes n numbers sends (W−1)·n per rank. Per step, with b = dtype_bytes:

        topk_gather            (W−1) · batch · k · b             forward: each rank's local top-k values
        recon_all_reduce       2 (W−1)/W · batch · d_in · b      forward: sum_over_ranks of the partial x̂
        input_grad_all_reduce  2 (W−1)/W · batch · d_in · b      backward: copy_to_ranks of ∂L/∂x_in
        aux_gather             (W−1) · batch · aux_k · b         forward, AuxK only: local top dead pre-activations
        aux_all_reduce         2 (W−1)/W · batch · d_in · b      forward, AuxK only: sum_over_ranks of ê
        counts                 2 (W−1)/W · 2 · 8                 two float64 counters (active latents, dead latents)

    so without AuxK  total ≈ (W−1) · batch · b · (4·d_in/W + k). `aux_k` is the number of dead latents AuxK
    uses per token, min(cfg.aux_k, n_dead) (0: no latent dead, AuxK idle). k and aux_k are assumed <= d_sae/W
    (a rank's candidate list is min(k, d_sae/W) wide). Data parallelism instead all-reduces the gradients,
    2 (W−1)/W · n_params · b per rank and step, independent of the batch.
    """
    W = world_size
    if W < 1 or min(batch, d_in, k, dtype_bytes) < 1 or aux_k < 0:
        raise InterplabError(f"communication_bytes needs positive sizes, got batch={batch}, d_in={d_in}, k={k}, "
                             f"world_size={W}, dtype_bytes={dtype_bytes}, aux_k={aux_k}")
    ring = 2 * (W - 1) / W
    out: dict[str, int] = {}
    out["topk_gather"] = (W - 1) * batch * k * dtype_bytes
    out["recon_all_reduce"] = round(ring * batch * d_in * dtype_bytes)
    out["input_grad_all_reduce"] = round(ring * batch * d_in * dtype_bytes)
    out["aux_gather"] = (W - 1) * batch * aux_k * dtype_bytes
    out["aux_all_reduce"] = round(ring * batch * d_in * dtype_bytes) if aux_k else 0
    out["counts"] = round(ring * 2 * 8)
    out["total"] = sum(out.values())
    return out
