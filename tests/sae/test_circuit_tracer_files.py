"""circuit-tracer folders: round trips, hand-written folders in their layout, their formulas on our files, TopK."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from interplab.errors import InterplabError
from interplab.sae import SAEConfig, make_sae
from interplab.sae.circuit_tracer_files import (
    is_circuit_tracer_folder,
    load_circuit_tracer,
    save_circuit_tracer,
    topk_equivalent_threshold,
)
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.transcoder import Transcoder, TranscoderSet

D, FEAT = 6, 16
IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"


def random_transcoder(layer: int, arch: str, skip: bool, seed: int) -> Transcoder:
    g = torch.Generator().manual_seed(seed)
    sae = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=FEAT, k=4, hook_name=IN.format(layer=layer)))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.randn(FEAT, generator=g) * 0.3 - 1.0)
        elif arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
    W_skip = torch.randn(D, D, generator=g) * 0.1 if skip else None
    return Transcoder(sae.eval(), OUT.format(layer=layer), W_skip)


def random_set(archs: list[str], skip: bool = False) -> TranscoderSet:
    return TranscoderSet({l: random_transcoder(l, a, skip, seed=l) for l, a in enumerate(archs)}, IN, OUT)


def write_config(folder, **entries) -> None:
    (folder / "config.yaml").write_text(yaml.safe_dump(entries))


@pytest.mark.parametrize("archs", [["relu", "jumprelu"], ["topk", "batchtopk"], ["matryoshka", "topk"]])
def test_set_round_trip_is_exact(tmp_path, archs):
    tset = random_set(archs, skip=True)
    save_circuit_tracer(tset, str(tmp_path), "toy-model", topk_threshold=0.2)
    back = load_circuit_tracer(str(tmp_path))
    assert isinstance(back, TranscoderSet) and (back.in_hook, back.out_hook) == (IN, OUT)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(9))
    for layer, t in tset.transcoders.items():
        got = back.transcoders[layer]
        assert got.sae.cfg.arch == t.sae.cfg.arch and got.out_hook == t.out_hook and got.in_hook == t.in_hook
        assert torch.equal(got.encode(x), t.encode(x))
        assert torch.equal(got(x), t(x))


def test_files_follow_circuit_tracers_layout(tmp_path):
    tset = random_set(["relu", "jumprelu"], skip=True)
    save_circuit_tracer(tset, str(tmp_path), "toy-model")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {k: config[k] for k in ("model_name", "model_kind", "feature_input_hook", "feature_output_hook")} == {
        "model_name": "toy-model", "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out"}
    layer1 = load_file(tmp_path / "layer_1.safetensors")
    assert {k: tuple(v.shape) for k, v in layer1.items()} == {
        "W_enc": (FEAT, D), "W_dec": (FEAT, D), "b_enc": (FEAT,), "b_dec": (D,), "W_skip": (D, D),
        "activation_function.threshold": (FEAT,)}
    assert "activation_function.threshold" not in load_file(tmp_path / "layer_0.safetensors")


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "matryoshka"])
def test_circuit_tracers_formulas_on_our_files_give_our_outputs(tmp_path, arch):
    """Their SingleLayerTranscoder: pre = F.linear(x, W_enc, b_enc); ReLU or JumpReLU pre·1[pre > θ];
    ŷ = f @ W_dec + b_dec + x @ W_skipᵀ. Ours subtracts b_dec for batchtopk/matryoshka (folded on export)."""
    t = random_transcoder(0, arch, skip=True, seed=4)
    save_circuit_tracer(TranscoderSet({0: t}, IN, OUT), str(tmp_path), "m")
    w = load_file(tmp_path / "layer_0.safetensors")
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(2))
    pre = F.linear(x, w["W_enc"], w["b_enc"])
    theta = w.get("activation_function.threshold")
    f = pre.relu() if theta is None else pre * (pre > theta)
    y = f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(f, t.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, t(x), rtol=1e-5, atol=1e-5)


def test_hand_written_set_folder_loads_to_the_right_numbers(tmp_path):
    """One layer, d = 2, F = 3, JumpReLU θ = (0.5, 0.5, 3), W_enc [F, d] as circuit-tracer stores it.
    x = (1, 2): pre = W_enc x + b_enc = (1, 2, 3) + (0, −0.5, 0.5) = (1, 1.5, 3.5) → f = (1, 1.5, 3.5).
    ŷ = 1·(1, 0) + 1.5·(0, 2) + 3.5·(1, 1) + b_dec (0.25, 0) + W_skip x (W_skip = I, applied as x @ W_skipᵀ)
      = (4.75, 6.5) + (1, 2) = (5.75, 8.5)."""
    save_file({"W_enc": torch.tensor([[1.0, 0], [0, 1], [1, 1]]), "W_dec": torch.tensor([[1.0, 0], [0, 2], [1, 1]]),
               "b_enc": torch.tensor([0.0, -0.5, 0.5]), "b_dec": torch.tensor([0.25, 0.0]),
               "activation_function.threshold": torch.tensor([0.5, 0.5, 3.0]), "W_skip": torch.eye(2)},
              tmp_path / "layer_0.safetensors")
    write_config(tmp_path, model_name="m", model_kind="transcoder_set", feature_input_hook="mlp.hook_in",
                 feature_output_hook="hook_mlp_out")
    t = load_circuit_tracer(str(tmp_path)).transcoders[0]
    x = torch.tensor([1.0, 2.0])
    assert t.sae.cfg.arch == "jumprelu" and t.in_hook == "blocks.0.mlp.hook_in"
    assert t.encode(x).tolist() == [1.0, 1.5, 3.5]
    assert t(x).tolist() == [5.75, 8.5]
    # θ_3 = 3 → with x = (1, 1): pre = (1, 0.5, 2.5) → f = (1, 0, 0) (0.5 is not > 0.5, 2.5 < 3)
    assert t.encode(torch.tensor([1.0, 1.0])).tolist() == [1.0, 0.0, 0.0]


def test_hand_written_clt_folder_loads_to_the_right_numbers(tmp_path):
    """L = 2, d = 2, F = 3, ReLU. x_0 = (1, −1): pre_0 = W_enc_0 x_0 = (1, −1, 2) → f_0 = (1, 0, 2).
    x_1 = (0, 1): pre_1 = W_enc_1 x_1 + b_enc_1 = (1, 1, 1) + (0, −2, 0) → f_1 = (1, 0, 1).
    ŷ_1 = f_0 @ W_dec_0[:, 1] + f_1 @ W_dec_1[:, 0] + b_dec_1 = (1·(1, 1) + 2·(0, 1)) + (1·(2, 0) + 1·(0, 3)) + (1, 1)
        = (1, 3) + (2, 3) + (1, 1) = (4, 7)."""
    W_dec_0 = torch.zeros(3, 2, 2)
    W_dec_0[:, 1] = torch.tensor([[1.0, 1], [9, 9], [0, 1]])
    save_file({"W_enc_0": torch.tensor([[1.0, 0], [0, 1], [1, -1]]), "b_enc_0": torch.zeros(3),
               "b_dec_0": torch.zeros(2)}, tmp_path / "W_enc_0.safetensors")
    save_file({"W_enc_1": torch.tensor([[1.0, 1], [0, 1], [0, 1]]), "b_enc_1": torch.tensor([0.0, -2, 0]),
               "b_dec_1": torch.tensor([1.0, 1])}, tmp_path / "W_enc_1.safetensors")
    save_file({"W_dec_0": W_dec_0}, tmp_path / "W_dec_0.safetensors")
    save_file({"W_dec_1": torch.tensor([[[2.0, 0]], [[7, 7]], [[0, 3]]])}, tmp_path / "W_dec_1.safetensors")
    write_config(tmp_path, model_name="m", model_kind="cross_layer_transcoder", feature_input_hook="hook_resid_mid",
                 feature_output_hook="mlp.hook_out")
    clt = load_circuit_tracer(str(tmp_path))
    assert isinstance(clt, CrossLayerTranscoder) and clt.activation == "relu"
    assert clt.in_hook_at(1) == "blocks.1.hook_resid_mid" and clt.out_hook_at(1) == "blocks.1.hook_mlp_out"
    x0, x1 = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    assert clt.encode(0, x0).tolist() == [1.0, 0.0, 2.0]
    assert clt.encode(1, x1).tolist() == [1.0, 0.0, 1.0]
    assert clt([x0, x1])[1].tolist() == [4.0, 7.0]


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_clt_round_trip_is_exact(tmp_path, activation):
    clt = CrossLayerTranscoder(3, D, FEAT, activation=activation, k=3, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=g))
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=g))
        if activation == "jumprelu":
            clt.threshold.copy_(torch.rand(clt.threshold.shape, generator=g))
    save_circuit_tracer(clt, str(tmp_path), "m", topk_threshold=0.5)
    enc, dec = load_file(tmp_path / "W_enc_2.safetensors"), load_file(tmp_path / "W_dec_1.safetensors")
    assert tuple(enc["W_enc_2"].shape) == (FEAT, D) and tuple(dec["W_dec_1"].shape) == (FEAT, 2, D)
    back = load_circuit_tracer(str(tmp_path))
    xs = [torch.randn(10, D, generator=g) for _ in range(3)]
    assert back.activation == activation
    for a, b in zip(back(xs), clt(xs)):
        assert torch.equal(a, b)


def test_topk_export_needs_a_threshold_and_writes_that_jumprelu(tmp_path):
    tset = random_set(["topk"])
    with pytest.raises(InterplabError, match="topk_threshold"):
        save_circuit_tracer(tset, str(tmp_path / "a"), "m")
    assert not (tmp_path / "a").exists()
    save_circuit_tracer(tset, str(tmp_path / "b"), "m", topk_threshold=0.7)
    w = load_file(tmp_path / "b" / "layer_0.safetensors")
    assert torch.equal(w["activation_function.threshold"], torch.full((FEAT,), 0.7))
    sae = tset.transcoders[0].sae  # their b_enc: ours with the b_dec subtraction folded in
    torch.testing.assert_close(w["b_enc"], sae.b_enc - sae.b_dec @ sae.W_enc)
    assert "not equivalent" in yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["interplab"]["note"]


def test_topk_thresholds_per_layer(tmp_path):
    tset = random_set(["topk", "relu", "topk"])
    with pytest.raises(InterplabError, match="no value for layer 2"):
        save_circuit_tracer(tset, str(tmp_path / "a"), "m", topk_threshold={0: 0.1})
    save_circuit_tracer(tset, str(tmp_path / "b"), "m", topk_threshold={0: 0.1, 2: 0.9})
    thresholds = [load_file(tmp_path / "b" / f"layer_{l}.safetensors").get("activation_function.threshold")
                  for l in range(3)]
    assert thresholds[0].unique().tolist() == [pytest.approx(0.1)] and thresholds[1] is None
    assert thresholds[2].unique().tolist() == [pytest.approx(0.9)]


def test_is_circuit_tracer_folder(tmp_path):
    save_circuit_tracer(random_set(["relu"]), str(tmp_path / "ct"), "m")
    random_transcoder(0, "relu", skip=False, seed=0).sae.save(str(tmp_path / "saelens"))
    assert is_circuit_tracer_folder(str(tmp_path / "ct"))
    assert not is_circuit_tracer_folder(str(tmp_path / "saelens"))
    assert not is_circuit_tracer_folder(str(tmp_path / "nothing"))


def test_topk_equivalent_threshold_matches_mean_l0():
    pre = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    theta = topk_equivalent_threshold(pre, k=5)
    assert (pre > theta).sum().item() == 200 * 5
    assert topk_equivalent_threshold(-pre.abs(), k=5) == 0.0  # never negative: TopK is ReLU'd


def test_bad_folders_and_sets_are_refused(tmp_path):
    with pytest.raises(InterplabError, match="missing config.yaml"):
        load_circuit_tracer(str(tmp_path))
    tset = random_set(["relu", "relu", "relu"])
    save_circuit_tracer(tset, str(tmp_path), "m")
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(InterplabError, match="missing layer file layer_1.safetensors"):
        load_circuit_tracer(str(tmp_path))
    write_config(tmp_path, model_name="m", model_kind="transcoder_set", feature_input_hook="hook_resid_pre",
                 feature_output_hook="hook_mlp_out")
    with pytest.raises(InterplabError, match="feature_input_hook 'hook_resid_pre' is not an MLP input hook"):
        load_circuit_tracer(str(tmp_path))
    gap = TranscoderSet({1: tset.transcoders[1]}, IN, OUT)
    with pytest.raises(InterplabError, match="every layer from 0"):
        save_circuit_tracer(gap, str(tmp_path / "gap"), "m")
    resid = TranscoderSet(tset.transcoders, "blocks.{layer}.hook_resid_pre", OUT)
    with pytest.raises(InterplabError, match="cannot hold the input hook"):
        save_circuit_tracer(resid, str(tmp_path / "resid"), "m")
    assert not (tmp_path / "gap").exists() and not (tmp_path / "resid").exists()
    save_circuit_tracer(random_set(["relu", "relu"]), str(tmp_path / "two"), "m")
    (tmp_path / "two" / "layer_5.safetensors").write_bytes(b"old")
    with pytest.raises(InterplabError, match=r"would not replace \(layer_5.safetensors"):
        save_circuit_tracer(random_set(["relu", "relu"]), str(tmp_path / "two"), "m")
