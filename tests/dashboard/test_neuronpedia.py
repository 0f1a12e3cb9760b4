"""Neuronpedia export: every field of both layouts checked against the dashboard data it came from."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from interplab.cli import main
from interplab.dashboard import store
from interplab.dashboard.configs import NeuronpediaConfig
from interplab.dashboard.neuronpedia import export_neuronpedia, format_summary
from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic

HIST_EDGES = [0.0, 1.0, 2.0, 4.0]  # uneven on purpose: bar values are the centres 0.5, 1.5, 3.0
LOGIT_EDGES = [-1.0, 0.0, 1.0]
D_SAE, CHUNK = 5, 2


def example(tokens, acts, context):
    return {"tokens": tokens, "acts": acts, "max_pos": acts.index(max(acts)), "context": context,
            "position": 100 * context}


def latent(i: int) -> dict:
    """Latent 2 is dead; latent 1's top example holds HTML, which must pass through untouched."""
    if i == 2:
        return {"id": i, "freq": 0.0, "max_act": 0.0, "mean_act": 0.0, "hist": [0, 0, 0], "top": [],
                "quantiles": [{"bin": [0.0, 0.0], "examples": []}],
                "logits": {"top": [], "bottom": [], "hist": [0, 0]}, "corr_latents": [], "corr_neurons": []}
    m = 1.0 + i
    top = [example(["<b>", f" t{i}", "\n"], [0.0, m, m / 4], 10 + i), example(["x", "y"], [m / 2, 0.0], 20 + i)]
    return {"id": i, "freq": 0.01 * (i + 1), "max_act": m, "mean_act": m / 3, "hist": [i, 2, 1], "top": top,
            "quantiles": [{"bin": [0.0, m / 2], "examples": [example(["q"], [m / 3], 30 + i)]},
                          {"bin": [m / 2, m], "examples": []}],
            "logits": {"top": [[f" up{i}", 2.5], [" u2", 1.0]], "bottom": [[" d1", -3.0], [" d2", -0.5]],
                       "hist": [3, 4]},
            "corr_latents": [[(i + 1) % D_SAE, 0.75]], "corr_neurons": [[7, -0.25], [3, 0.125]]}


@pytest.fixture()
def site(tmp_path):
    meta = {"sae": "runs/sae", "model": "smollm2-135m", "hook": "blocks.6.hook_resid_post", "corpus": "python-docs",
            "n_tokens": 1280, "ctx_len": 128, "d_sae": D_SAE, "chunk_size": CHUNK, "n_chunks": 3, "window": [12, 4],
            "hist_edges": HIST_EDGES, "logit_hist_edges": LOGIT_EDGES, "quantile_bins": [0, 0.5, 1]}
    lat = [latent(i) for i in range(D_SAE)]
    index = {"id": list(range(D_SAE)), "freq": [x["freq"] for x in lat], "max_act": [x["max_act"] for x in lat],
             "mean_act": [x["mean_act"] for x in lat], "top_token": ["t"] * D_SAE, "top_logit": ["u"] * D_SAE}
    store.write_site_data(str(tmp_path / "site"), meta, index, [lat[0:2], lat[2:4], lat[4:5]])
    return str(tmp_path / "site")


