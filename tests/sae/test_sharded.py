"""ShardedTopKSAE against the unsharded TopKSAE: one rank in-process, two ranks under torchrun, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interplab.sae.selection as selection
import interplab.sae.sharded as sharded_module
from interplab.errors import InterplabError
from interplab.sae import SAEConfig, TopKSAE, make_sae
from interplab.sae.parallel_ops import choose_global_topk
from interplab.sae.sae_run import ADAM_BETAS
from interplab.sae.sharded import ShardedTopKSAE, communication_bytes

DRIVER = Path(__file__).with_name("sharded_driver.py")
REPO = Path(__file__).resolve().parents[2]


def random_sae(cfg: SAEConfig, seed: int = 0) -> TopKSAE:
    """A float64 TopKSAE with every parameter random (non-zero biases exercise every gradient path)."""
    torch.manual_seed(seed)
    sae = make_sae(cfg).double()
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_()
    return sae


# ---- one rank, in-process ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("aux_path", ["no dead latents", "dense block", "sparse pairs"])
def test_single_rank_matches_topk_sae(aux_path, monkeypatch):
    # TopKSAE computes AuxK either on a dense block over the dead latents or with sparse kernels: check both
    monkeypatch.setattr(selection, "DENSE_AUX_RATIO", 100 if aux_path == "dense block" else 0)
    full = random_sae(SAEConfig(arch="topk", d_in=12, d_sae=48, k=4, aux_k=6))
    sharded = ShardedTopKSAE.from_full(full, 0, 1)
    x = torch.randn(40, 12, dtype=torch.float64)
    dead = None if aux_path == "no dead latents" else torch.rand(48) < 0.4
    ref, out = full.training_forward(x, dead_mask=dead), sharded.training_forward(x, dead_mask=dead)
    assert (out.aux_loss.item() > 0) == (dead is not None)
    for name in ("recon", "loss", "mse", "aux_loss", "l0"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    assert torch.equal(out.fired, ref.fired)
    ref.loss.backward()
    out.loss.backward()
    for name, p in full.named_parameters():
        torch.testing.assert_close(getattr(sharded, name).grad, p.grad, msg=name)
    # the decoder constraint, applied to the same gradients, and the inference path
    full.before_optimizer_step()
    sharded.before_optimizer_step()
    torch.testing.assert_close(sharded.W_dec.grad, full.W_dec.grad)
    with torch.no_grad():
        for sae in (full, sharded):
            sae.W_dec.mul_(1.5)
            sae.after_optimizer_step()
        torch.testing.assert_close(sharded.W_dec, full.W_dec)
        torch.testing.assert_close(sharded.encode(x[None]), full.encode(x[None]))
        torch.testing.assert_close(sharded(x), full(x))
    assert sharded.gather_full().state_dict().keys() == full.state_dict().keys()
    for name, value in sharded.gather_full().state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name


@pytest.mark.parametrize(("d_in", "d_sae", "world"), [(7, 40, 4), (1, 34, 2), (16, 64, 2)])
def test_initialize_equals_full_initialize_sliced(d_in, d_sae, world, monkeypatch):
    # small blocks, so that the decoder is drawn in several (for d_in=1, d_sae=34: 16 + 18 rows, the last 2 merged)
    monkeypatch.setattr(sharded_module, "INIT_CHUNK_ELEMENTS", 16 * d_in)
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=2)
    sample = torch.randn(50, d_in) * 3 + 1
    full = make_sae(cfg)
    default = full.state_dict()
    default = {n: v.clone() for n, v in default.items()}
    full.initialize(sample, b_dec_init="geometric_median", seed=5)
    for rank in range(world):
        part = ShardedTopKSAE(cfg, rank, world)
        s = part.latents
        assert torch.equal(part.W_dec, default["W_dec"][s]) and torch.equal(part.W_enc, default["W_enc"][:, s])
        part.initialize(sample, b_dec_init="geometric_median", seed=5)
        assert torch.equal(part.W_dec, full.W_dec[s]) and torch.equal(part.W_enc, full.W_enc[:, s])
        assert torch.equal(part.b_enc, full.b_enc[s]) and torch.equal(part.b_dec, full.b_dec)
        assert list(part.state_dict()) == ["W_enc", "b_enc", "W_dec", "b_dec"]


def test_communication_bytes_by_hand():
    # batch 2, d_in 3, k 1, W 2, 4-byte numbers. A ring all-reduce of N numbers sends 2·(W−1)/W·N = N of them:
    # 6 numbers = 24 bytes for x̂ (forward), 3 numbers = 12 bytes for the encoder's ∂L/∂b_dec (backward); the
    # all-gather sends the 2 local top-1 values (8 bytes); the float64 dead-latent counter 8 bytes
    assert communication_bytes(2, 3, 1, 2) == {"topk_gather": 8, "recon_all_reduce": 24, "input_grad_all_reduce": 12,
                                               "aux_gather": 0, "aux_all_reduce": 0, "counts": 8, "total": 52}
    # an input that requires grad: its [2, 3] gradient (24 bytes) is all-reduced instead of b_dec's
    assert communication_bytes(2, 3, 1, 2, input_grad=True)["input_grad_all_reduce"] == 24
    # with AuxK on 2 dead latents per token: 4 more gathered values, one more all-reduce of ê
    with_aux = communication_bytes(2, 3, 1, 2, aux_k=2)
    assert (with_aux["aux_gather"], with_aux["aux_all_reduce"], with_aux["total"]) == (16, 24, 92)
    assert communication_bytes(4096, 2304, 64, 1)["total"] == 0
    # W = 4: the ring all-reduce sends 2·3/4 = 1.5 N
    assert communication_bytes(2, 4, 1, 4, dtype_bytes=2)["recon_all_reduce"] == 1.5 * 8 * 2


def test_choose_global_topk_by_hand():
    # one rank's candidates in latent order: k = 3 keeps 3.0, 2.0 and, of the four tied at 1.0, the first one;
    # a -inf padding slot is never chosen; the returned values are the chosen ones
    values = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 1.0], [0.5, -torch.inf, 4.0, -1.0, 2.0, 0.0]])
    mine, top = choose_global_topk(values, 3, 0, 1)
    assert mine.tolist() == [[True, True, False, True, False, False], [True, False, True, False, True, False]]
    assert sorted(top[0].tolist()) == [1.0, 2.0, 3.0] and sorted(top[1].tolist()) == [0.5, 2.0, 4.0]
    # as many candidates as k: all chosen
    assert choose_global_topk(values[:, :3], 3, 0, 1)[0].all()


def backward_graph_shapes(loss: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(node, shape) of every gradient the backward pass of `loss` will compute: each autograd node's inputs."""
    seen, shapes, stack = set(), [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        shapes += [(type(node).__name__, tuple(meta.shape)) for meta in node._input_metadata]
        stack += [fn for fn, _ in node.next_functions]
    return shapes


@pytest.mark.parametrize("dead", [0, 20, 200])  # AuxK off, on a dense block of 20 dead latents, on sparse pairs
def test_training_graph_has_no_dense_latent_tensor(dead):
    # batch 64, m 256: a dense [batch, m] tensor has 16,384 numbers, more than any parameter (W_enc: 2,048), the
    # k-sparse codes (256 pairs) or the AuxK pairs (64 · 16). No gradient that size may flow in training.
    cfg = SAEConfig(arch="topk", d_in=8, d_sae=256, k=4, aux_k=16)
    sae = ShardedTopKSAE.from_full(random_sae(cfg), 0, 1)
    x = torch.randn(64, 8, dtype=torch.float64)
    dead_mask = torch.zeros(256, dtype=torch.bool)
    dead_mask[torch.randperm(256)[:dead]] = True
    out = sae.training_forward(x, dead_mask=dead_mask)
    if not hasattr(out.loss.grad_fn, "_input_metadata"):
        pytest.skip("this torch has no Node._input_metadata")
    assert (out.aux_loss.item() > 0) == (dead > 0)
    shapes = backward_graph_shapes(out.loss)
    big = [(name, shape) for name, shape in shapes if torch.Size(shape).numel() >= 64 * 256]
    assert big == [], big
    assert ("_SparseEncodeBackward", (64 * 4,)) in shapes          # the walk reached the sparse encoder
    # the walk does see dense [batch, m] tensors where there are some: the inference path, with gradients
    assert ("ReluBackward0", (64, 256)) in backward_graph_shapes(sae(x).sum())


def test_input_gradient_matches_unsharded(monkeypatch):
    # an input that requires grad gets its gradient through copy_to_ranks(x − b_dec); TopKSAE's sparse AuxK path
    # gives x its AuxK gradient as well (its dense-block path does not), so compare with that one
    monkeypatch.setattr(selection, "DENSE_AUX_RATIO", 0)
    full = random_sae(SAEConfig(arch="topk", d_in=12, d_sae=48, k=4, aux_k=6))
    sharded = ShardedTopKSAE.from_full(full, 0, 1)
    x = torch.randn(40, 12, dtype=torch.float64)
    dead = torch.rand(48) < 0.4
    grads = []
    for sae in (full, sharded):
        x_req = x.clone().requires_grad_()
        sae.training_forward(x_req, dead_mask=dead).loss.backward()
        grads.append((x_req.grad, sae.b_dec.grad))
    torch.testing.assert_close(grads[1], grads[0])


# ---- two ranks under torchrun --------------------------------------------------------------------------------------
STEPS, BATCH = 50, 64
CFG = SAEConfig(arch="topk", d_in=16, d_sae=64, k=4, aux_k=8)


def dead_masks() -> list[torch.Tensor | None]:
    """No dead latents for 25 steps; then 17 dead on both ranks (AuxK picks the top 8 of them); then 3 dead, all on
    rank 1 (rank 0 has none but still takes part in AuxK)."""
    both = torch.zeros(CFG.d_sae, dtype=torch.bool)
    both[[1, 6, 13, 20, 31, 32, 35, 38, 40, 44, 47, 50, 53, 57, 59, 62, 63]] = True
    rank1 = torch.zeros(CFG.d_sae, dtype=torch.bool)
    rank1[[33, 47, 60]] = True
    return [None] * 25 + [both] * 13 + [rank1] * 12


def reference_training(full: TopKSAE, batches: torch.Tensor, masks: list, lr: float) -> list:
    """The unsharded TopKSAE trained as SAERun.train_step does (fused Adam, decoder constraint); its outputs."""
    optimizer = torch.optim.Adam(full.parameters(), lr=lr, betas=ADAM_BETAS, fused=True)
    outputs = []
    for x, dead in zip(batches, masks):
        out = full.training_forward(x, dead_mask=dead)
        out.loss.backward()
        full.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        full.after_optimizer_step()
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch of sharded_driver.py with 2 ranks, and the unsharded reference on the same batches."""
    tmp = tmp_path_factory.mktemp("sharded")
    gen = torch.Generator().manual_seed(1)
    full = random_sae(CFG, seed=1)
    batches = torch.randn(STEPS, BATCH, CFG.d_in, generator=gen, dtype=torch.float64) + 0.5
    lr, masks = 1e-3, dead_masks()
    torch.save({"cfg": CFG.to_dict(), "state": full.state_dict(), "lr": lr, "batches": batches, "dead_masks": masks},
               tmp / "in.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           str(tmp / "in.pt"), str(tmp / "out.pt")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    initial = {n: v.clone() for n, v in full.state_dict().items()}
    with torch.no_grad():
        selected = torch.zeros(BATCH, CFG.d_sae, dtype=torch.bool).scatter_(
            1, full.pre_acts(batches[0]).topk(CFG.k, dim=-1).indices, True)
    reference = reference_training(full, batches, masks, lr)
    with torch.no_grad():
        encoded, reconstructed = full.encode(batches[0]), full(batches[0])
    x = batches[0].clone().requires_grad_()

    ratio, selection.DENSE_AUX_RATIO = selection.DENSE_AUX_RATIO, 0  # TopKSAE's AuxK path that gives x a gradient
    try:
        full.training_forward(x, dead_mask=masks[30]).loss.backward()
    finally:
        selection.DENSE_AUX_RATIO = ratio
    full.zero_grad(set_to_none=True)
    return {"res": torch.load(tmp / "out.pt"), "ref": reference, "full": full, "initial": initial,
            "selected": selected, "encode": encoded, "forward": reconstructed, "input_grad": x.grad}


def test_two_ranks_select_the_unsharded_latents(two_ranks):
    got = two_ranks["res"]["selected"].bool()                      # [batch, d_sae], gathered over both ranks
    assert got.sum(1).tolist() == [CFG.k] * BATCH
    assert torch.equal(got, two_ranks["selected"])
    assert got[:, :32].any() and got[:, 32:].any()                 # both ranks contribute


def test_two_ranks_tie_rule(two_ranks):
    tie = two_ranks["res"]["tie"].bool()                           # k = 3, m = 32
    assert tie[0].nonzero().flatten().tolist() == [3, 5, 32]       # of four tied at the threshold: rank 0, index 3
    assert tie[1].sum() == 3 and tie[1, :32].sum() == 3            # all tied: rank 0 supplies the three


def test_two_ranks_outputs_match_unsharded(two_ranks):
    steps, ref = two_ranks["res"]["steps"], two_ranks["ref"]
    torch.testing.assert_close(steps[0]["recon"], ref[0].recon.detach(), rtol=0, atol=1e-12)
    for i, (got, want) in enumerate(zip(steps, ref)):
        for name in ("loss", "mse", "aux_loss", "l0"):
            assert got[name] == pytest.approx(getattr(want, name).item(), rel=1e-9, abs=1e-12), (i, name)
        assert torch.equal(got["fired"], want.fired), i
        assert got["loss_per_rank"][0] == got["loss_per_rank"][1]        # the loss is replicated exactly
    aux = [s["aux_loss"] for s in steps]
    assert all(a == 0 for a in aux[:25]) and all(a > 0 for a in aux[25:])  # AuxK active in both dead phases


def test_two_ranks_training_matches_unsharded(two_ranks):
    final, full, initial = two_ranks["res"]["final"], two_ranks["full"], two_ranks["initial"]
    b_dec_ranks = two_ranks["res"]["b_dec_per_rank"].reshape(2, CFG.d_in)
    assert torch.equal(b_dec_ranks[0], b_dec_ranks[1])             # the replicated bias stayed in sync
    for name, want in full.state_dict().items():
        assert (want - initial[name]).abs().max() > 1e-2, name     # training moved every parameter
        # float64 on both sides: only summation order differs (observed ~1e-16)
        torch.testing.assert_close(final[name], want, rtol=0, atol=1e-10 * want.abs().max().item(), msg=name)


def test_two_ranks_input_gradient_matches_unsharded(two_ranks):
    # x requires grad: its gradient is summed over ranks by copy_to_ranks(x − b_dec) (with AuxK active)
    want = two_ranks["input_grad"]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(two_ranks["res"]["input_grad"], want, rtol=0, atol=1e-8)


def test_two_ranks_inference_matches_unsharded(two_ranks):
    # encode (gathered over ranks) and forward of the trained sharded SAE on the first batch
    res = two_ranks["res"]
    torch.testing.assert_close(res["encode"], two_ranks["encode"], rtol=0, atol=1e-8)
    torch.testing.assert_close(res["forward"], two_ranks["forward"], rtol=0, atol=1e-8)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_rejects_other_architectures_and_uneven_splits():
    with pytest.raises(InterplabError, match="arch 'topk' only"):
        ShardedTopKSAE(SAEConfig(arch="batchtopk", d_in=4, d_sae=8, k=2), 0, 2)
    with pytest.raises(InterplabError, match="needs a TopKSAE"):
        ShardedTopKSAE.from_full(make_sae(SAEConfig(arch="batchtopk", d_in=4, d_sae=8, k=2)), 0, 2)
    with pytest.raises(InterplabError, match="d_sae=10 is not divisible by world_size=4"):
        ShardedTopKSAE(SAEConfig(arch="topk", d_in=4, d_sae=10, k=2), 0, 4)
    with pytest.raises(InterplabError, match="0 <= rank < world_size"):
        ShardedTopKSAE(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2), 2, 2)
    with pytest.raises(InterplabError, match="positive sizes"):
        communication_bytes(8, 4, 2, 0)


def test_rejects_bad_inputs():
    sae = ShardedTopKSAE(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2), 0, 1)
    with pytest.raises(InterplabError, match=r"\[\.\.\., 4\] \(d_in\), got \(3, 5\)"):
        sae.training_forward(torch.randn(3, 5))
    with pytest.raises(InterplabError, match="d_in"):
        sae.encode(torch.randn(2, 3, 5))
    with pytest.raises(InterplabError, match="d_in"):
        sae(torch.randn(5))
    with pytest.raises(InterplabError, match=r"shape \[batch, 4\]"):
        sae.training_forward(torch.randn(2, 3, 4))
    with pytest.raises(InterplabError, match=r"dead_mask must be this rank's slice of shape \[8\]"):
        sae.training_forward(torch.randn(3, 4), dead_mask=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(InterplabError, match=r"sample of shape \[n, 4\]"):
        sae.initialize(torch.randn(10, 3))
    with pytest.raises(InterplabError, match="unknown b_dec_init"):
        sae.initialize(torch.randn(10, 4), b_dec_init="median")


def test_rank_of_many_needs_a_process_group():
    part = ShardedTopKSAE(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2), 1, 2)
    with pytest.raises(InterplabError, match="rank 1 of 2 but no process group"):
        part.training_forward(torch.randn(3, 4))
    with pytest.raises(InterplabError, match="no process group"):
        part.gather_full()
