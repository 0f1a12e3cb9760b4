"""Training transcoders: `training_forward(x, target=y)` for every architecture, and `sae train --target` (with
`--skip`) on a store holding an MLP's input and output, on planted truths: a sparse function of the input, a
planted linear skip map; bit-identity with the SAE path; resume; sweeps; stream mode; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interplab.activations.writer import StoreWriter
from interplab.errors import InterplabError
from interplab.sae.config import SAEConfig
from interplab.sae.files import load_sae
from interplab.sae.registry import make_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train
from interplab.sae.transcoder_files import load_transcoder

IN, OUT = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"
D, M, ACTIVE = 32, 64, 3
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


def planted_pairs(n: int, *, seed: int, skip: torch.Tensor | None = None, noise: float = 0.0, sparse: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x = Σ_j w_j e_j (+ dense noise), y = Σ_j w_j g_j (if `sparse`) + x @ skip (if given): ACTIVE of M features
    per token, each read along its own direction e_j and written along an unrelated direction g_j: y is a sparse
    function of x, plus a linear one."""
    dirs = torch.nn.functional.normalize(torch.randn(2, M, D, generator=torch.Generator().manual_seed(7)), dim=2)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n, M, generator=gen).argsort(1)[:, :ACTIVE]
    w = torch.zeros(n, M).scatter(1, chosen, 1 + torch.rand(n, ACTIVE, generator=gen))
    x = w @ dirs[0] + noise * torch.randn(n, D, generator=gen)
    y = (w @ dirs[1] if sparse else 0.0) + (x @ skip if skip is not None else 0.0)
    return x, y


def pair_store(path: Path, x: torch.Tensor, y: torch.Tensor, *, ctx_len: int = 16, per_shard: int = 16) -> str:
    """A complete store with the two hooks [contexts, ctx_len, D] at the same tokens, as one harvest writes them."""
    n_ctx = len(x) // ctx_len
    acts = {IN: x[:n_ctx * ctx_len].view(n_ctx, ctx_len, D), OUT: y[:n_ctx * ctx_len].view(n_ctx, ctx_len, D)}
    tokens = torch.arange(n_ctx * ctx_len).view(n_ctx, ctx_len) % 97
    with StoreWriter(str(path), config={"model": "planted"}, hooks=[IN, OUT],
                     shapes={h: (ctx_len, D) for h in (IN, OUT)}, contexts_per_shard=per_shard) as writer:
        writer.add(acts, tokens)
        writer.finish()
    return str(path)


def config(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, hook=IN, target=OUT, arch="topk", k=[3], expansion=[2], tokens=2048, batch_size=128,
                lr=1e-2, log_every=4, checkpoint_every=0, exclude_bos=False, out=str(out))
    return TrainConfig(**{**base, **kw})


def fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    x, y = planted_pairs(4096, seed=1)
    return pair_store(tmp_path_factory.mktemp("pairs") / "acts", x, y)


