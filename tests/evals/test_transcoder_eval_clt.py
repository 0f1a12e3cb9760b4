"""Transcoder evaluation of cross-layer transcoders: known answers (a CLT built from a ReLU MLP's own neurons, a CLT
without cross-layer decoders against the per-layer set of the same weights, a decoder moved to a later layer against
the splice computed by hand), the full replacement (features from the replaced stream, errors compounding; with error
terms equal to the model), a CLT folder trained by `interplab transcoder train`, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from interplab.cli import main
from interplab.data.corpus import iter_contexts
from interplab.evals.replacement import IN_HOOK, OUT_HOOK, clean_run, replacement_logits
from interplab.evals.transcoder_eval import evaluate_transcoders, format_summary
from interplab.models import ToyTransformer, load_model
from interplab.sae import SAEConfig, make_sae
from interplab.sae.circuit_tracer_files import save_circuit_tracer
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.mlp_dictionary import as_dictionary
from interplab.sae.transcoder import Transcoder, TranscoderSet
from interplab.sae.transcoder_files import load_transcoder_set
from mlp_toys import D, D_MLP, L, N_DEAD, mlp_clt, toy_model

def noisy_clt(cross: bool = True, seed: int = 3) -> CrossLayerTranscoder:
    """Random ReLU CLT (F = 48, sparse through negative biases): far from exact; `cross=False` zeroes the decoders
    into later layers."""
    clt = CrossLayerTranscoder(L, D, 48, activation="relu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clt.b_enc.copy_(-0.5 + 0.2 * torch.randn(L, 48, generator=gen))
        clt.b_dec.copy_(0.1 * torch.randn(L, D, generator=gen))
        for W in clt.W_dec:
            W.mul_(3.0)
        if not cross:
            clt.W_dec[0][:, 1:].zero_()
    return clt


def batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 20, (4, 12), generator=gen) for _ in range(n)]


def mlp_io(model: ToyTransformer, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    cache = model.run_with_cache(tokens, [h.format(layer=l) for l in range(L) for h in (IN_HOOK, OUT_HOOK)]).cache
    return [cache[IN_HOOK.format(layer=l)] for l in range(L)], [cache[OUT_HOOK.format(layer=l)] for l in range(L)]


def kl_by_hand(clean: torch.Tensor, spliced: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ spliced) per token, positions 1..T−1, flattened."""
    p, q = clean.double().log_softmax(-1), spliced.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)[:, 1:].flatten()


