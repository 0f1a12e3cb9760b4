"""Transcoder evaluation: known answers (a transcoder built from a ReLU MLP's own neurons, a zero transcoder), the full
replacement with error terms equal to the model, the ε-random control's error norm by hand, bad input, the run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from interplab.errors import InterplabError
from interplab.evals.configs import TranscoderEvalConfig
from interplab.evals.replacement import IN_HOOK, OUT_HOOK, clean_run, replacement_logits, splice_output
from interplab.evals.transcoder_eval import evaluate_transcoders, format_summary, run_transcoder_eval
from interplab.models import ToyTransformer, load_model
from interplab.sae import SAEConfig, make_sae
from interplab.sae.transcoder import Transcoder, TranscoderSet
from interplab.sae.transcoder_files import save_transcoder_set
from mlp_toys import D, D_MLP, N_DEAD, toy_model

def transcoder(layer: int, W_enc, b_enc, W_dec, b_dec, arch: str = "relu", **kw) -> Transcoder:
    sae = make_sae(SAEConfig(arch=arch, d_in=W_enc.shape[0], d_sae=W_enc.shape[1], hook_name=IN_HOOK.format(
        layer=layer), apply_b_dec_to_input=False, **kw))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
    return Transcoder(sae, OUT_HOOK.format(layer=layer))


def exact_set(model: ToyTransformer) -> dict[int, Transcoder]:
    """encoder = W_in, b_enc = b_in, decoder = W_out, b_dec = b_out: the MLP itself."""
    return {l: transcoder(l, b.mlp.W_in, b.mlp.b_in, b.mlp.W_out, b.mlp.b_out) for l, b in enumerate(model.blocks)}


def noisy_set() -> dict[int, Transcoder]:
    """A TopK dictionary of random directions: far from exact."""
    gen = torch.Generator().manual_seed(3)
    return {l: transcoder(l, torch.randn(D, 64, generator=gen), torch.zeros(64), torch.randn(64, D, generator=gen)
                          * 0.3, torch.zeros(D), arch="topk", k=4) for l in range(2)}


def batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 20, (4, 12), generator=gen) for _ in range(n)]


def test_exact_transcoder_known_answers():
    model = toy_model()
    tokens = batches()
    result = evaluate_transcoders(model, exact_set(model), tokens)
    for layer in ("0", "1"):
        m = result["layers"][layer]
        assert abs(m["kl"]["transcoder"]["mean"]) < 1e-6
        assert abs(m["kl"]["epsilon_random"]["mean"]) < 1e-6  # zero error norm: the control is the MLP itself
        assert m["kl"]["zero_ablation"]["mean"] > 1e-3  # the MLP matters, so KL 0 is not trivial
        assert m["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-6)
        assert m["ce_loss"]["transcoder"]["mean"] == pytest.approx(m["ce_loss"]["clean"]["mean"], abs=1e-5)
        assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
        # L0 and dead latents by hand: the MLP's neurons with pre-activation > 0, over the non-BOS tokens
        pre = torch.cat([model.run_with_cache(t, [f"blocks.{layer}.mlp.hook_pre"]).cache[
            f"blocks.{layer}.mlp.hook_pre"][:, 1:].reshape(-1, D_MLP) for t in tokens])
        assert m["sparsity"]["l0"] == pytest.approx((pre > 0).sum(-1).double().mean().item())
        assert m["sparsity"]["dead_latents"] == int(((pre > 0).sum(0) == 0).sum()) >= N_DEAD
    rep = result["replacement"]
    assert rep["complete"] and rep["layers"] == [0, 1]
    for name in ("transcoder", "with_errors", "epsilon_random"):
        assert abs(rep["kl"][name]["mean"]) < 1e-6
    assert rep["kl"]["zero_ablation"]["mean"] > 1e-3
    torch.testing.assert_close(replacement_logits(model, tokens[0], exact_set(model), "transcoder"),
                               model.forward(tokens[0]), atol=1e-5, rtol=1e-5)


def test_replacement_with_errors_equals_the_model():
    model, tcs, tokens = toy_model(), noisy_set(), batches(1)[0]
    clean = clean_run(model, tokens, [0, 1])
    with_errors = replacement_logits(model, tokens, tcs, "with_errors", clean=clean)
    torch.testing.assert_close(with_errors, model.forward(tokens), atol=1e-5, rtol=1e-5)
    without = replacement_logits(model, tokens, tcs, "transcoder")
    assert (without[:, 1:] - clean.logits[:, 1:]).abs().max() > 1e-2  # the errors do matter here
    result = evaluate_transcoders(model, tcs, [tokens])
    assert abs(result["replacement"]["kl"]["with_errors"]["mean"]) < 1e-6
    assert result["replacement"]["max_abs_logit_diff_with_errors"] < 1e-4
    assert result["replacement"]["kl"]["transcoder"]["mean"] > 1e-3
    # one layer replaced: the prefix/suffix splice and the hooked full pass are two routes to the same logits
    one = evaluate_transcoders(model, {1: tcs[1]}, [tokens])
    assert one["layers"]["1"]["kl"]["transcoder"]["mean"] == pytest.approx(
        one["replacement"]["kl"]["transcoder"]["mean"], rel=1e-5)
    assert one["layers"]["1"]["reconstruction"]["fvu"] == pytest.approx(one["replacement"]["fvu_in_replacement"]["1"],
                                                                         rel=1e-6)


def test_zero_transcoder_gives_the_zero_ablation_numbers():
    model = toy_model()
    gen = torch.Generator().manual_seed(4)
    zero = {l: transcoder(l, torch.randn(D, 8, generator=gen), torch.zeros(8), torch.zeros(8, D), torch.zeros(D))
            for l in range(2)}
    result = evaluate_transcoders(model, zero, batches())
    for m in [*result["layers"].values(), result["replacement"]]:
        assert m["kl"]["transcoder"] == m["kl"]["zero_ablation"]
        assert m["ce_loss"]["transcoder"] == m["ce_loss"]["zero_ablation"]
        assert m["kl"]["zero_ablation"]["mean"] > 1e-3


def test_epsilon_random_has_the_transcoders_error_norm_per_token():
    y, y_hat = torch.randn(2, 5, D), torch.randn(2, 5, D)
    out = splice_output("epsilon_random", y, y_hat, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], y[:, 0])  # BOS keeps the MLP's output
    torch.testing.assert_close((out - y)[:, 1:].norm(dim=-1), (y - y_hat)[:, 1:].norm(dim=-1))
    # inside the full replacement: at each layer, spliced output − the MLP's output at that run's input has the norm
    # of the transcoder's error at that input (read from the residual stream around the MLP)
    model, tcs, tokens = toy_model(), noisy_set(), batches(1)[0]
    seen: dict[str, torch.Tensor] = {}
    names = [f"blocks.{l}.{h}" for l in range(2) for h in ("mlp.hook_in", "hook_resid_mid", "hook_resid_post")]
    with model.hooks([(n, lambda act, name: seen.__setitem__(name, act.clone())) for n in names]):
        replacement_logits(model, tokens, tcs, "epsilon_random", gen=torch.Generator().manual_seed(1))
    for l in range(2):
        x_in = seen[f"blocks.{l}.mlp.hook_in"]
        spliced = seen[f"blocks.{l}.hook_resid_post"] - seen[f"blocks.{l}.hook_resid_mid"]
        with torch.no_grad():
            y, y_hat = model.blocks[l].mlp(x_in), tcs[l](x_in)
        torch.testing.assert_close((spliced - y)[:, 1:].norm(dim=-1), (y - y_hat)[:, 1:].norm(dim=-1),
                                   atol=1e-4, rtol=1e-4)
        assert (y - y_hat)[:, 1:].norm(dim=-1).min() > 0.1


def test_bad_transcoders_are_refused():
    model = toy_model()
    good = exact_set(model)[0]
    wrong_hook = Transcoder(good.sae, "blocks.0.hook_resid_post")
    far = Transcoder(make_sae(SAEConfig(arch="relu", d_in=D, d_sae=8, hook_name=IN_HOOK.format(layer=5))),
                     OUT_HOOK.format(layer=5))
    narrow = transcoder(0, torch.zeros(8, 4), torch.zeros(4), torch.zeros(4, 8), torch.zeros(8))
    for tcs, words in (({0: wrong_hook}, "replaces an MLP"), ({5: far}, "layers 0..1"), ({0: narrow}, "width 8")):
        with pytest.raises(InterplabError, match=words):
            evaluate_transcoders(model, tcs, batches(1))
    with pytest.raises(InterplabError, match=r"no transcoder for layer\(s\) \[1\]"):
        evaluate_transcoders(model, {0: good}, batches(1), layers=[1])
    with pytest.raises(InterplabError, match="--transcoders is required"):
        TranscoderEvalConfig().validate()
    with pytest.raises(InterplabError, match="--layers"):
        TranscoderEvalConfig(transcoders="x", layers=[1, 1]).validate()


def gpt2_relu(tiny_gpt2_dir):
    """The tiny GPT-2 with ReLU MLPs, and the transcoders equal to them (Conv1D: x @ weight + bias)."""
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    tcs = {}
    for l, block in enumerate(model.blocks):
        block.mlp.act = nn.ReLU()
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        tcs[l] = transcoder(l, fc.weight, fc.bias, proj.weight, proj.bias)
    return model, tcs


def test_run_writes_the_folder(tiny_gpt2_dir, tmp_path, corpus):
    model, tcs = gpt2_relu(tiny_gpt2_dir)
    cfg = TranscoderEvalConfig(transcoders="exact", corpus=corpus, split="all", tokens=64, ctx_len=16, batch_size=2,
                               layers=[1], out=str(tmp_path / "run"), device="cpu")
    result = run_transcoder_eval(cfg, transcoders=tcs, model=model, progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["kind"] == "transcoder eval" and saved["n_tokens"] == 4 * 15 == result["n_tokens"]
    assert list(saved["layers"]) == ["1"] and saved["replacement"]["layers"] == [0, 1, 2]
    assert abs(saved["layers"]["1"]["kl"]["transcoder"]["mean"]) < 1e-5
    assert abs(saved["replacement"]["kl"]["transcoder"]["mean"]) < 1e-5
    report = (tmp_path / "run" / "report.md").read_text()
    assert format_summary(saved) in report and "full replacement of 3 layer(s)" in report
    assert run_transcoder_eval(cfg, transcoders=tcs, model=model, progress=False) == saved  # complete: reported


def test_run_loads_a_set_folder_and_a_single_folder(tiny_gpt2_dir, tmp_path, corpus):
    model, tcs = gpt2_relu(tiny_gpt2_dir)
    save_transcoder_set(TranscoderSet(tcs, IN_HOOK, OUT_HOOK), str(tmp_path / "set"))
    base = dict(corpus=corpus, split="all", tokens=32, ctx_len=16, batch_size=2, device="cpu")
    full = run_transcoder_eval(TranscoderEvalConfig(transcoders=str(tmp_path / "set"), out=str(tmp_path / "a"),
                                                    **base), model=model, progress=False)
    assert list(full["layers"]) == ["0", "1", "2"] and full["replacement"]["complete"]
    assert max(abs(m["kl"]["transcoder"]["mean"]) for m in full["layers"].values()) < 1e-5
    one = run_transcoder_eval(TranscoderEvalConfig(transcoders=str(tmp_path / "set" / "layer_2"),
                                                   out=str(tmp_path / "b"), **base), model=model, progress=False)
    assert list(one["layers"]) == ["2"] and one["replacement"]["layers"] == [2]
    assert not one["replacement"]["complete"]
    assert one["layers"]["2"]["kl"] == full["layers"]["2"]["kl"]  # the same splice, from either folder
    with pytest.raises(InterplabError, match="no transcoder set"):
        run_transcoder_eval(TranscoderEvalConfig(transcoders=str(tmp_path / "nothing"), out=str(tmp_path / "c"),
                                                 **base), model=model, progress=False)
    assert not (tmp_path / "c").exists()  # refused: nothing written
