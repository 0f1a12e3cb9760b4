"""The attribution-graph viewer: the files it writes and its checks (no browser), then the page in Debian's chromium
driven by Playwright (skipped with a message when either is missing), opened straight from file://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interplab.dashboard.graph_page import (GRAPH_PREFIX, GRAPH_SUFFIX, check_dashboard_url, write_graph_page)
from interplab.errors import InterplabError

XSS = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


EXAMPLES = [{"tokens": ["a", "<b>x</b>", " c"], "acts": [0.0, 3.0, 1.5], "max": 3.0},
            {"tokens": [XSS, "\ny"], "acts": [0.25, 1.0], "max": 1.0}]
"""Top activations of feature f:1:3:9 (HTML among the tokens)."""


def _node(nid: str, kind: str, layer: int, pos: int, influence: float, **extra) -> dict:
    base = {"id": nid, "type": kind, "layer": layer, "pos": pos, "feature": None, "activation": None,
            "influence": influence, "label": nid, "token": None, "prob": None, "dashboard": None}
    return {**base, **extra}


def hand_graph() -> dict:
    """4 tokens (one of them HTML), 2 layers: 4 embeddings, 3 features, 2 error nodes, 2 logits, 9 edges.
    Influences of the feature/error nodes: 0.5, 0.25, 0.125, 0.0625, 0.0625 (sum 1, exact in binary); the largest |weight| is 4."""
    tokens = ["<bos>", "The", XSS, " cat"]
    nodes = [_node(f"emb:{p}", "embedding", -1, p, 0.0, token=t, label=t) for p, t in enumerate(tokens)]
    nodes += [
        _node("f:0:1:5", "feature", 0, 1, 0.5, feature=5, activation=2.5, label="L0 #5", top_examples=[]),
        _node("f:0:2:7", "feature", 0, 2, 0.25, feature=7, activation=1.25, label="<b>L0 #7</b>",
              dashboard="../l0/latent.html?id=7"),
        _node("f:1:3:9", "feature", 1, 3, 0.125, feature=9, activation=0.75, label="L1 #9", top_examples=EXAMPLES),
        _node("err:0:2", "error", 0, 2, 0.0625, label="err L0 @2"),
        _node("err:1:3", "error", 1, 3, 0.0625, label="err L1 @3"),
        _node("logit:42", "logit", 2, 3, 0.0, token=" dog", prob=0.6, label="logit ' dog'"),
        _node("logit:43", "logit", 2, 3, 0.0, token="<b>x</b>", prob=0.1, label="logit '<b>x</b>'"),
    ]
    weights = [("emb:1", "f:0:1:5", 1.0), ("emb:2", "f:0:2:7", -0.5), ("f:0:1:5", "f:1:3:9", 2.0),
               ("f:0:2:7", "f:1:3:9", 0.3), ("err:0:2", "f:1:3:9", -0.1), ("f:1:3:9", "logit:42", 4.0),
               ("err:1:3", "logit:42", 0.2), ("f:0:1:5", "logit:43", -1.0), ("emb:3", "f:1:3:9", 0.05)]
    return {"kind": "attribution_graph", "version": 1, "model": "toy", "prompt": "<bos>The" + XSS + " cat",
            "tokens": tokens, "n_layers": 2, "nodes": nodes,
            "edges": [{"source": s, "target": t, "weight": w} for s, t, w in weights],
            "scores": {"replacement": 0.75, "completeness": 0.9, "error_share": 0.1},
            "control": {"replacement": 0.125, "completeness": 0.5, "error_share": 0.5},
            "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98, "n_nodes_before": 40, "n_edges_before": 300}}


def test_writes_a_page_whose_data_reads_back(tmp_path: Path) -> None:
    graph = hand_graph()
    index = write_graph_page(graph, str(tmp_path / "g"), dashboard_url="../dash/layer{layer}")
    assert index == str(tmp_path / "g" / "index.html")
    names = sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*") if p.is_file())
    assert names == ["common.js", "data/graph.js", "graph.css", "graph.js", "index.html"]
    text = (tmp_path / "g" / "data" / "graph.js").read_text(encoding="utf-8")
    assert text.startswith(GRAPH_PREFIX) and text.endswith(GRAPH_SUFFIX)
    data = json.loads(text[len(GRAPH_PREFIX):-len(GRAPH_SUFFIX)])
    # the graph unchanged, plus the link template of a dashboard site given as a folder
    assert data == {**graph, "dashboard_url": "../dash/layer{layer}/latent.html?id={feature}"}
    html = (tmp_path / "g" / "index.html").read_text()
    assert XSS not in html and "cat" not in html  # no graph text in the markup: the page fills it in as text


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g.update(kind="graph"), "kind"),
    (lambda g: g["nodes"][4].update(type="neuron"), "type 'neuron'"),
    (lambda g: g["nodes"][4].update(pos=4), "pos 0..3"),
    (lambda g: g["nodes"][4].update(layer=3), "layer -1..2"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), "appears twice"),
    (lambda g: g["edges"].append({"source": "emb:0", "target": "f:9:9:9", "weight": 1.0}), "does not join"),
    (lambda g: g["edges"][0].update(weight=float("nan")), "finite"),
    (lambda g: g["nodes"][4].update(influence=None), "influence"),
    (lambda g: g["nodes"][4].update(dashboard="javascript:alert(1)"), "dashboard link"),
    (lambda g: g["nodes"][4].update(top_examples=[{"tokens": ["a"], "acts": [], "max": 1.0}]), "top example"),
    (lambda g: g["nodes"][4].update(top_examples=[{"tokens": [1], "acts": [1.0], "max": 1.0}]), "top example"),
    (lambda g: g["nodes"][4].update(top_examples={"tokens": []}), "must be a list"),
])
def test_bad_graphs_are_refused_before_writing(tmp_path: Path, mutate, message) -> None:
    graph = hand_graph()
    mutate(graph)
    with pytest.raises(InterplabError, match=message):
        write_graph_page(graph, str(tmp_path / "g"), dashboard_url=None)
    assert not (tmp_path / "g").exists()


def test_dashboard_urls_and_sites(tmp_path: Path) -> None:
    check_dashboard_url("https://example.org/l{layer}/latent.html?id={feature}")
    for bad in ("javascript:alert(1)//{feature}", "data:text/html,x", "x/{neuron}"):
        with pytest.raises(InterplabError):
            check_dashboard_url(bad)
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "data" / "meta.js").write_text("window.INTERPLAB_META = {};\n")
    with pytest.raises(InterplabError, match="subfolder"):
        write_graph_page(hand_graph(), str(site), dashboard_url=None)
    assert not (site / "index.html").exists()


# ---------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need `pip install playwright`")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need {CHROMIUM}; install it with `apt-get install -y chromium`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page recording script errors, dialogs, CSP refusals and any request that would leave the machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(5000)
    pg = context.new_page()
    pg.errors, pg.dialogs, pg.csp, pg.outside = [], [], [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.csp.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.route("**/*", lambda route: (pg.outside.append(route.request.url), route.abort())
             if not route.request.url.startswith("file://") else route.continue_())
    yield pg
    context.close()


def _shown(pg, testid: str) -> int:
    return pg.locator(f"[data-testid={testid}]:not(.off)").count()


def test_graph_page_in_the_browser(page, tmp_path: Path) -> None:
    graph = hand_graph()
    index = write_graph_page(graph, str(tmp_path / "g"), dashboard_url="../dash/layer{layer}/latent.html?id={feature}")
    page.goto(Path(index).as_uri())
    page.get_by_test_id("node").first.wait_for()
    assert page.get_by_test_id("node").count() == 11 and page.get_by_test_id("edge").count() == 9
    assert _shown(page, "node") == 11 and _shown(page, "edge") == 9

    # Edges under 10% of the largest |weight| (4 -> cut 0.4) go: 1, -0.5, 2, 4, -1 stay.
    page.get_by_test_id("edge-threshold").fill("10")
    assert _shown(page, "edge") == 5
    assert page.get_by_test_id("shown").text_content() == "showing 11 of 11 nodes, 5 of 9 edges"
    # Nodes holding 80% of the influence: 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.125, so both error nodes go (embeddings
    # and logits stay), and with them their edges (-0.1 and 0.2, already cut above; at 0% the two come back alone).
    page.get_by_test_id("node-threshold").fill("80")
    assert _shown(page, "node") == 9 and _shown(page, "edge") == 5
    page.get_by_test_id("edge-threshold").fill("0")
    assert _shown(page, "edge") == 7
    hidden = page.locator("[data-testid=node].off").evaluate_all("ns => ns.map(n => n.dataset.nodeId)")
    assert sorted(hidden) == ["err:0:2", "err:1:3"]
    page.get_by_test_id("node-threshold").fill("50")  # 0.5 alone reaches 50%: only f:0:1:5 stays of the five
    assert _shown(page, "node") == 7 and _shown(page, "edge") == 2  # emb:1 -> f:0:1:5 -> logit:43
    page.get_by_test_id("node-threshold").fill("100")

    # Click a feature: its facts, and the dashboard link built from the template.
    page.locator("g[data-node-id='f:1:3:9']").click()
    assert page.get_by_test_id("detail-title").text_content() == "L1 #9"
    assert page.get_by_test_id("detail-layer").text_content() == "1"
    assert page.get_by_test_id("detail-pos").text_content() == "3: \u2423cat"
    assert page.get_by_test_id("detail-feature").text_content() == "9"
    assert page.get_by_test_id("detail-activation").text_content() == "0.75"
    assert page.get_by_test_id("detail-influence").text_content() == "0.125"
    assert page.get_by_test_id("dashboard-link").get_attribute("href") == "../dash/layer1/latent.html?id=9"
    inputs = page.locator("#detail ul.conn").first.locator("li")
    assert inputs.count() == 4 and inputs.first.text_content() == "2 L0 #5"  # strongest input first

    # Its top activations beside the link: tokens as text (HTML stays text), tinted by activation / the example's max.
    examples = page.get_by_test_id("top-example")
    assert examples.count() == 2 and page.get_by_test_id("example-max").all_text_contents() == ["3", "1"]
    first = examples.first.get_by_test_id("example-token")
    assert first.all_text_contents() == ["a", "<b>x</b>", " c"]
    assert first.evaluate_all("ts => ts.map(t => t.style.backgroundColor)") == [
        "rgba(255, 140, 0, 0)", "rgb(255, 140, 0)", "rgba(255, 140, 0, 0.5)"]
    assert first.nth(1).get_attribute("class") == "tok max"
    assert examples.nth(1).get_by_test_id("example-token").all_text_contents() == [XSS, "\u21b5y"]
    assert page.locator("#detail b, #detail script").count() == 0
    assert page.locator("#detail a[data-testid=dashboard-link] ~ h4").first.text_content() == "top activations (2)"
    page.locator("g[data-node-id='f:0:1:5']").click()  # searched, never active
    assert page.get_by_test_id("no-top-examples").count() == 1 and page.get_by_test_id("top-example").count() == 0
    page.locator("g[data-node-id='f:1:3:9']").click()

    # Through the panel to an input; its own dashboard link wins; HTML in tokens and labels stays text, nothing runs.
    page.locator("#detail a.node-link[data-node-id='f:0:2:7']").click()
    assert page.get_by_test_id("detail-title").text_content() == "<b>L0 #7</b>"
    assert page.get_by_test_id("detail-pos").text_content() == f"2: {XSS}"
    assert page.get_by_test_id("dashboard-link").get_attribute("href") == "../l0/latent.html?id=7"
    assert page.get_by_test_id("top-examples").count() == 0 and page.get_by_test_id("no-top-examples").count() == 0
    assert page.locator("[data-testid=token-label][data-pos='2']").text_content() == XSS
    assert page.get_by_test_id("prompt").text_content() == graph["prompt"]
    assert page.locator("#app b").count() == 0
    assert page.evaluate("[...document.scripts].every(s => s.src && !s.text)")

    # Error nodes have no dashboard link; scores stand beside the control's.
    page.locator("g[data-node-id='err:0:2']").click()
    assert page.get_by_test_id("detail-type").text_content().startswith("error")
    assert page.get_by_test_id("dashboard-link").count() == 0
    cells = page.locator("[data-testid=scores] tbody tr").evaluate_all(
        "rs => rs.map(r => [r.dataset.key, ...[...r.querySelectorAll('td')].map(td => td.textContent)])")
    assert cells == [["replacement", "0.75", "0.125"], ["completeness", "0.9", "0.5"], ["error_share", "0.1", "0.5"]]
    page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
    assert page.errors == [] and page.dialogs == [] and page.csp == [] and page.outside == []


def test_missing_data_says_so(page, tmp_path: Path) -> None:
    write_graph_page(hand_graph(), str(tmp_path / "g"), dashboard_url=None)
    (tmp_path / "g" / "data" / "graph.js").unlink()
    page.goto((tmp_path / "g" / "index.html").as_uri())
    assert "did not load" in page.locator(".error").text_content()
    assert page.errors == []
