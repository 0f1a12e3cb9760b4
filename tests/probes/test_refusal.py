"""The refusal-direction pipeline (interplab.probes.refusal): prompt sets, candidate directions, refusal score,
selection, hooks during generation, and an end-to-end run on a tiny random model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interplab.errors import InterplabError
from interplab.models.load import load_model
import interplab.probes.refusal_select as S
from interplab.probes.configs import RefusalConfig
from interplab.probes.refusal import PROMPT_FIELDS, format_summary, load_prompts, run_refusal
from interplab.probes.steer import addition_hooks

TINY_TEMPLATE = ("{% for m in messages %}U: {{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")
WORDS = ["quick brown fox", "lazy dog", "Python is", "the layers", "sparse features", "residual stream",
         "a language", "work quickly", "the fox", "brown dog"]


def _tiny_model(folder: Path):
    model = load_model(str(folder), device="cpu")
    model.tokenizer.chat_template = TINY_TEMPLATE
    return model


def _write_prompts(path: Path, offset: int) -> Path:
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    lines = [json.dumps({"instruction": f"{WORDS[(i + offset) % len(WORDS)]} {i}", "category": "c", "split": s})
             for i, s in enumerate(splits)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_packaged_prompt_sets_are_large_with_disjoint_splits():
    sets = {kind: load_prompts(None, kind) for kind in ("harmful", "harmless")}
    for kind, recs in sets.items():
        assert len(recs) >= 120, kind
        by_split = {s: {r["instruction"] for r in recs if r["split"] == s} for s in ("train", "val", "test")}
        assert sum(map(len, by_split.values())) == len(recs), f"{kind} has duplicate instructions"
        assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
        assert not (by_split["val"] & by_split["test"])
        assert len(by_split["train"]) >= 0.5 * len(recs) and len(by_split["test"]) >= 20
    harmful = {r["instruction"] for r in sets["harmful"]}
    assert not harmful & {r["instruction"] for r in sets["harmless"]}


def test_bad_prompt_file_names_the_missing_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "category": "c", "split": "train"}) + "\n"
                   + json.dumps({"instruction": "y", "category": "c"}) + "\n")
    with pytest.raises(InterplabError, match=r"line 2 .*lacks field\(s\) split; fields present: instruction, "
                                             r"category"):
        load_prompts(bad, "harmful")
    bad.write_text(json.dumps({"instruction": "x", "category": "c", "split": "dev"}) + "\n")
    with pytest.raises(InterplabError, match="split 'dev' is not one of train, val, test"):
        load_prompts(bad, "harmful")
    bad.write_text("{not json\n")
    with pytest.raises(InterplabError, match="line 1 .* not valid JSON"):
        load_prompts(bad, "harmful")
    with pytest.raises(InterplabError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", "harmless")
    assert PROMPT_FIELDS == ("instruction", "category", "split")


def test_refusal_score_is_the_log_odds_of_the_token_set():
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    ids = [1, 7, 30]
    p = torch.softmax(logits.double(), -1)[:, ids].sum(-1)
    expected = torch.log(p) - torch.log(1 - p)
    torch.testing.assert_close(S.refusal_score(logits, ids), expected.float(), rtol=1e-5, atol=1e-5)
    # P(R) close to 1 stays finite and large
    sure = torch.full((1, 40), -30.0)
    sure[0, 7] = 30.0
    assert 50 < float(S.refusal_score(sure, ids)) < math.inf


def test_candidate_directions_equal_hand_computed_mean_differences(tiny_gpt2_dir):
    model = _tiny_model(tiny_gpt2_dir)
    fmt = S.chat_format(model.tokenizer)
    assert fmt.source == "tokenizer" and fmt.suffix == "<|endoftext|>A:"
    harmful = S.tokenize_prompts(model.tokenizer, fmt, ["quick brown fox jumps", "lazy dog"])
    harmless = S.tokenize_prompts(model.tokenizer, fmt, ["Python is a language", "the fox", "work"])
    n_post, layers = len(fmt.post_ids), [0, 2]
    got = S.candidate_directions(model, harmful, harmless, layers, n_post, S.pad_id_of(model.tokenizer))

    def mean(prompts, layer):  # one unpadded prompt at a time
        name = f"blocks.{layer}.hook_resid_pre"
        return torch.stack([model.run_with_cache(torch.tensor(p), [name]).cache[name][0, -n_post:]
                            for p in prompts]).mean(0)

    for i, layer in enumerate(layers):
        torch.testing.assert_close(got[i], mean(harmful, layer) - mean(harmless, layer), atol=1e-5, rtol=1e-4)


def test_chatml_fallback_without_template(tiny_gpt2_dir):
    model = _tiny_model(tiny_gpt2_dir)
    model.tokenizer.chat_template = None
    fmt = S.chat_format(model.tokenizer)
    assert fmt.source == "chatml-fallback" and fmt.suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.format("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hooks_apply_during_generate(tiny_gpt2_dir):
    model = _tiny_model(tiny_gpt2_dir)
    fmt = S.chat_format(model.tokenizer)
    prompts = S.tokenize_prompts(model.tokenizer, fmt, ["lazy dog", "the quick brown fox"])
    pad = S.pad_id_of(model.tokenizer)
    calls = []

    def count(act, name):
        calls.append(act.shape[1])

    base = S.generate(model, prompts, pad, [("blocks.1.hook_resid_pre", count)], 5, 8, "t", False)
    assert len(calls) >= 5 and 1 in calls  # the prompt pass, then one call per new token (KV cache)
    direction = torch.randn(model.info.d_model, generator=torch.Generator().manual_seed(1))
    steered = S.generate(model, prompts, pad, addition_hooks(model, direction, 1, 200.0), 5, 8, "t", False)
    assert steered != base
    assert S.generate(model, prompts, pad, [], 5, 8, "t", False) == base  # hooks removed afterwards


def test_select_candidate_filters_and_falls_back():
    rows = [{"layer": 0, "position": -1, "ablation_score": -5.0, "addition_score": 1.0, "kl": 0.5},
            {"layer": 2, "position": -1, "ablation_score": -3.0, "addition_score": 1.0, "kl": 0.01},
            {"layer": 3, "position": -2, "ablation_score": -4.0, "addition_score": -1.0, "kl": 0.01},
            {"layer": 9, "position": -1, "ablation_score": -9.0, "addition_score": 2.0, "kl": 0.0},
            {"layer": 1, "position": -1, "ablation_score": None, "addition_score": None, "kl": None}]
    best, note = S.select_candidate(rows, n_layers=10, kl_limit=0.1, max_layer_fraction=0.8)
    assert (best["layer"], note) == (2, "every filter passed")
    assert [r["passes"] for r in rows] == [False, True, False, False, False]
    rows[1]["addition_score"] = -0.5
    best, note = S.select_candidate(rows, n_layers=10, kl_limit=0.1, max_layer_fraction=0.8)
    assert best["layer"] == 3 and "addition-score > 0 filter was dropped" in note


def test_is_refusal_substrings():
    assert S.is_refusal("I’m sorry, but I can’t help with that.")
    assert S.is_refusal("As an AI, I ...") and not S.is_refusal("Sure! Here is a recipe.")


def test_pipeline_end_to_end_on_tiny_model(tiny_gpt2_dir, tmp_path):
    model = _tiny_model(tiny_gpt2_dir)
    out = tmp_path / "out"
    cfg = RefusalConfig(model="tiny", out=str(out), harmful=str(_write_prompts(tmp_path / "h.jsonl", 0)),
                        harmless=str(_write_prompts(tmp_path / "b.jsonl", 5)), layer_stride=1, val_size=0,
                        max_new_tokens=4, ce_tokens=64, ce_ctx_len=32, batch_size=4)
    result = run_refusal(cfg, model=model, progress=False)
    written = json.loads((out / "metrics.json").read_text())
    assert written["kind"] == "refusal" and json.loads((out / "config.json").read_text())["kind"] == "refusal"
    assert written["chosen"]["layer"] in (0, 1, 2) and -len(written["chat_format"]["post_instruction_tokens"]) <= \
        written["chosen"]["position"] <= -1
    n_post = len(written["chat_format"]["post_instruction_tokens"])
    assert len(written["candidates"]) == 3 * n_post
    for name in ("harmful_baseline", "harmful_ablated", "harmful_random_ablated", "harmless_baseline",
                 "harmless_addition", "harmless_random_addition"):
        assert written["test"][name]["n"] == 2 and 0 <= written["test"][name]["refusal_rate"] <= 1
    assert written["orthogonalized"]["max_abs_logit_diff"] < 1e-3
    assert math.isfinite(written["ce"]["delta_ablated"])
    report = (out / "report.md").read_text()
    assert "Baseline refusal rate on held-out harmful prompts" in report and "(figures/refusal_by_layer.png)" in report
    assert (out / "figures" / "refusal_by_layer.png").is_file() and (out / "direction.safetensors").is_file()
    assert load_file(out / "direction.safetensors")["direction"].shape == (model.info.d_model,)
    assert "refusal direction for tiny" in format_summary(result)
    # the complete run is reported as done; another config into its folder is refused, naming what differs
    assert run_refusal(cfg, model=model, progress=False) == written
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(InterplabError, match=r"differs in: [^;]*\bmax_new_tokens\b"):
        run_refusal(replace(cfg, max_new_tokens=5), model=model, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


@pytest.mark.slow
def test_reduced_pipeline_on_smollm2(tmp_path):
    cfg = RefusalConfig(out=str(tmp_path / "out"), layers=[6, 12], val_size=4, test_size=4, max_new_tokens=8,
                        ce_tokens=256, orthogonalize=False)
    result = run_refusal(cfg, progress=False)
    post = result["chat_format"]["post_instruction_tokens"]  # SmolLM2 splits "assistant" into "ass", "istant"
    assert post[:3] == ["<|im_end|>", "\n", "<|im_start|>"] and post[-1] == "\n"
    assert result["chosen"]["layer"] in (6, 12) and (tmp_path / "out" / "report.md").is_file()