def read_jsonl_gz(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_saedashboard_batches_field_by_field(site, tmp_path):
    out = tmp_path / "np"
    result = export_neuronpedia(NeuronpediaConfig(site=site, out=str(out), layout="saedashboard",
                                                  source_set="res-test", features_per_batch=3))
    assert (result["n_features"], result["n_dead"], result["n_batches"]) == (5, 1, 2)
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json", "skipped_indexes.json"]
    assert json.loads((out / "skipped_indexes.json").read_text()) == {
        "model_id": "smollm2-135m", "layer": 6, "sae_set": "res-test", "skipped_indexes": [2]}
    b0, b1 = (json.loads((out / f"batch-{b}.json").read_text()) for b in (0, 1))
    assert {k: b0[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")} == {
        "model_id": "smollm2-135m", "layer": 6, "sae_set": "res-test", "sae_id_suffix": None}
    assert [f["feature_index"] for f in b0["features"]] == [0, 1]  # the dead latent 2 is skipped
    assert [f["feature_index"] for f in b1["features"]] == [3, 4]
    f = b1["features"][0]  # latent 3
    src = latent(3)
    assert f["frac_nonzero"] == src["freq"]
    assert f["pos_str"] == [" up3", " u2"] and f["pos_values"] == [2.5, 1.0]
    assert f["neg_str"] == [" d1", " d2"] and f["neg_values"] == [-3.0, -0.5]
    assert f["freq_hist_data_bar_values"] == [0.5, 1.5, 3.0] and f["freq_hist_data_bar_heights"] == [3, 2, 1]
    assert f["logits_hist_data_bar_values"] == [-0.5, 0.5] and f["logits_hist_data_bar_heights"] == [3, 4]
    assert f["correlated_features_indices"] == [4] and f["correlated_features_pearson"] == [0.75]
    assert f["correlated_neurons_indices"] == [7, 3] and f["correlated_neurons_pearson"] == [-0.25, 0.125]
    assert (f["n_prompts_total"], f["n_tokens_in_prompt"], f["dataset"]) == (10, 128, "python-docs")
    for empty in ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                  "correlated_neurons_l1", "correlated_features_l1", "decoder_weights_dist"):
        assert f[empty] == []
    acts = f["activations"]
    assert len(acts) == 3  # 2 top + 1 quantile example
    assert acts[0] == {"bin_min": -1, "bin_max": 4.0, "bin_contains": -1, "tokens": ["<b>", " t3", "\n"],
                       "values": [0.0, 4.0, 1.0], "qualifying_token_index": 1, "dfa_values": [], "dfa_maxValue": 0,
                       "dfa_targetIndex": -1}
    assert acts[1]["tokens"] == ["x", "y"] and acts[1]["qualifying_token_index"] == 0
    assert acts[2] == {"bin_min": 0.0, "bin_max": 2.0, "bin_contains": None, "tokens": ["q"], "values": [4.0 / 3],
                       "qualifying_token_index": 0, "dfa_values": [], "dfa_maxValue": 0, "dfa_targetIndex": -1}
    assert "max_act" not in f


def test_export_layout_field_by_field(site, tmp_path):
    out = tmp_path / "np"
    result = export_neuronpedia(NeuronpediaConfig(site=site, out=str(out), source_set="res-test", release="rel",
                                                  creator_id="u1", url="https://example.org", features_per_batch=2))
    root = out / "smollm2-135m" / "6-res-test"
    assert result["export_dir"] == str(root) and result["source_id"] == "6-res-test"
    assert sorted(p.name for p in (root / "features").iterdir()) == [f"batch-{b}.jsonl.gz" for b in range(3)]
    features = [r for b in range(3) for r in read_jsonl_gz(root / "features" / f"batch-{b}.jsonl.gz")]
    activations = [r for b in range(3) for r in read_jsonl_gz(root / "activations" / f"batch-{b}.jsonl.gz")]
    assert [r["index"] for r in features] == ["0", "1", "2", "3", "4"]  # dead latents exist too, empty
    dead = features[2]
    assert dead["maxActApprox"] == 0.0 and dead["frac_nonzero"] == 0.0 and dead["pos_str"] == []
    f1 = features[1]
    assert {k: f1[k] for k in ("modelId", "layer", "creatorId", "maxActApprox", "hasVector", "frac_nonzero")} == {
        "modelId": "smollm2-135m", "layer": "6-res-test", "creatorId": "u1", "maxActApprox": 2.0,
        "hasVector": False, "frac_nonzero": 0.02}
    assert f1["pos_str"] == [" up1", " u2"] and f1["neg_values"] == [-3.0, -0.5]
    assert f1["freq_hist_data_bar_heights"] == [1, 2, 1] and f1["freq_hist_data_bar_values"] == [0.5, 1.5, 3.0]
    assert f1["correlated_features_indices"] == [2] and f1["correlated_neurons_pearson"] == [-0.25, 0.125]
    by_feature = {}
    for a in activations:
        by_feature.setdefault(a["index"], []).append(a)
    assert sorted(by_feature) == ["0", "1", "3", "4"] and all(len(v) == 3 for v in by_feature.values())
    a = by_feature["1"][0]
    assert a["tokens"] == ["<b>", " t1", "\n"] and a["values"] == [0.0, 2.0, 0.5]
    assert (a["maxValue"], a["maxValueTokenIndex"], a["minValue"]) == (2.0, 1, 0.0)
    assert (a["binMin"], a["binMax"], a["binContains"], a["qualifyingTokenIndex"]) == (-1, 2.0, -1, 1)
    assert (a["dataSource"], a["dataIndex"], a["layer"], a["modelId"]) == ("python-docs", "11", "6-res-test",
                                                                            "smollm2-135m")
    q = by_feature["1"][2]
    assert (q["binMin"], q["binMax"], q["binContains"], q["dataIndex"]) == (0.0, 1.0, None, "31")
    ids = [x["id"] for x in activations]
    assert len(set(ids)) == len(ids) and all(len(i) == 25 and i[0].isalpha() and i.isalnum() for i in ids)
    source = json.loads((root / "source.jsonl").read_text())
    assert {k: source[k] for k in ("id", "modelId", "setName", "dataset", "num_prompts", "num_tokens_in_prompt")} == {
        "id": "6-res-test", "modelId": "smollm2-135m", "setName": "res-test", "dataset": "python-docs",
        "num_prompts": 10, "num_tokens_in_prompt": 128}
    release = json.loads((root / "release.jsonl").read_text())
    assert release["name"] == "rel" and release["urls"] == ["https://example.org"]
    sourceset = json.loads((root / "sourceset.jsonl").read_text())
    assert (sourceset["name"], sourceset["releaseName"], sourceset["modelId"]) == ("res-test", "rel", "smollm2-135m")
    assert json.loads((root / "model.jsonl").read_text())["id"] == "smollm2-135m"
    again = export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "np2"), source_set="res-test",
                                                 features_per_batch=2))
    ids2 = [x["id"] for b in range(3) for x in read_jsonl_gz(
        tmp_path / "np2/smollm2-135m/6-res-test/activations" / f"batch-{b}.jsonl.gz")]
    assert ids2 == ids  # deterministic ids: a re-export re-imports the same rows
    assert "5 latents (1 dead)" in format_summary(again) and "6-res-test" in format_summary(again)


