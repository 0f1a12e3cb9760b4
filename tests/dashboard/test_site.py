"""The static site: the page files it writes, that they need no network and never parse data as HTML, and
`build_site` gluing the data builder to the pages. The pages' behaviour in a browser is in test_browser.py."""

from __future__ import annotations

import re
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

from interplab.dashboard import site, store
from interplab.fileio import read_url

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_BOLD = "<b>bold</b>"
SHOWCASE = 301  # the latent whose top example holds the XSS strings, its max (12.34) on the script token
HIST_EDGES = [float(x) for x in range(21)]
LOGIT_EDGES = [x / 2 for x in range(-10, 11)]


def _example(tokens: list[str], acts: list[float], context: int) -> dict:
    max_pos = max(range(len(acts)), key=acts.__getitem__)
    return {"tokens": tokens, "acts": acts, "max_pos": max_pos, "context": context, "position": 7 * context + max_pos}


def fake_latent(i: int) -> dict:
    """Latent i of the fake SAE: dead when i % 50 == 0; SHOWCASE carries the XSS strings."""
    if i % 50 == 0:
        return {"id": i, "freq": 0.0, "max_act": 0.0, "mean_act": 0.0, "hist": [0] * 20, "top": [],
                "quantiles": [{"bin": [0.0, 0.0], "examples": []}],
                "logits": {"top": [], "bottom": [], "hist": [0] * 20}, "corr_latents": [], "corr_neurons": []}
    max_act = 12.34 if i == SHOWCASE else round(1 + (i % 17) * 0.9, 2)
    if i == SHOWCASE:
        top0 = _example(["Hello", " world", XSS_SCRIPT, XSS_BOLD, "\n", " end"], [0.0, 1.5, 12.34, 3.0, 0.0, 0.5], 3)
    else:
        top0 = _example(["a", f" tok{i}", " b", "\n"], [0.1, max_act, max_act / 2, 0.0], i)
    others = [_example(["x", " y", " z"], [max_act * f, 0.0, max_act * f / 2], 100 + k)
              for k, f in enumerate((0.8, 0.5, 0.3))]
    hist = [0] * 20
    for b in range(int(max_act) + 1):
        hist[b] = 10 * (int(max_act) + 1 - b)
    return {
        "id": i, "freq": (i % 50) / 1000, "max_act": max_act, "mean_act": round(max_act / 3, 3), "hist": hist,
        "top": [top0] + others,
        "quantiles": [{"bin": [round(max_act * q / 5, 4), round(max_act * (q + 1) / 5, 4)],
                       "examples": [others[0]] if q == 3 else []} for q in range(5)],
        "logits": {"top": [[f" up{i}_{k}", 2.0 - k / 10] for k in range(10)],
                   "bottom": [[f" down{k}", -2.0 + k / 10] for k in range(10)],
                   "hist": [k if k < 15 else 0 for k in range(20)]},
        "corr_latents": [[(i + d) % 600, 0.9 - d / 20] for d in range(1, 4)],
        "corr_neurons": [[17 + d, 0.5 - d / 20] for d in range(3)],
    }


def top_token(i: int) -> str:
    return {SHOWCASE: XSS_SCRIPT, SHOWCASE + 1: XSS_BOLD}.get(i, f" tok{i}")


