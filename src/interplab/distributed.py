"""Running under `torchrun`: which rank this process is, and the few collectives interplab uses.

`torchrun --nproc_per_node N -m interplab ...` starts N processes and gives each RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in its environment (several nodes: `--nnodes`, `--rdzv-endpoint`). Without those
variables a process is rank 0 of 1 and every collective below is a no-op, so the same code runs both ways.

Backends: gloo on CPU, NCCL for CUDA tensors (with gloo beside it for CPU-side barriers). When one rank dies,
torchrun stops the others; a rank blocked in a collective gets a `torch.distributed.DistError`, which the CLI
turns into a one-line message saying which step to `--resume` from.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from interplab.errors import InterplabError

T = TypeVar("T")

TIMEOUT = timedelta(minutes=int(os.environ.get("INTERPLAB_DIST_TIMEOUT_MIN", "30")))
"""How long a collective waits for the slowest rank before failing (INTERPLAB_DIST_TIMEOUT_MIN, default 30)."""


class Ranks(NamedTuple):
    """Where this process sits in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    """Rank on this node: the CUDA device this process uses."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files (manifests, checkpoints, final outputs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks() -> Ranks:
    """This process's rank, world size and local rank, from torchrun's environment variables."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InterplabError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
                             f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                             f"{os.environ.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise InterplabError(f"RANK={rank} with WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, world, local)


def rank_device(device: str | None) -> str:
    """The device this rank computes on: its own GPU (cuda:LOCAL_RANK) for None or 'cuda' when CUDA is there,
    else the CPU; any other `device` (an explicit 'cuda:1', 'cpu') as given."""
    if device not in (None, "cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{ranks().local_rank % torch.cuda.device_count()}"
    if device == "cuda":
        raise InterplabError("--device cuda was asked for, but torch sees no CUDA device")
    return "cpu"


def init(device: str | torch.device = "cpu") -> Ranks:
    """Join the torchrun job's process group (once; a no-op outside torchrun) and return this process's ranks."""
    r = ranks()
    if not r.distributed or dist.is_initialized():
        return r
    if "MASTER_ADDR" not in os.environ:
        raise InterplabError(f"WORLD_SIZE={r.world_size} but MASTER_ADDR is not set: launch with torchrun "
                             "--nproc_per_node N -m interplab ..., which sets both")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return r


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is in a process group of more than one rank (collectives do something)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min_(tensor: Tensor) -> Tensor:
    """Element-wise minimum of `tensor` over ranks, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_cat(tensor: Float[Tensor, "..."], dim: int = 0) -> Float[Tensor, "..."]:
    """Every rank's `tensor` (the same shape on all ranks) concatenated along `dim`, in rank order."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def gather_objects(obj: T) -> list[T] | None:
    """Every rank's `obj` in rank order on rank 0 (None on the other ranks); picklable objects."""
    if not active():
        return [obj]
    out: list[T] | None = [obj] * dist.get_world_size() if dist.get_rank() == 0 else None  # placeholders
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects; for small things such as a status or a config)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
