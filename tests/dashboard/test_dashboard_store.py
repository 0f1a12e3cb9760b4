"""The dashboard data files: exact layout, round trip, validation, and what an interrupted write leaves."""

from __future__ import annotations

import json

import pytest

from interplab.dashboard import store
from interplab.errors import InterplabError


def make_meta(d_sae: int = 5, chunk_size: int = 2) -> dict:
    return {"sae": "saes/a", "model": "tiny", "hook": "blocks.0.hook_resid_post", "corpus": "python-docs",
            "n_tokens": 100, "ctx_len": 10, "d_sae": d_sae, "chunk_size": chunk_size,
            "n_chunks": -(-d_sae // chunk_size), "window": [3, 1], "hist_edges": [0.1, 1.0, 10.0],
            "logit_hist_edges": [-1.0, 0.0, 1.0], "quantile_bins": [[0.0, 0.5], [0.5, 1.0]]}


def make_index(d_sae: int = 5) -> dict:
    return {"id": list(range(d_sae)), "freq": [0.1] * d_sae, "max_act": [1.5] * d_sae, "mean_act": [0.5] * d_sae,
            "top_token": [f" tok{i}" for i in range(d_sae)], "top_logit": ["x"] * d_sae}


def make_latent(i: int) -> dict:
    example = {"tokens": ["<script>alert(1)</script>", " é", "\u2028"], "acts": [0.0, 1.5, 0.25], "max_pos": 1,
               "context": 7, "position": 4}
    return {"id": i, "freq": 0.1, "max_act": 1.5, "mean_act": 0.5, "hist": [1, 2], "top": [example],
            "quantiles": [{"bin": [0.0, 0.75], "examples": [example]}, {"bin": [0.75, 1.5], "examples": []}],
            "logits": {"top": [[" a", 1.0]], "bottom": [[" b", -1.0]], "hist": [1, 1]},
            "corr_latents": [[(i + 1) % 5, 0.5]], "corr_neurons": []}


def chunked(d_sae: int = 5, chunk_size: int = 2) -> list[list[dict]]:
    return [[make_latent(i) for i in range(c, min(d_sae, c + chunk_size))] for c in range(0, d_sae, chunk_size)]


def test_round_trip_and_exact_file_layout(tmp_path):
    site = str(tmp_path / "site")
    meta = store.write_site_data(site, make_meta(), make_index(), chunked())
    data = tmp_path / "site" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["chunk-00000.js", "chunk-00001.js", "chunk-00002.js",
                                                       "index.js", "meta.js"]
    meta_text = (data / "meta.js").read_text(encoding="utf-8")
    assert meta_text.startswith("window.INTERPLAB_META = {") and meta_text.endswith("};\n")
    assert json.loads(meta_text[len("window.INTERPLAB_META = "):-2]) == {**make_meta(), "format": 1} == meta
    index_text = (data / "index.js").read_text(encoding="utf-8")
    assert index_text.startswith("window.INTERPLAB_INDEX = ") and index_text.endswith(";\n")
    assert json.loads(index_text[len("window.INTERPLAB_INDEX = "):-2]) == make_index()
    chunk_text = (data / "chunk-00001.js").read_text(encoding="utf-8")
    assert chunk_text.startswith("window.INTERPLAB_CHUNK(1, [") and chunk_text.endswith("]);\n")
    # latent i sits in chunk i // chunk_size at i % chunk_size; the last chunk is short
    assert [x["id"] for x in json.loads(chunk_text[len("window.INTERPLAB_CHUNK(1, "):-3])] == [2, 3]
    assert json.loads((data / "chunk-00002.js").read_text()[len("window.INTERPLAB_CHUNK(2, "):-3])[0]["id"] == 4
    # corpus text is stored raw (the site escapes it), non-ASCII as is, U+2028 as a JSON escape
    assert "<script>alert(1)</script>" in chunk_text and " é" in chunk_text
    assert "\u2028" not in chunk_text and "\\u2028" in chunk_text
    assert store.load_meta(site) == meta
    assert store.load_index(site) == make_index()
    assert store.load_latent(site, 3) == make_latent(3)
    assert [x["id"] for x in store.iter_latents(site)] == [0, 1, 2, 3, 4]
    assert list(store.iter_latents(site)) == [make_latent(i) for i in range(5)]
    assert store.load_meta(str(data)) == meta  # a data folder itself is accepted too


def test_generator_of_chunks_and_mapping_and_fsspec_url():
    site = "memory://dashboard-store-test/site"
    store.write_site_data(site, make_meta(), make_index(), (c for c in chunked()))
    assert store.load_latent(site, 4) == make_latent(4)
    site2 = "memory://dashboard-store-test/site2"
    store.write_site_data(site2, make_meta(), make_index(), dict(enumerate(chunked())))
    assert list(store.iter_latents(site2)) == list(store.iter_latents(site))


def test_rewrite_with_fewer_latents_removes_stale_chunks(tmp_path):
    site = str(tmp_path)
    store.write_site_data(site, make_meta(5, 1), make_index(5), chunked(5, 1))
    assert (tmp_path / "data" / "chunk-00004.js").exists()
    store.write_site_data(site, make_meta(3, 2), make_index(3), chunked(3, 2))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["chunk-00000.js", "chunk-00001.js",
                                                                       "index.js", "meta.js"]
    assert [x["id"] for x in store.iter_latents(site)] == [0, 1, 2]


def test_interrupted_write_leaves_no_meta_and_readers_refuse(tmp_path):
    site = str(tmp_path)
    store.write_site_data(site, make_meta(), make_index(), chunked())

    def failing():
        yield chunked()[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write_site_data(site, make_meta(), make_index(), failing())
    assert not (tmp_path / "data" / "meta.js").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name]
    with pytest.raises(InterplabError, match="not found.*build the dashboard data first"):
        store.load_latent(site, 0)


@pytest.mark.parametrize("change, message", [
    (lambda m, i, c: m.pop("hist_edges"), "lacks \\['hist_edges'\\]"),
    (lambda m, i, c: m.update(n_chunks=2), "n_chunks=2 but ceil"),
    (lambda m, i, c: m.update(chunk_size=0), "chunk_size must be an integer >= 1"),
    (lambda m, i, c: i.pop("top_logit"), "lacks columns \\['top_logit'\\]"),
    (lambda m, i, c: i["freq"].pop(), "length d_sae=5.*'freq': 4"),
    (lambda m, i, c: c[1].reverse(), "chunk 1 must hold latents 2..3 in order"),
    (lambda m, i, c: c.pop(), "got 2 chunks of latents, meta says n_chunks=3"),
    (lambda m, i, c: c[0][0].update(freq=float("nan")), "finite JSON"),
])
def test_invalid_data_is_refused(tmp_path, change, message):
    meta, index, chunks = make_meta(), make_index(), chunked()
    change(meta, index, chunks)
    with pytest.raises(InterplabError, match=message):
        store.write_site_data(str(tmp_path), meta, index, chunks)


def test_readers_check_ranges_wrappers_and_format(tmp_path):
    site = str(tmp_path)
    store.write_site_data(site, make_meta(), make_index(), chunked())
    with pytest.raises(InterplabError, match="latent 5 out of range: the SAE has latents 0..4"):
        store.load_latent(site, 5)
    with pytest.raises(InterplabError, match="chunk 3 out of range"):
        store.load_chunk(site, 3)
    (tmp_path / "data" / "chunk-00001.js").write_text("window.INTERPLAB_CHUNK(0, []);\n")
    with pytest.raises(InterplabError, match="says it is chunk 0, expected 1"):
        store.load_latent(site, 2)
    (tmp_path / "data" / "index.js").write_text('{"id": []}')
    with pytest.raises(InterplabError, match="is not dashboard data"):
        store.load_index(site)
    (tmp_path / "data" / "meta.js").write_text(store.encode_meta({**make_meta(), "format": 99}))
    with pytest.raises(InterplabError, match="has format 99; this version reads 1"):
        store.load_meta(site)
    with pytest.raises(InterplabError, match="not found"):
        store.load_meta(str(tmp_path / "nowhere"))


def test_decoders_invert_encoders_exactly():
    latents = [make_latent(0), make_latent(1)]
    assert store.decode_chunk(store.encode_chunk(12, latents)) == (12, latents)
    assert store.decode_meta(store.encode_meta(make_meta())) == make_meta()
    assert store.decode_index(store.encode_index(make_index()).rstrip("\n")) == make_index()  # lost final newline
    assert store.chunk_name(3) == "chunk-00003.js" and store.chunk_name(123456) == "chunk-123456.js"