def write_fake_site(folder: str, d_sae: int = 600, chunk_size: int = 256, full: bool = True) -> dict:
    """A complete site (data through `store.write_site_data`, then the pages) for a fake SAE of `d_sae` latents.

    `full=False` writes bare latents ({"id": i}) for index-page tests at tens of thousands of latents."""
    latents = [fake_latent(i) if full else {"id": i} for i in range(d_sae)]
    n_chunks = store.n_chunks_for(d_sae, chunk_size)
    meta = {"sae": "runs/fake-sae", "model": "fake-model", "hook": "blocks.3.hook_resid_post", "corpus": "fake",
            "n_tokens": 200_000, "ctx_len": 64, "d_sae": d_sae, "chunk_size": chunk_size, "n_chunks": n_chunks,
            "window": [12, 4], "hist_edges": HIST_EDGES, "logit_hist_edges": LOGIT_EDGES,
            "quantile_bins": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
    index = {"id": list(range(d_sae)),
             "freq": [(i % 50) / 1000 for i in range(d_sae)],
             "max_act": [fake_latent(i)["max_act"] if full else float(i % 13) for i in range(d_sae)],
             "mean_act": [float(i % 7) for i in range(d_sae)],
             "top_token": [top_token(i) for i in range(d_sae)],
             "top_logit": [f" up{i}_0" for i in range(d_sae)]}
    chunks = [latents[c * chunk_size:(c + 1) * chunk_size] for c in range(n_chunks)]
    written = store.write_site_data(folder, meta, index, chunks)
    site.write_assets(folder)
    return written


def test_write_assets_copies_every_page_file_and_leaves_the_data(tmp_path: Path) -> None:
    folder = str(tmp_path / "site")
    write_fake_site(folder, d_sae=10, chunk_size=4)
    before = (tmp_path / "site" / "data" / "meta.js").read_bytes()
    written = site.write_assets(folder)
    assert sorted(Path(p).name for p in written) == sorted(site.ASSET_FILES)
    for name in site.ASSET_FILES:
        assert (tmp_path / "site" / name).read_bytes() == (site.ASSETS / name).read_bytes()
    assert (tmp_path / "site" / "data" / "meta.js").read_bytes() == before
    assert store.load_latent(folder, 9)["id"] == 9


def test_write_assets_to_an_fsspec_url() -> None:
    site.write_assets("memory://dash-site")
    assert read_url("memory://dash-site/latent.html") == (site.ASSETS / "latent.html").read_bytes()
    assert site.site_index("memory://dash-site") == "memory://dash-site/index.html"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_script = tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


@pytest.mark.parametrize("page", ["index.html", "latent.html"])
def test_pages_reference_only_local_files(page: str) -> None:
    parser = _Refs()
    parser.feed((site.ASSETS / page).read_text())
    local = set(site.ASSET_FILES) | {"data/meta.js", "data/index.js", "#"}
    assert parser.refs and set(parser.refs) <= local, set(parser.refs) - local
    assert parser.inline_scripts == 0  # all code in files, so a strict Content-Security-Policy holds


def test_assets_use_no_network_and_never_parse_data_as_html() -> None:
    for name in site.ASSET_FILES:
        text = (site.ASSETS / name).read_text()
        # No CDN, font or analytics URL; the SVG namespace is a name, not a fetch.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
        assert "@import" not in text and "url(" not in text, name
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                         "createContextualFragment", "DOMParser"):
                assert sink not in text, (name, sink)
            assert "setAttribute(\"style\"" not in text  # inline style attributes would break the CSP


def test_chunk_file_names_agree_with_the_store() -> None:
    # The page computes the chunk file name itself; it must be the name store.py writes (5-digit zero padding).
    js = (site.ASSETS / "common.js").read_text()
    assert 'data/chunk-${String(chunk).padStart(5, "0")}.js' in js
    assert store.chunk_name(3) == "chunk-00003.js"


def test_build_site_runs_the_data_builder_then_writes_the_pages(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_build(cfg, *, model=None, sae=None):
        calls.append(cfg)
        assert model is None and sae is None
        write_fake_site(cfg.out, d_sae=5, chunk_size=2)
        return {"d_sae": 5, "build_s": 0.1}

    monkeypatch.setattr(site, "build_dashboard_data", fake_build)
    monkeypatch.chdir(tmp_path)
    cfg = types.SimpleNamespace(out="out-site")
    summary = site.build_site(cfg)
    assert calls == [cfg]
    assert summary["d_sae"] == 5 and summary["build_s"] == 0.1
    assert summary["index"] == str(tmp_path / "out-site" / "index.html")
    assert Path(summary["index"]).is_file()
    assert {Path(p).name for p in summary["assets"]} == set(site.ASSET_FILES)
    line = site.format_build(summary)
    assert (tmp_path / "out-site" / "index.html").as_uri() in line and "interplab dashboard serve" in line


def test_site_index_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert site.site_index("a/b") == str(tmp_path / "a" / "b" / "index.html")
    assert site.site_index(f"file://{tmp_path}/s") == str(tmp_path / "s" / "index.html")
    assert site.site_index("s3://bucket/site/") == "s3://bucket/site/index.html"
