"""Run under torchrun by test_sharded.py: train a ShardedTopKSAE and record what the test compares.

    python -m torch.distributed.run --nproc_per_node 2 tests/sae/sharded_driver.py IN.pt OUT.pt

IN.pt (written by the test): cfg, the initial full TopKSAE state (float64), lr, batches [steps, batch, d_in] and one
full-width dead mask per step (or None). Rank 0 writes OUT.pt: the selection on the first batch, per-step outputs,
the tie-rule probe, the gradient of an input that requires grad, and the gathered final SAE.

AuxK runs on a dense block over a rank's dead latents when they are few, else on sparse pairs, each rank deciding
alone; the driver forces the sparse pairs on rank 1 at steps 1, 4, 7, ... and on both ranks at steps 2, 5, 8, ...
"""

from __future__ import annotations

import io
import sys

import torch
from jaxtyping import Float
from torch import Tensor

from interplab import distributed as D
from interplab.fileio import atomic_write, open_url
from interplab.sae import selection
from interplab.sae.config import SAEConfig
from interplab.sae.parallel_ops import all_gather_columns, global_topk
from interplab.sae.sae_run import ADAM_BETAS
from interplab.sae.sharded import ShardedTopKSAE
from interplab.sae.topk import TopKSAE


def gather(t: Float[Tensor, "batch c"]) -> Float[Tensor, "batch world_c"]:
    """Every rank's columns side by side (as float64: gloo all-gathers bools unreliably)."""
    return all_gather_columns(t.detach().to(torch.float64))


def tie_probe(rank: int, world: int, m: int) -> Tensor:
    """global_topk (k=3) on hand-made pre-activations with ties at the threshold; returns the gathered choice.

    Token 0: 3.0 at latent 5, 2.0 at latent m, and 1.0 at latents 16, 3 (rank 0), m+4, m+7 (rank 1): the rule keeps
    5, m and, of the four tied at 1.0, latent 3 (lowest rank, then lowest index; torch.topk lists 16 before 3 here,
    so the index rule is really exercised). Token 1: all equal, so rank 0 supplies all three.
    """
    pre = torch.full((2, world * m), -1.0, dtype=torch.float64)
    pre[0, [5, m, 16, 3, m + 4, m + 7]] = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    pre[1] = 0.0
    return gather(global_topk(pre[:, rank * m:(rank + 1) * m], 3, rank, world))


def main() -> None:
    in_path, out_path = sys.argv[1], sys.argv[2]
    r = D.init("cpu")
    spec = torch.load(in_path)
    cfg = SAEConfig.from_dict(spec["cfg"])
    full = TopKSAE(cfg).double()
    full.load_state_dict(spec["state"])
    sae = ShardedTopKSAE.from_full(full, r.rank, r.world_size)
    optimizer = torch.optim.Adam(sae.parameters(), lr=spec["lr"], betas=ADAM_BETAS, fused=True)
    batches, dead_masks = spec["batches"], spec["dead_masks"]

    res: dict = {"tie": tie_probe(r.rank, r.world_size, sae.m)}
    with torch.no_grad():
        res["selected"] = gather(sae._select(sae.pre_acts(batches[0])))
    steps: list[dict] = []
    dense_aux_ratio = selection.DENSE_AUX_RATIO
    for i, (x, dead) in enumerate(zip(batches, dead_masks)):
        sparse_aux = i % 3 == 2 or (i % 3 == 1 and r.rank == 1)
        selection.DENSE_AUX_RATIO = 0 if sparse_aux else dense_aux_ratio
        out = sae.training_forward(x, dead_mask=None if dead is None else dead[sae.latents])
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_optimizer_step()
        steps.append({"recon": out.recon.detach(), "loss": float(out.loss), "mse": float(out.mse),
                      "aux_loss": float(out.aux_loss), "l0": float(out.l0),
                      "fired": gather(out.fired[None]).bool()[0],
                      "loss_per_rank": gather(out.loss.reshape(1, 1))[0]})
    res["steps"] = steps
    selection.DENSE_AUX_RATIO = dense_aux_ratio
    x = batches[0].clone().requires_grad_()                       # AuxK on, the input's gradient summed over ranks
    sae.training_forward(x, dead_mask=dead_masks[30][sae.latents]).loss.backward()
    res["input_grad"] = x.grad
    sae.zero_grad(set_to_none=True)
    res["b_dec_per_rank"] = gather(sae.b_dec[None])
    with torch.no_grad():
        res["forward"] = sae(batches[0])
        res["encode"] = gather(sae.encode(batches[0]))
    gathered = sae.gather_full()
    if r.is_main:
        assert gathered is not None
        res["final"] = gathered.state_dict()
        buf = io.BytesIO()
        torch.save(res, buf)
        fs, path = open_url(out_path)
        atomic_write(fs, path, buf.getvalue())
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    main()
