"""Batch sources of the SAE trainer: resumable by batch index (store and stream), passes, hooks, NaN shards; and
synthetic mode, whose source the caller builds (interplab.synth.sources), so that the trainer never imports synth.

Also home of the synthetic-store helpers the other trainer tests import: activations that are sparse sums of
known unit directions, so that an SAE that learns has a ground truth to be measured against.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interplab.activations.store import NonFiniteShardError
from interplab.activations.writer import StoreWriter
from interplab.errors import InterplabError
from interplab.sae.files import load_sae
from interplab.sae.sources import StoreSource, StreamSource, open_source
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train
from interplab.synth.sources import synthetic_source
from interplab.synth.specs import make_generator

HOOK = "blocks.0.hook_resid_post"
D, N_FEATURES, ACTIVE = 32, 24, 2


def synthetic(n: int, *, d: int = D, seed: int = 1) -> torch.Tensor:
    """n activations [n, d]: each the sum of ACTIVE of N_FEATURES fixed random unit directions, weights in [1, 2)."""
    features = torch.nn.functional.normalize(torch.randn(N_FEATURES, d, generator=torch.Generator().manual_seed(1234)),
                                             dim=1)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n, N_FEATURES, generator=gen).argsort(1)[:, :ACTIVE]
    weights = torch.zeros(n, N_FEATURES).scatter(1, chosen, 1 + torch.rand(n, ACTIVE, generator=gen))
    return weights @ features


def synthetic_store(path: Path | str, *, n_contexts: int = 128, ctx_len: int = 16, per_shard: int = 16,
                    d: int = D, seed: int = 1, scale: float = 1.0, hooks: tuple[str, ...] = (HOOK,)) -> torch.Tensor:
    """Write a complete store of synthetic activations (the same at every hook); return them [contexts, ctx_len, d]."""
    x = synthetic(n_contexts * ctx_len, d=d, seed=seed).view(n_contexts, ctx_len, d) * scale
    tokens = torch.arange(n_contexts * ctx_len).view(n_contexts, ctx_len) % 50
    with StoreWriter(str(path), config={"model": "synthetic", "seed": seed}, hooks=list(hooks),
                     shapes={h: (ctx_len, d) for h in hooks}, contexts_per_shard=per_shard) as writer:
        writer.add({h: x for h in hooks}, tokens)
        writer.finish()
    return x


def poison_shard(path: Path, index: int) -> None:
    """Rewrite shard `index` of a store with a NaN in it, keeping the manifest's sha256 valid."""
    shard = path / f"shard-{index:05d}.safetensors"
    tensors = load_file(shard)
    tensors[HOOK][0, 3, 1] = float("nan")
    save_file(tensors, shard)
    manifest = json.loads((path / "manifest.json").read_text())
    data = shard.read_bytes()
    manifest["shards"][index].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (path / "manifest.json").write_text(json.dumps(manifest))


# ---- store mode ------------------------------------------------------------------------------------------------


def test_store_source_resumes_at_any_batch_and_repeats_with_a_new_shuffle(tmp_path):
    x = synthetic_store(tmp_path / "s", n_contexts=20, ctx_len=4, per_shard=3)  # 80 tokens
    source = StoreSource(str(tmp_path / "s"), None, batch_size=16, seed=3)
    assert (source.hook, source.d_in, source.batches_per_pass, source.tokens_per_pass) == (HOOK, D, 5, 80)
    stream = list(itertools.islice(source.batches(0), 12))  # 2.4 passes
    assert all(b.shape == (16, D) and b.dtype == torch.float32 for b in stream)
    for start in (1, 4, 5, 7):
        assert all(torch.equal(a, b) for a, b in zip(itertools.islice(source.batches(start), 12 - start),
                                                      stream[start:], strict=True))
    rows = x.flatten(0, 1)
    first, second = torch.cat(stream[:5]), torch.cat(stream[5:10])
    assert not torch.equal(first, second)  # a new shuffle ...
    for rows_of_pass in (first, second):  # ... of the same rows, each once
        assert torch.equal(rows_of_pass[rows_of_pass[:, 0].argsort()], rows[rows[:, 0].argsort()])


