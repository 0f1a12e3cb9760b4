"""`ShardedTopKSAE`: a TopK SAE whose latents are split over the ranks of a torchrun job (tensor parallelism).

For dictionaries too large for one device. With W ranks and m = d_sae / W, rank r holds latents [r·m, (r+1)·m):

    W_enc[:, r·m:(r+1)·m]  (column-parallel encoder)     b_enc[r·m:(r+1)·m]
    W_dec[r·m:(r+1)·m]     (row-parallel decoder)        b_dec  (replicated)

Every rank sees the same full batch x. One training step (parallel_ops.py has the autograd ops and the selection):

    n_dead = Σ_r n_dead,r                                   all-reduce of one counter
    pre_r  = (x − b_dec) W_enc,r + b_enc,r                  local, dense, no grad, in row blocks (selection.py)
    S      = each token's top k over all ranks              all-gather of the local top-k values  [batch W·k]
    f_r    = ReLU(pre_r) on this rank's pairs of S          sparse_encode: gradients on those pairs only
    x̂      = Σ_r sparse_decode(f_r, W_dec,r) + b_dec        sum_over_ranks: all-reduce            [batch d_in]
    L      = mean_b ‖x_b − x̂_b‖² + α · AuxK                 the same on every rank

Past the dense no-grad pass, the decoder and both backward passes cost O(batch·k·d_in), as in TopKSAE. The
encoder reads b_dec through copy_to_ranks, whose backward sums every rank's gradient: one all-reduce of the
encoder's ∂L/∂b_dec [d_in] (of ∂L/∂(x − b_dec) [batch d_in] instead when x itself requires grad).

AuxK is TopKSAE's: the top min(aux_k, n_dead) pre-activations among dead latents per token (no ReLU), selected over
all ranks as S is, ê = sum_over_ranks(z_aux,r W_dec,r) (no bias) and AuxK = mean_b ‖e_b − ê_b‖² with e = x − x̂
detached. Since L is replicated, the gradients of the replicated b_dec agree on all ranks and no gradient
all-reduce is needed: each rank runs its own (e.g. fused Adam) optimiser on its own parameters, which is exactly the
unsharded update, Adam being element-wise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Bool, Float, Int
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
from interplab.sae.kernels import SparseCodes, dense_subset_encode, sparse_decode, sparse_encode
from interplab.sae.parallel_ops import (
    all_reduce_sum,
    choose_global_topk,
    copy_to_ranks,
    global_topk,
    sum_over_ranks,
)
from interplab.sae.selection import DenseAux, Selection, encode_select
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
    def _n_dead(self, dead_mask: Bool[Tensor, " m"] | None, device: torch.device) -> int:
        """Dead latents over all ranks (one all-reduce when W > 1, on every rank, whether or not it has any)."""
        count = torch.tensor([0.0 if dead_mask is None else float(dead_mask.sum())], dtype=torch.float64)
        return int(all_reduce_sum(count.to(device)) if self.world_size > 1 else count)

    def _encoder_inputs(self, x: Float[Tensor, "batch d_in"],
                        ) -> tuple[Float[Tensor, "batch d_in"], Float[Tensor, " d_in"] | None]:
        """What the sparse encoder reads, as (x, b_dec) for kernels.sparse_encode, through exactly one copy_to_ranks
        so that the backward pass issues one all-reduce on every rank: of the encoder's ∂L/∂b_dec [d_in] in
        training, or of ∂L/∂(x − b_dec) [batch d_in] when x itself requires grad."""
        if x.requires_grad:
            return self._copy(x - self.b_dec if self.cfg.subtract_b_dec else x), None
        return x, self._copy(self.b_dec) if self.cfg.subtract_b_dec else None

    def _pairs(self, mine: Bool[Tensor, "batch c"], values: Float[Tensor, "batch c"], idx: Int[Tensor, "batch c"],
               ) -> tuple[SparseCodes, Float[Tensor, " nnz"]]:
        """The chosen candidates (`values` at latents `idx`, rows in increasing latent order, -inf padding never
        chosen) as this rank's (token, latent) pairs grouped by token, and their pre-activations."""
        batch, c = mine.shape
        mine = mine & (values > -torch.inf)
        flat = mine.reshape(-1).nonzero().squeeze(1)                      # row-major: grouped by token
        counts = mine.sum(1)                                              # [batch]
        codes = SparseCodes(flat.div(c, rounding_mode="floor"), idx.reshape(-1)[flat], counts.cumsum(0) - counts,
                            batch, self.m)
        return codes, values.reshape(-1)[flat]

    def _aux_candidates(self, aux: tuple[SparseCodes, Tensor] | DenseAux | None, batch: int, width: int,
                        device: torch.device, dtype: torch.dtype,
                        ) -> tuple[Float[Tensor, "batch w"], Int[Tensor, "batch w"], Int[Tensor, "batch n"] | None]:
        """This rank's AuxK candidates (encode_select's top dead pre-activations, at most `width` per token) as
        values and latents [batch, width], each row in increasing latent order and padded with -inf; for a dense
        block, also where the candidates sit in it [batch, n]."""
        values = torch.full((batch, width), -torch.inf, device=device, dtype=dtype)
        idx = torch.zeros(batch, width, dtype=torch.long, device=device)
        pos = None
        if isinstance(aux, DenseAux):                                     # each token's top n of the dead
            n = min(width, aux.dead.numel())
            if n == aux.dead.numel():                                     # all of them
                pos = torch.arange(n, device=device).expand(batch, n)
            else:                                                         # nonzero lists columns in order
                pos = aux.mask.nonzero()[:, 1].view(batch, n)
            values[:, :n] = aux.values.gather(1, pos)
            idx[:, :n] = aux.dead[pos]                                    # dead is sorted: rows stay sorted
        elif aux is not None:
            n = aux[0].nnz // batch
            idx[:, :n], order = aux[0].cols.view(batch, n).sort(dim=-1)
            values[:, :n] = aux[1].view(batch, n).gather(1, order)
        return values, idx, pos

    def _aux_loss(self, x_enc: Float[Tensor, "batch d_in"], x_in: Float[Tensor, "batch d_in"],
                  b_dec: Float[Tensor, " d_in"] | None, e: Float[Tensor, "batch d_in"], sel: Selection, n_dead: int,
                  ) -> Float[Tensor, ""]:
        """α · mean_b ‖e_b − ê_b‖²: ê from each token's top min(aux_k, n_dead) dead pre-activations over all ranks,
        attached with the kernels TopKSAE uses (a dense block over this rank's dead latents when they are few)."""
        k_aux = min(self.cfg.aux_k, n_dead)
        if k_aux == 0:  # the same decision on every rank: n_dead is global
            return torch.zeros((), device=e.device, dtype=e.dtype)
        values, idx, pos = self._aux_candidates(sel.aux, e.shape[0], min(k_aux, self.m), e.device, e.dtype)
        mine, _ = choose_global_topk(values, k_aux, self.rank, self.world_size)
        if isinstance(sel.aux, DenseAux) and pos is not None and not x_enc.requires_grad:  # (no x gradient there)
            dead = sel.aux.dead
            mask = torch.zeros_like(sel.aux.mask).scatter_(1, pos, mine[:, :pos.shape[1]])
            chosen = torch.where(mask, sel.aux.values, 0.0)               # no ReLU: dead latents with pre < 0 learn
            z = dense_subset_encode(x_in, self.W_enc, self.b_enc, dead, chosen, mask, b_dec=b_dec)  # [batch n_dead]
            e_hat = z @ self.W_dec.index_select(0, dead)                  # [batch d_in], no bias
        else:  # pairs (none at all on a rank without dead latents)
            codes, pre = self._pairs(mine, values, idx)
            z = sparse_encode(x_enc, self.W_enc, self.b_enc, codes, b_dec=b_dec, values=pre, x_in=x_in)  # [nnz]
            e_hat = sparse_decode(z, self.W_dec, codes)                   # [batch d_in], no bias
        return self.cfg.aux_coefficient * (self._sum(e_hat) - e).pow(2).sum(-1).mean()

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
        slice [m]. Every rank must call this with the same x (requiring grad on all ranks or on none).
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
        n_dead = self._n_dead(dead_mask, x.device)
        k_aux = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            x_in = x - self.b_dec if self.cfg.subtract_b_dec else x        # [batch d_in]
            c = min(self.cfg.k, self.m)
            sel = encode_select(x_in, self.W_enc, self.b_enc, c, dead_mask=dead_mask if k_aux else None,
                                aux_k=min(k_aux, self.m))                  # the only dense product
            idx, order = sel.codes.cols.view(-1, c).sort(dim=-1)           # candidates by latent index
            values = sel.values.view(-1, c).gather(1, order)
        x_enc, b_dec = self._encoder_inputs(x)
        mine, top = choose_global_topk(values, self.cfg.k, self.rank, self.world_size)
        codes, pre = self._pairs(mine, values, idx)
        f = sparse_encode(x_enc, self.W_enc, self.b_enc, codes, b_dec=b_dec, values=pre, x_in=x_in).relu()  # [nnz]
        recon = self._sum(sparse_decode(f, self.W_dec, codes)) + self.b_dec  # [batch d_in]
        mse = (recon - x).pow(2).sum(-1).mean()
        aux = self._aux_loss(x_enc, x_in, b_dec, (x - recon).detach(), sel, n_dead)
        fired = torch.zeros(self.m, dtype=torch.bool, device=x.device)
        fired[codes.cols[f.detach() > 0]] = True
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        l0 = (top > 0).sum().to(x.dtype) / x.shape[0]  # every rank holds the global top k: no collective needed
        return TrainOutput(recon=recon, loss=mse + aux, mse=mse, sparsity_loss=zero, aux_loss=aux, l0=l0,
                           fired=fired)

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
                        aux_k: int = 0, input_grad: bool = False) -> dict[str, int]:
    """Bytes each rank sends in one ShardedTopKSAE training step (forward + backward), with ring collectives.

    A ring all-reduce of N numbers sends 2·(W−1)/W·N numbers per rank (reduce-scatter, then all-gather); a ring
    all-gather in which each rank contributes n numbers sends (W−1)·n per rank. Per step, with b = dtype_bytes:

        topk_gather            (W−1) · batch · k · b             forward: each rank's local top-k values
        recon_all_reduce       2 (W−1)/W · batch · d_in · b      forward: sum_over_ranks of the partial x̂
        input_grad_all_reduce  2 (W−1)/W · d_in · b              backward: the encoder's part of ∂L/∂b_dec
                               2 (W−1)/W · batch · d_in · b      instead, if x requires grad (input_grad=True)
        aux_gather             (W−1) · batch · aux_k · b         forward, AuxK only: local top dead pre-activations
        aux_all_reduce         2 (W−1)/W · batch · d_in · b      forward, AuxK only: sum_over_ranks of ê
        counts                 2 (W−1)/W · 8                     one float64 counter (dead latents)

    so without AuxK  total ≈ (W−1) · batch · b · (2·d_in/W + k). `aux_k` is the number of dead latents AuxK
    uses per token, min(cfg.aux_k, n_dead) (0: no latent dead, AuxK idle). k and aux_k are assumed <= d_sae/W
    (a rank's candidate list is min(k, d_sae/W) wide), and cfg.subtract_b_dec (the default; without it the
    encoder has no b_dec gradient to send). Data parallelism instead all-reduces the gradients,
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
    out["input_grad_all_reduce"] = round(ring * (batch if input_grad else 1) * d_in * dtype_bytes)
    out["aux_gather"] = (W - 1) * batch * aux_k * dtype_bytes
    out["aux_all_reduce"] = round(ring * batch * d_in * dtype_bytes) if aux_k else 0
    out["counts"] = round(ring * 8)
    out["total"] = sum(out.values())
    return out