# ---- training_forward with a target ---------------------------------------------------------------------------
def sae(arch: str, **kw):
    torch.manual_seed(0)
    model = make_sae(SAEConfig(arch=arch, d_in=8, d_sae=24, k=3, aux_k=4, matryoshka_prefixes=[6, 24]
                               if arch == "matryoshka" else None, **kw))
    model.initialize(torch.randn(64, 8), b_dec_init="mean")
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_target_equal_to_the_input_is_the_sae_path_bit_for_bit(arch):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    dead = torch.arange(24) % 3 == 0
    runs = []
    for target in (None, x.clone()):
        model = sae(arch)
        out = model.training_forward(x, target=target, dead_mask=dead)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = runs
    for field in ("recon", "loss", "mse", "sparsity_loss", "aux_loss", "l0", "fired"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("arch", ("relu", "topk", "batchtopk", "jumprelu"))
def test_the_loss_compares_the_reconstruction_with_the_target_and_sends_it_its_gradient(arch):
    """mse = mean_b ‖x̂_b − y_b‖² with x̂ computed from x alone, and ∂loss/∂y = (2/B)(y − x̂) (the sparsity and AuxK
    terms do not involve y), for the fused ReLU/JumpReLU steps as for the autograd TopK ones."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) * 3
    model = sae(arch, apply_b_dec_to_input=False)
    target = y.clone().requires_grad_()
    out = model.training_forward(x, target=target, dead_mask=torch.arange(24) % 2 == 0)
    out.loss.backward()
    with torch.no_grad():
        alone = model.training_forward(x, dead_mask=torch.arange(24) % 2 == 0)
    assert torch.allclose(out.recon, alone.recon, atol=1e-6)  # the reconstruction reads x only
    assert torch.allclose(out.mse, (out.recon - y).pow(2).sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(target.grad, 2 / 40 * (y - out.recon.detach()), atol=1e-6)


# ---- the trainer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kw", [("topk", {}), ("relu", {"l1_coefficient": [0.3]}), ("batchtopk", {})])
def test_a_transcoder_recovers_a_planted_sparse_function(store, tmp_path, arch, kw):
    """16 passes over the store; held-out FVU far below the best affine map's (0.47: y is not linear in x)."""
    result = train(config(store, tmp_path / "run", arch=arch, expansion=[4], tokens=65536, **kw), progress=False)
    name = result.names[0]
    saved = load_transcoder(str(tmp_path / "run" / name))
    x, y = planted_pairs(2048, seed=99)  # held out
    affine = torch.cat([x, torch.ones(len(x), 1)], 1)
    with torch.no_grad():
        assert fvu(affine @ torch.linalg.lstsq(affine, y).solution, y) > 0.4  # the control
        assert fvu(saved(x), y) < 0.2
    assert (saved.in_hook, saved.out_hook, saved.layer) == (IN, OUT, 0)
    assert result.metrics[name]["target"] == OUT and result.metrics[name]["fvu"] < 0.2


def test_skip_transcoder_learns_a_planted_linear_map(tmp_path):
    """y = x @ S on inputs with dense noise (which 3 latents per token cannot carry): W_skip (zero at the start)
    must become S; the transcoder without --skip cannot get there (the control)."""
    skip = torch.randn(D, D, generator=torch.Generator().manual_seed(11)) / D**0.5
    x, y = planted_pairs(4096, seed=2, skip=skip, noise=0.5, sparse=False)
    store = pair_store(tmp_path / "acts", x, y)
    runs = {flag: train(config(store, tmp_path / str(flag), skip=flag, tokens=16384), progress=False)
            for flag in (True, False)}
    with_skip, without = (load_transcoder(str(tmp_path / str(flag) / runs[flag].names[0])) for flag in (True, False))
    assert without.W_skip is None
    x_test, y_test = planted_pairs(2048, seed=98, skip=skip, noise=0.5, sparse=False)
    with torch.no_grad():
        assert float((with_skip.W_skip - skip).norm() / skip.norm()) < 0.05
        assert fvu(with_skip(x_test), y_test) < 0.01 < 0.2 < fvu(without(x_test), y_test)


@pytest.mark.parametrize("arch", ("relu", "jumprelu"))
def test_a_transcoder_run_towards_a_copy_of_the_input_equals_the_sae_run(tmp_path, arch):
    """The store holds the same activations at both hooks: the transcoder run (input → copy) and the SAE run on the
    input see the same batches and end with the same weights, bit for bit (relu and jumprelu read x itself, as a
    transcoder does; topk-style SAEs subtract b_dec from their input, which a transcoder cannot)."""
    x, _ = planted_pairs(2048, seed=4)
    store = pair_store(tmp_path / "acts", x, x)
    sae_run = train(config(store, tmp_path / "sae", arch=arch, target=None), progress=False)
    train(config(store, tmp_path / "tc", arch=arch), progress=False)
    name = sae_run.names[0]
    as_sae, as_tc = load_sae(str(tmp_path / "sae" / name)), load_transcoder(str(tmp_path / "tc" / name))
    for p in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(as_sae, p), getattr(as_tc.sae, p)), p