def test_store_source_hook_choice(tmp_path):
    synthetic_store(tmp_path / "two", n_contexts=4, hooks=(HOOK, "blocks.1.hook_resid_post"))
    with pytest.raises(InterplabError, match="several hooks; pick one with --hook: blocks.0.hook_resid_post, blocks.1"):
        StoreSource(str(tmp_path / "two"), None, 16, 0)
    with pytest.raises(InterplabError, match="unknown hook 'blocks.7.hook_mlp_out'; .* holds: blocks.0.hook_resid"):
        StoreSource(str(tmp_path / "two"), "blocks.7.hook_mlp_out", 16, 0)
    assert StoreSource(str(tmp_path / "two"), "blocks.1.hook_resid_post", 16, 0).hook == "blocks.1.hook_resid_post"
    with pytest.raises(InterplabError, match="holds 64 tokens, fewer than one batch \\(--batch-size 100\\)"):
        StoreSource(str(tmp_path / "two"), HOOK, 100, 0)


def test_store_source_names_a_shard_holding_nan(tmp_path):
    synthetic_store(tmp_path / "s", n_contexts=8, ctx_len=4, per_shard=2)
    poison_shard(tmp_path / "s", 2)
    with pytest.raises(NonFiniteShardError, match=r"shard-00002.safetensors in .* holds 1 non-finite") as info:
        list(StoreSource(str(tmp_path / "s"), None, 4, 0).batches(0))
    assert info.value.shard == "shard-00002.safetensors"


# ---- stream mode -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream(tiny_gpt2_dir) -> StreamSource:
    return StreamSource(str(tiny_gpt2_dir), HOOK, "python-docs", split="train", ctx_len=16, model_batch_size=4,
                        shuffle_buffer=100, batch_size=24, seed=0, device="cpu")


def test_stream_source_shuffles_fills_of_the_models_activations(stream):
    # A fill is ceil(100 / 16) = 7 contexts = 112 rows = 4 whole batches of 24 (16 rows dropped).
    assert (stream.d_in, stream.contexts_per_fill, stream.batches_per_fill) == (32, 7, 4)
    contexts = torch.stack(list(itertools.islice(stream._contexts(), 7)))
    expected = stream.model.run_with_cache(contexts, [HOOK]).cache[HOOK].flatten(0, 1)
    fill = torch.cat(list(itertools.islice(stream.batches(0), 4)))
    assert fill.shape == (96, 32)
    # Each batch row is a distinct row of the fill's activations (BOS rows are all alike, so match greedily).
    close = torch.cdist(fill, expected, compute_mode="donot_use_mm_for_euclid_dist") < 1e-4
    used = torch.zeros(len(expected), dtype=torch.bool)
    for row in close:
        free = (row & ~used).nonzero()
        assert len(free), "a batch row is not one of the fill's activations, or is one used twice"
        used[free[0]] = True
    assert not torch.equal(fill, expected[:96])  # and they are shuffled


