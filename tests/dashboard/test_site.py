"""The static site: the page files it writes, that they need no network and never parse data as HTML, and
`build_site` gluing the data builder to the pages. The pages' behaviour in a browser is in test_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from interplab.cli import main
from interplab.dashboard import site, store
from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.data import place_label
from interplab.dashboard.serve import PAGE_POLICY, SECURITY_HEADERS
from interplab.errors import InterplabError
from interplab.fileio import read_url
from interplab.sae import SAEConfig, make_sae
from interplab.synth.configs import PlantedConfig
from interplab.synth.planted import build_planted

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
    cfg = DashboardConfig(sae="fake-sae", out="out-site")
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


# ---- the page policy, the output folder, labels, a planted model ---------------------------------------------------
@pytest.mark.parametrize("page", ["index.html", "latent.html"])
def test_pages_carry_the_servers_content_security_policy(page: str) -> None:
    """Opened from file:// there is no server to send the policy: the page itself holds it, first in <head>."""
    text = (site.ASSETS / page).read_text()
    metas = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)
    assert metas == [PAGE_POLICY]
    assert SECURITY_HEADERS["Content-Security-Policy"] == f"{PAGE_POLICY}; frame-ancestors 'none'"
    assert text.index("Content-Security-Policy") < text.index("<link") < text.index("<script")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """RUNS/planted (a small planted model, byte tokenizer) and RUNS/sae (a random TopK SAE on it); returns RUNS."""
    runs = tmp_path_factory.mktemp("planted") / "runs"
    build_planted(PlantedConfig(generator="sparse:n_features=24,d=16,mean_active=3", n_samples=512, n_layers=1,
                                d_mlp=32, n_ctx=32, out=str(runs / "planted")))
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=12, k=3, hook_name="blocks.0.hook_resid_post",
                             model=str(runs / "planted")))
    sae.save(str(runs / "sae"))
    return runs


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("foreign", ["web page", "other dashboard", "file"])
def test_build_refuses_a_folder_it_did_not_write_and_changes_nothing(tmp_path: Path, capsys, foreign: str,
                                                                      planted: Path) -> None:
    out = tmp_path / "out"
    if foreign == "file":
        out.write_text("not a folder")
    elif foreign == "web page":
        out.mkdir()
        (out / "index.html").write_text("<html>my home page</html>")
        (out / "style.css").write_text("body { color: red }")
    else:  # a site of an older interplab: no config.json says which settings built it
        write_fake_site(str(out), d_sae=4, chunk_size=2)
    before = _snapshot(out) if out.is_dir() else out.read_bytes()
    code, err = _cli(["dashboard", "build", "--sae", str(planted / "sae"), "--tokens", "64", "--ctx-len", "16",
                      "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(out) in err[0] and ("not empty" in err[0] or "is a file" in err[0]), err
    assert (_snapshot(out) if out.is_dir() else out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_build_into_its_own_site_with_other_settings_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    def fake_build(cfg, *, model=None, sae=None):
        write_fake_site(cfg.out, d_sae=5, chunk_size=2)
        return {"d_sae": 5, "n_tokens": 10, "labels": {"sae": "s", "model": "m", "corpus": "c"}}

    monkeypatch.setattr(site, "build_dashboard_data", fake_build)
    monkeypatch.chdir(tmp_path)
    site.build_site(DashboardConfig(sae="my-sae", tokens=100, out="s"))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["kind"] == "dashboard build" and config["config"]["tokens"] == 100
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["d_sae"] == 5
    before = _snapshot(tmp_path / "s")
    with pytest.raises(InterplabError, match=r"holds a different dashboard build run \(differs in: config.tokens"):
        site.build_site(DashboardConfig(sae="my-sae", tokens=200, out="s"))
    assert _snapshot(tmp_path / "s") == before
    # the same settings again: its own site, complete, so the data stays and the page files are refreshed
    (tmp_path / "s" / "style.css").write_text("stale")
    monkeypatch.setattr(site, "build_dashboard_data", lambda *a, **k: pytest.fail("rebuilt a complete site"))
    summary = site.build_site(DashboardConfig(sae="my-sae", tokens=100, out="s"))
    assert (tmp_path / "s" / "style.css").read_bytes() == (site.ASSETS / "style.css").read_bytes()
    assert summary["index"] == str(tmp_path / "s" / "index.html")


def test_place_labels_never_give_an_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "saes" / "k32").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "wiki.jsonl").write_text("{}\n")
    site_dir = str(tmp_path / "runs" / "site")
    assert place_label(str(tmp_path / "runs" / "saes" / "k32"), site_dir) == "../saes/k32"
    assert place_label("runs/saes/k32/", "runs/site") == "../saes/k32"
    assert place_label(str(tmp_path / "elsewhere" / "wiki.jsonl"), site_dir) == "wiki.jsonl"
    assert place_label(f"file://{tmp_path}/elsewhere/wiki.jsonl", site_dir) == "wiki.jsonl"
    assert place_label("/no/such/place/sae", site_dir) == "sae"
    assert place_label(str(tmp_path / "runs" / "saes" / "k32"), "s3://bucket/site") == "k32"
    for spec in ("python-docs", "HuggingFaceTB/SmolLM2-135M", "hf:org/data", "s3://bucket/sae", "(in memory)", ""):
        assert place_label(spec, site_dir) == spec


def test_a_planted_model_builds_a_dashboard_end_to_end(planted: Path, capsys) -> None:
    """The documented planted-truth pipeline reaches a dashboard: ByteTokenizer texts, model and SAE by path."""
    out = planted / "site"
    code, err = _cli(["dashboard", "build", "--sae", str(planted / "sae"), "--tokens", "256",
                      "--ctx-len", "16", "--batch-size", "8", "--chunk-size", "5", "--out", str(out)], capsys)
    assert code == 0, err
    meta = store.load_meta(str(out))
    assert meta["d_sae"] == 12 and meta["n_tokens"] == 256
    assert (meta["sae"], meta["model"], meta["corpus"]) == ("../sae", "../planted", "python-docs")
    index = store.load_index(str(out))
    tokens = [t for lat in store.iter_latents(str(out)) for ex in lat["top"] for t in ex["tokens"]]
    assert tokens and all(isinstance(t, str) and len(t) <= 5 for t in tokens)  # a byte each, or "<bos>"
    assert "".join(tokens).isprintable() or "\n" in "".join(tokens)
    assert any(index["top_token"])
    for name in ("data/meta.js", "config.json", "metrics.json"):  # a shared site tells nothing of this machine
        assert str(planted.parent) not in (out / name).read_text(), name