def test_a_sweep_and_resume_end_bit_identical(store, tmp_path):
    kw = dict(k=[2, 4], skip=True, tokens=3072, checkpoint_every=3)
    whole = train(config(store, tmp_path / "whole", **kw), progress=False)

    def stop(t) -> None:
        if t.step == 7:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config(store, tmp_path / "cut", **kw), callback=stop, progress=False)
    resumed = train(config(store, tmp_path / "cut", resume=True, **kw), progress=False)
    assert resumed.resumed_from == 6 and whole.names == resumed.names == ["topk-k2-x2", "topk-k4-x2"]
    for name in whole.names:
        a, b = (load_transcoder(str(tmp_path / run / name)) for run in ("whole", "cut"))
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_stream_mode_reads_both_hooks_in_one_pass(tiny_gpt2_dir, tmp_path):
    cfg = TrainConfig(model=str(tiny_gpt2_dir), hook=IN, target=OUT, corpus="python-docs", ctx_len=16, tokens=1024,
                      batch_size=128, shuffle_buffer=256, k=[4], expansion=[2], lr=1e-2, device="cpu",
                      out=str(tmp_path / "o"))
    seen = []
    result = train(cfg, progress=False, callback=lambda t: seen.append(
        (t.batch / t.scale, t.target_batch / t.target_scale, t.source.model.model.transformer.h[0].mlp)))
    name = result.names[0]
    assert result.steps == 8 and len(seen) == 8
    x, y, mlp = seen[-1]  # every target row is the MLP applied to its input row: one pass gave both, in order
    with torch.no_grad():
        assert torch.allclose(mlp(x), y, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mlp(x.roll(1, 0)), y, rtol=1e-2)  # the control: rows matter
    saved = load_transcoder(str(tmp_path / "o" / name))
    assert (saved.in_hook, saved.out_hook, saved.sae.cfg.model) == (IN, OUT, str(tiny_gpt2_dir))


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"target": None, "skip": True}, "--skip adds a skip connection to a transcoder"),
    ({"target": IN}, "is --hook itself: that trains an SAE"),
    ({"hook": None}, "needs --hook"),
    ({"shard_latents": True}, "without --hooks, --synthetic and --shard-latents"),
])
def test_bad_target_options_are_refused_before_anything_is_written(store, tmp_path, kw, message):
    with pytest.raises(InterplabError, match=message):
        train(config(store, tmp_path / "o", **kw), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_target_of_another_width_or_not_in_the_store_is_refused(tmp_path):
    path = tmp_path / "acts"
    with StoreWriter(str(path), config={"model": "m"}, hooks=[IN, "blocks.0.hook_other"],
                     shapes={IN: (4, D), "blocks.0.hook_other": (4, 8)}, contexts_per_shard=4) as writer:
        writer.add({IN: torch.randn(8, 4, D), "blocks.0.hook_other": torch.randn(8, 4, 8)},
                   torch.zeros(8, 4, dtype=torch.int32))
        writer.finish()
    with pytest.raises(InterplabError, match="has width 8, --hook blocks.0.mlp.hook_in has 32"):
        train(config(str(path), tmp_path / "o", target="blocks.0.hook_other", batch_size=8), progress=False)
    with pytest.raises(InterplabError, match="unknown hook 'blocks.0.hook_mlp_out'"):
        train(config(str(path), tmp_path / "o", batch_size=8), progress=False)
    assert not (tmp_path / "o").exists()


def test_an_attention_pattern_target_is_refused(tiny_gpt2_dir, tmp_path):
    cfg = TrainConfig(model=str(tiny_gpt2_dir), hook=IN, target="blocks.0.attn.hook_pattern", corpus="python-docs",
                      ctx_len=16, tokens=128, batch_size=128, device="cpu", out=str(tmp_path / "o"))
    with pytest.raises(InterplabError, match="attention patterns"):
        train(cfg, progress=False)
    assert not (tmp_path / "o").exists()