@pytest.mark.parametrize("overrides,message", [
    (dict(model_id="Runs/My Model"), "not a Neuronpedia id"),
    (dict(source_set="Bad Set"), "--source-set"),
    (dict(layout="zip"), "--layout 'zip' is not valid"),
    (dict(features_per_batch=0), "--features-per-batch"),
])
def test_bad_options(site, tmp_path, overrides, message):
    with pytest.raises(InterplabError, match=message):
        export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "o"), **overrides))


def test_layer_needed_when_the_hook_has_none(tmp_path, site):
    meta = store.load_meta(site)
    meta["hook"] = "hook_embed"
    write_url_atomic(f"{site}/data/meta.js", store.encode_meta(meta).encode())
    with pytest.raises(InterplabError, match="pass --layer"):
        export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "o")))
    result = export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "o"), layer=0))
    assert result["source_id"] == "0-interplab-res"


def test_missing_site_is_a_clear_error(tmp_path):
    with pytest.raises(InterplabError, match="not found"):
        export_neuronpedia(NeuronpediaConfig(site=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))


META_PREFIX = b"window.INTERPLAB_META = "
DAMAGED_META = {
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "truncated": (META_PREFIX + b'{"format":1,"sae":"s', "expected 'window.INTERPLAB_META = ... ;'"),
    "bad JSON": (META_PREFIX + b'{"format":1,,};\n', "does not parse"),
    "a list": (META_PREFIX + b"[1, 2];\n", "holds JSON list"),
    "missing keys": (META_PREFIX + b'{"format":1,"d_sae":5};\n', "lacks"),
    "zero ctx_len": (None, "ctx_len must be an integer >= 1"),
    "text hook": (None, "hook must be a string"),
}


@pytest.mark.parametrize("case", list(DAMAGED_META))
def test_a_damaged_meta_js_is_one_error_and_nothing_written(site, tmp_path, case, capsys):
    meta_js = tmp_path / "site" / "data" / "meta.js"
    data, message = DAMAGED_META[case]
    if data is None:  # a well-formed file whose values are wrong
        meta = store.decode_meta(meta_js.read_text())
        meta.update({"zero ctx_len": {"ctx_len": 0}, "text hook": {"hook": 6}}[case])
        data = store.encode_meta(meta).encode()
    meta_js.write_bytes(data)
    out = tmp_path / "np"
    with pytest.raises(InterplabError, match=re.escape(message)):
        export_neuronpedia(NeuronpediaConfig(site=site, out=str(out), layout="both"))
    assert not out.exists()
    assert main(["dashboard", "neuronpedia", "--site", site, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


@pytest.mark.parametrize("damage", ["binary", "not a latent", "latent without fields"])
def test_a_damaged_chunk_is_one_error_before_anything_is_written(site, tmp_path, damage):
    chunk = tmp_path / "site" / "data" / store.chunk_name(2)
    chunk.write_bytes({"binary": b"\xff\xfe\x00garbage",
                       "not a latent": b"window.INTERPLAB_CHUNK(2, [5]);\n",
                       "latent without fields": b'window.INTERPLAB_CHUNK(2, [{"id": 4}]);\n'}[damage])
    out = tmp_path / "np"
    with pytest.raises(InterplabError, match=r"not dashboard data"):
        export_neuronpedia(NeuronpediaConfig(site=site, out=str(out), layout="both"))
    assert not out.exists()  # the first two chunks were fine, yet no batch of them was written


def test_a_foreign_out_is_refused_untouched_and_a_previous_export_is_replaced(site, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("theirs")
    with pytest.raises(InterplabError, match=r"holds files that are not a Neuronpedia export \(found notes.txt\)"):
        export_neuronpedia(NeuronpediaConfig(site=site, out=str(foreign)))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    first = export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "o"), layout="both"))
    again = export_neuronpedia(NeuronpediaConfig(site=site, out=str(tmp_path / "o"), layout="both"))
    assert again["n_features"] == first["n_features"] == D_SAE