def test_stream_source_resumes_at_any_batch_without_the_earlier_forward_passes(stream, monkeypatch):
    reference = list(itertools.islice(stream.batches(0), 10))  # 2.5 fills
    calls = []
    forward = stream._activations
    monkeypatch.setattr(stream, "_activations", lambda tokens: calls.append(len(tokens)) or forward(tokens))
    for start in (3, 4, 9):
        calls.clear()
        resumed = list(itertools.islice(stream.batches(start), 10 - start))
        assert all(torch.equal(a, b) for a, b in zip(resumed, reference[start:], strict=True))
        assert calls == [7] * (3 - start // 4)  # only the fills still needed are run through the model


def test_stream_source_rejects_bad_hooks_and_lengths(tiny_gpt2_dir):
    kw = dict(split="train", model_batch_size=4, shuffle_buffer=64, batch_size=16, seed=0, device="cpu")
    with pytest.raises(InterplabError, match="unknown hook name"):
        StreamSource(str(tiny_gpt2_dir), "blocks.9.hook_resid_post", "python-docs", ctx_len=16, **kw)
    with pytest.raises(InterplabError, match="attention patterns"):
        StreamSource(str(tiny_gpt2_dir), "blocks.0.attn.hook_pattern", "python-docs", ctx_len=16, **kw)
    with pytest.raises(InterplabError, match="--ctx-len 65 is longer than"):
        StreamSource(str(tiny_gpt2_dir), HOOK, "python-docs", ctx_len=65, **kw)


def test_store_source_leaves_out_bos_rows(tmp_path):
    x = synthetic_store(tmp_path / "s", n_contexts=8, ctx_len=16, per_shard=4)          # [8 16 d]
    source = StoreSource(str(tmp_path / "s"), None, 24, 0, skip_positions=1)
    assert source.batches_per_pass == 8 * 15 // 24
    rows = torch.cat(list(itertools.islice(source.batches(), source.batches_per_pass)))
    body, bos = x[:, 1:].reshape(-1, x.shape[-1]), x[:, 0]

    def nearest(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values

    assert nearest(rows, body).max() < 1e-5                           # every row is a non-BOS activation,
    assert nearest(rows, bos).min() > 1e-3                            # never a BOS one,
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)       # and none twice within the pass
    with pytest.raises(InterplabError, match=r"skip_positions=16 must lie in \[0, ctx_len=16\)"):
        source.store.iter_batches(HOOK, 4, skip_positions=16)


# ---- synthetic mode: the caller builds the source --------------------------------------------------------------

SPEC = "sparse:n_features=48,d=16,mean_active=3"


def synthetic_config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"synthetic": SPEC, "arch": "topk", "k": [3], "expansion": [2], "tokens": 20 * 64,
                          "batch_size": 64, "lr": 1e-2, "log_every": 10, "out": str(out), **kw})


def test_synthetic_source_gives_the_generators_batches_by_index():
    cfg = synthetic_config(Path("unused"))
    source = synthetic_source(cfg)
    assert (source.d_in, source.hook, source.model_spec) == (16, f"synthetic:{SPEC}", f"synthetic:{SPEC}")
    expected = [b.x for b in itertools.islice(make_generator(SPEC).batches(64, 5), 3)]  # the generator itself
    got = list(itertools.islice(source.batches(5), 3))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(InterplabError, match="needs a config with --synthetic"):
        synthetic_source(TrainConfig(store="acts"))


def test_train_refuses_synthetic_mode_without_a_source_and_writes_nothing(tmp_path):
    cfg = synthetic_config(tmp_path / "o")
    with pytest.raises(InterplabError, match=r"the caller must build the batch source, "
                                             r"train\(cfg, source=interplab.synth.sources.synthetic_source"):
        train(cfg, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InterplabError, match="the SAE trainer does not build generators"):
        open_source(cfg)


def test_train_on_a_synthetic_source_it_is_given(tmp_path):
    cfg = synthetic_config(tmp_path / "o")
    result = train(cfg, source=synthetic_source(cfg), progress=False)
    assert result.names == ["topk-k3-x2"] and result.steps == 20 and result.tokens == 20 * 64
    sae = load_sae(str(tmp_path / "o" / "topk-k3-x2"))
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_name) == (16, 32, f"synthetic:{SPEC}")
    first = result.metrics["topk-k3-x2"]["fvu"]
    assert 0 <= first < 1  # it learned something of the planted structure
    again = train(cfg, source=synthetic_source(cfg), progress=False)  # the same run: complete, nothing to do
    assert again.already_complete and again.metrics["topk-k3-x2"]["fvu"] == first


def test_the_sae_package_does_not_import_the_planted_truth_lab():
    code = ("import sys, interplab.sae.trainer, interplab.sae.per_hook, interplab.sae.files; "
            "print(sorted(m for m in sys.modules if m.startswith('interplab.synth')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