def fvu_by_hand(ys: list[torch.Tensor], y_hats: list[torch.Tensor]) -> float:
    """Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the non-BOS tokens of every batch."""
    y = torch.cat([t[:, 1:].reshape(-1, D) for t in ys]).double()
    y_hat = torch.cat([t[:, 1:].reshape(-1, D) for t in y_hats]).double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_clt_built_from_the_mlps_gives_kl_zero_alone_and_in_full_replacement():
    model, tokens = toy_model(), batches()
    result = evaluate_transcoders(model, mlp_clt(model), tokens)
    assert result["dictionary"] == "crosslayer" and list(result["layers"]) == ["0", "1"]
    for layer in ("0", "1"):
        m = result["layers"][layer]
        assert m["arch"] == "relu" and m["d_sae"] == D_MLP and m["in_hook"] == f"blocks.{layer}.mlp.hook_in"
        assert abs(m["kl"]["transcoder"]["mean"]) < 1e-6 and abs(m["kl"]["epsilon_random"]["mean"]) < 1e-6
        assert m["kl"]["zero_ablation"]["mean"] > 1e-3  # the MLP matters, so KL 0 is not trivial
        assert m["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-6)
        assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
        # L0 and dead features of layer l by hand: the MLP's neurons with pre-activation > 0 (non-BOS tokens)
        hook = f"blocks.{layer}.mlp.hook_pre"
        pre = torch.cat([model.run_with_cache(t, [hook]).cache[hook][:, 1:].reshape(-1, D_MLP) for t in tokens])
        assert m["sparsity"]["l0"] == pytest.approx((pre > 0).sum(-1).double().mean().item())
        assert m["sparsity"]["dead_latents"] == int(((pre > 0).sum(0) == 0).sum()) >= N_DEAD
    rep = result["replacement"]
    assert rep["complete"] and rep["layers"] == [0, 1]
    for name in ("transcoder", "with_errors", "epsilon_random"):
        assert abs(rep["kl"][name]["mean"]) < 1e-6
    assert rep["kl"]["zero_ablation"]["mean"] > 1e-3
    torch.testing.assert_close(replacement_logits(model, tokens[0], as_dictionary(mlp_clt(model)), "transcoder"),
                               model.forward(tokens[0]), atol=1e-5, rtol=1e-5)
    assert "a cross-layer transcoder" in format_summary(result)


def per_layer_set(clt: CrossLayerTranscoder) -> TranscoderSet:
    """The per-layer ReLU transcoders with the CLT's encoders and own-layer decoders, built by hand."""
    tcs = {}
    for l in range(clt.n_layers):
        sae = make_sae(SAEConfig(arch="relu", d_in=D, d_sae=clt.d_sae, hook_name=IN_HOOK.format(layer=l),
                                 apply_b_dec_to_input=False))
        with torch.no_grad():
            sae.W_enc.copy_(clt.W_enc[l])
            sae.b_enc.copy_(clt.b_enc[l])
            sae.W_dec.copy_(clt.W_dec[l][:, 0])
            sae.b_dec.copy_(clt.b_dec[l])
        tcs[l] = Transcoder(sae, OUT_HOOK.format(layer=l))
    return TranscoderSet(tcs, IN_HOOK, OUT_HOOK)


def test_clt_without_cross_layer_decoders_gives_the_per_layer_numbers():
    model, tokens, clt = toy_model(), batches(), noisy_clt(cross=False)
    got = evaluate_transcoders(model, clt, tokens, seed=5)
    want = evaluate_transcoders(model, per_layer_set(clt), tokens, seed=5)
    assert got["dictionary"] == "crosslayer" and want["dictionary"] == "per_layer"
    assert got["replacement"] == want["replacement"]
    for layer in ("0", "1"):
        for key in ("kl", "ce_loss", "kl_ratio", "reconstruction", "sparsity", "ce_loss_score"):
            assert got["layers"][layer][key] == want["layers"][layer][key], key
    assert got["replacement"]["kl"]["transcoder"]["mean"] > 1e-3  # far from exact: the equality is not 0 = 0
    assert 0 < got["layers"]["1"]["sparsity"]["l0"] < 48


def test_a_decoder_moved_to_the_next_layer_gives_the_splice_computed_by_hand():
    """Layer 0's decoder W_out0 moved from output 0 to output 1: alone, ŷ_0 = b_out0 and ŷ_1 = y_1 + (y_0 − b_out0);
    in the full replacement layer 1's MLP reads the stream with b_out0 at layer 0 and adds MLP_0(x_0) − b_out0."""
    model, tokens = toy_model(), batches()
    clt = mlp_clt(model)
    b0 = model.blocks[0].mlp.b_out.detach()
    with torch.no_grad():
        clt.W_dec[0][:, 1].copy_(clt.W_dec[0][:, 0])
        clt.W_dec[0][:, 0].zero_()
    result = evaluate_transcoders(model, clt, tokens)
    kl = {0: [], 1: [], "full": []}
    ys: list[list[torch.Tensor]] = [[], []]
    for t in tokens:
        clean = model.forward(t)
        _, (y0, y1) = mlp_io(model, t)
        ys[0].append(y0)
        ys[1].append(y1)

        def bias_only(act, name):
            return torch.cat([act[:, :1], b0.expand_as(act[:, 1:])], dim=1)
        kl[0].append(kl_by_hand(clean, model.run_with_hooks(t, [(OUT_HOOK.format(layer=0), bias_only)])))
        shifted = torch.cat([torch.zeros_like(y0[:, :1]), y0[:, 1:] - b0], dim=1)
        kl[1].append(kl_by_hand(clean, model.run_with_hooks(t, [(OUT_HOOK.format(layer=1),
                                                                lambda act, name: act + shifted)])))
        seen = {}

        def keep_then_bias(act, name):
            seen["y0"] = act.clone()
            return bias_only(act, name)

        def add_moved(act, name):
            return act + torch.cat([torch.zeros_like(act[:, :1]), seen["y0"][:, 1:] - b0], dim=1)
        full = model.run_with_hooks(t, [(OUT_HOOK.format(layer=0), keep_then_bias),
                                        (OUT_HOOK.format(layer=1), add_moved)])
        torch.testing.assert_close(replacement_logits(model, t, as_dictionary(clt), "transcoder"), full,
                                   atol=1e-5, rtol=1e-5)
        kl["full"].append(kl_by_hand(clean, full))
    for layer in (0, 1):
        assert result["layers"][str(layer)]["kl"]["transcoder"]["mean"] == pytest.approx(
            torch.cat(kl[layer]).mean().item(), rel=1e-4, abs=1e-7)
    assert result["replacement"]["kl"]["transcoder"]["mean"] == pytest.approx(torch.cat(kl["full"]).mean().item(),
                                                                             rel=1e-4)
    # FVU by hand: layer 0 predicts b0 for y_0; layer 1's error is y_0 − b0
    moved = [torch.cat([y[:, :1], b0.expand_as(y[:, 1:])], dim=1) for y in ys[0]]
    assert result["layers"]["0"]["reconstruction"]["fvu"] == pytest.approx(fvu_by_hand(ys[0], moved), rel=1e-5)
    y1_hat = [y1 + y0 - b0 for y0, y1 in zip(*ys)]
    assert result["layers"]["1"]["reconstruction"]["fvu"] == pytest.approx(fvu_by_hand(ys[1], y1_hat), rel=1e-5)
    assert result["layers"]["1"]["kl"]["transcoder"]["mean"] > 1e-3  # the move matters


def test_full_replacement_reads_the_replaced_stream_and_with_errors_equals_the_model():
    model, tokens, clt = toy_model(), batches(2), noisy_clt()
    dic = as_dictionary(clt)
    clean = clean_run(model, tokens[0], [0, 1])
    torch.testing.assert_close(replacement_logits(model, tokens[0], dic, "with_errors", clean=clean),
                               model.forward(tokens[0]), atol=1e-5, rtol=1e-5)
    assert (replacement_logits(model, tokens[0], dic, "transcoder") - clean.logits)[:, 1:].abs().max() > 1e-2
    result = evaluate_transcoders(model, clt, tokens)
    assert abs(result["replacement"]["kl"]["with_errors"]["mean"]) < 1e-6
    assert result["replacement"]["max_abs_logit_diff_with_errors"] < 1e-4
    # by hand: x_l read in the replacement run, y_l = MLP_l(x_l), ŷ_l = the CLT's forward on those x's; alone, the
    # CLT's forward on the clean run's x's
    names = [f"blocks.{l}.{h}" for l in range(L) for h in ("mlp.hook_in", "hook_resid_mid", "hook_resid_post")]
    ys, y_hats, ys_alone, y_hats_alone = [[], []], [[], []], [[], []], [[], []]
    for t in tokens:
        for splice in ("transcoder", "epsilon_random"):
            seen: dict[str, torch.Tensor] = {}
            with model.hooks([(n, lambda act, name: seen.__setitem__(name, act.clone())) for n in names]):
                replacement_logits(model, t, dic, splice, gen=torch.Generator().manual_seed(1))
            xs = [seen[f"blocks.{l}.mlp.hook_in"] for l in range(L)]
            with torch.no_grad():
                y, y_hat = [model.blocks[l].mlp(xs[l]) for l in range(L)], clt(xs)
            for l in range(L):
                if splice == "transcoder":
                    ys[l].append(y[l])
                    y_hats[l].append(y_hat[l])
                else:  # ε-random: spliced − y has the norm of the CLT's error at this run's inputs, per token
                    spliced = seen[f"blocks.{l}.hook_resid_post"] - seen[f"blocks.{l}.hook_resid_mid"]
                    torch.testing.assert_close((spliced - y[l])[:, 1:].norm(dim=-1),
                                               (y[l] - y_hat[l])[:, 1:].norm(dim=-1), atol=1e-4, rtol=1e-4)
        xs_clean, ys_clean = mlp_io(model, t)
        with torch.no_grad():
            for l, y_hat in enumerate(clt(xs_clean)):
                ys_alone[l].append(ys_clean[l])
                y_hats_alone[l].append(y_hat)
    for l in range(L):
        in_repl = result["replacement"]["fvu_in_replacement"][str(l)]
        assert in_repl == pytest.approx(fvu_by_hand(ys[l], y_hats[l]), rel=1e-4)
        assert result["layers"][str(l)]["reconstruction"]["fvu"] == pytest.approx(
            fvu_by_hand(ys_alone[l], y_hats_alone[l]), rel=1e-4)
    # layer 0 reads the same stream either way; layer 1 reads one the replacement of layer 0 changed
    assert result["replacement"]["fvu_in_replacement"]["0"] == pytest.approx(
        result["layers"]["0"]["reconstruction"]["fvu"], rel=1e-5)
    assert abs(result["replacement"]["fvu_in_replacement"]["1"] - result["layers"]["1"]["reconstruction"]["fvu"]) \
        > 1e-3


def eval_args(folder, corpus, out, *extra: str) -> list[str]:
    return ["transcoder", "eval", "--transcoders", str(folder), "--corpus", corpus, "--split", "all", "--tokens",
            "64", "--ctx-len", "16", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


def test_cli_evaluates_a_clt_folder_from_transcoder_train(tiny_gpt2_dir, corpus, tmp_path, capsys):
    train = ["transcoder", "train", "--model", str(tiny_gpt2_dir), "--corpus", corpus, "--split", "all",
             "--ctx-len", "16", "--batch-size", "4", "--tokens", "60", "--d-sae", "24", "--k", "2", "--lr", "0.01",
             "--device", "cpu", "--out", str(tmp_path / "clts")]
    assert main(train) == 0
    folder = tmp_path / "clts" / "clt-topk-k2-f24"
    assert main(eval_args(folder, corpus, tmp_path / "ev")) == 0  # no --model: config.yaml names it
    assert "a cross-layer transcoder" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["dictionary"] == "crosslayer" and list(saved["layers"]) == ["0", "1", "2"]
    assert saved["replacement"]["complete"] and saved["replacement"]["max_abs_logit_diff_with_errors"] < 1e-4
    assert abs(saved["replacement"]["kl"]["with_errors"]["mean"]) < 1e-6
    # FVU and L0 of each layer alone by hand: the loaded CLT's forward on the clean MLP inputs of the same contexts
    model, clt = load_model(str(tiny_gpt2_dir), device="cpu"), load_transcoder_set(str(folder))
    contexts = list(itertools.islice(iter_contexts(corpus, model.tokenizer, 16, split="all", seed=0), 4))
    names = [h.format(layer=l) for l in range(3) for h in (IN_HOOK, OUT_HOOK)]
    cache = model.run_with_cache(torch.stack(contexts), names).cache
    xs = [cache[IN_HOOK.format(layer=l)][:, 1:].reshape(-1, 32) for l in range(3)]
    with torch.no_grad():
        y_hats = clt(xs)
    for l in range(3):
        y = cache[OUT_HOOK.format(layer=l)][:, 1:].reshape(-1, 32).double()
        fvu = float((y - y_hats[l].double()).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        m = saved["layers"][str(l)]
        assert m["arch"] == "topk" and m["reconstruction"]["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert m["sparsity"]["l0"] == pytest.approx((clt.encode(l, xs[l]) != 0).sum(-1).double().mean().item())


@pytest.mark.parametrize("clt, extra, message", [
    (CrossLayerTranscoder(2, 32, 8), (), "the cross-layer transcoder has 2 layers"),
    (CrossLayerTranscoder(3, 16, 8), (), "the cross-layer transcoder has width 16"),
    (CrossLayerTranscoder(3, 32, 8), ("--layers", "3"), "--layers [3]: no transcoder there"),
])
def test_a_clt_that_does_not_fit_the_model_is_one_line_exit_2_nothing_written(tiny_gpt2_dir, corpus, tmp_path,
                                                                                 capsys, clt, extra, message):
    save_circuit_tracer(clt, str(tmp_path / "clt"), str(tiny_gpt2_dir))
    assert main(eval_args(tmp_path / "clt", corpus, tmp_path / "ev", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("interplab transcoder eval: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "ev").exists()
