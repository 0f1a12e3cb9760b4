"""The attribution-graph viewer: one static page that opens from file:// (no server), like the feature dashboards.

    OUT/index.html          the page (fixed markup: no graph text is ever written into HTML)
    OUT/common.js           the dashboards' DOM helpers (text always inserted as text)
    OUT/graph.js, graph.css the viewer (plain JS and SVG, no libraries, no network)
    OUT/data/graph.js       `window.INTERPLAB_GRAPH = {...};`: the graph JSON plus the dashboard link template

The page draws the graph of `interplab.graphs` (the "attribution_graph" JSON, version 1): one row per layer
(token embeddings at the bottom, logits at the top), one column per prompt position, nodes coloured by type, edges
coloured by the sign of their weight and as wide as |weight|. Two sliders prune live: the nodes holding a chosen
share of the total influence (as circuit-tracer's node threshold: the fewest feature and error nodes, by influence,
whose influences add up to that share; embeddings and logits always stay) and the edges under a share of the
largest |weight|. Clicking a node shows its layer, position, feature, activation and influence, its strongest
inputs and outputs, a link to its feature dashboard page and, for a feature whose node carries "top_examples"
(`interplab.graphs.top_examples`), its top activating contexts with each token tinted by its activation. The replacement, completeness and error-share scores
stand beside those of the random-dictionary control.

Why the data is JavaScript and the text is safe: see `interplab.dashboard.store` (Chromium refuses fetch() of local
files; payloads are plain JSON, HTML in a token stays text because the page uses textContent only) and
`interplab.dashboard.serve.PAGE_POLICY` (carried by the page in a <meta> tag).
"""

from __future__ import annotations

import math
import re
from typing import Any

from interplab.dashboard.serve import PAGE_POLICY
from interplab.dashboard.site import ASSETS, site_index
from interplab.dashboard.store import DATA_DIR, META_FILE, dumps
from interplab.errors import InterplabError
from interplab.fileio import join, read_url, write_url_atomic

NODE_TYPES = ("feature", "error", "embedding", "logit")
"""The node types of the graph JSON."""
GRAPH_DATA_FILE = "graph.js"
"""The data file, under OUT/data/."""
GRAPH_PREFIX = "window.INTERPLAB_GRAPH = "
GRAPH_SUFFIX = ";\n"
PAGE_ASSETS = ("common.js", "graph.js", "graph.css")
"""The files the page needs from `dashboard/assets/` (copied beside index.html)."""
SAFE_URL = re.compile(r"^(?:https?://|file://|[^:]*$)", re.IGNORECASE)
"""Links the page may hold: http(s), file, or relative (no scheme before the first '/', '?' or '#'); so never
`javascript:` or `data:`."""
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

PAGE_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{PAGE_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>attribution graph · interplab</title>
<link rel="stylesheet" href="graph.css">
</head>
<body>
<header class="top">
  <h1>interplab attribution graph</h1>
  <p id="prompt" class="prompt" data-testid="prompt"></p>
  <p id="model" class="muted"></p>
</header>
<main id="app">
  <section class="controls">
    <label>Nodes: keep <output id="node-value" data-testid="node-value">100%</output> of the influence
      <input id="node-threshold" data-testid="node-threshold" type="range" min="0" max="100" step="1" value="100">
    </label>
    <label>Edges: hide |weight| below <output id="edge-value" data-testid="edge-value">0%</output> of the largest
      <input id="edge-threshold" data-testid="edge-threshold" type="range" min="0" max="100" step="1" value="0">
    </label>
    <span id="shown" class="muted" data-testid="shown"></span>
  </section>
  <div class="graph-layout">
    <div id="canvas" class="canvas" data-testid="canvas"></div>
    <aside class="side">
      <section class="panel" id="detail" data-testid="detail"><p class="muted">Click a node for its details.</p></section>
      <section class="panel"><h3>Scores</h3><div id="scores"></div></section>
      <section class="panel"><h3>Legend</h3><div id="legend"></div></section>
    </aside>
  </div>
</main>
<script src="data/{GRAPH_DATA_FILE}"></script>
<script src="common.js"></script>
<script src="graph.js"></script>
</body>
</html>
"""


def _fail(what: str) -> None:
    raise InterplabError(f"not an attribution graph (kind 'attribution_graph', version 1): {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_node(node: Any, n_layers: int, n_pos: int, seen: set[str]) -> None:
    if not isinstance(node, dict) or not isinstance(node.get("id"), str):
        _fail(f"a node is not an object with a string 'id': {str(node)[:80]}")
    nid = node["id"]
    if nid in seen:
        _fail(f"node id {nid!r} appears twice")
    seen.add(nid)
    if node.get("type") not in NODE_TYPES:
        _fail(f"node {nid!r} has type {node.get('type')!r}; valid: {', '.join(NODE_TYPES)}")
    layer, pos = node.get("layer"), node.get("pos")
    if not _is_int(layer) or not -1 <= layer <= n_layers or not _is_int(pos) or not 0 <= pos < n_pos:
        _fail(f"node {nid!r} has layer {layer!r}, pos {pos!r}; valid: layer -1..{n_layers}, pos 0..{n_pos - 1}")
    if not _is_number(node.get("influence")):
        _fail(f"node {nid!r} has influence {node.get('influence')!r}; it must be a finite number")
    if node["type"] == "feature" and not _is_int(node.get("feature")):
        _fail(f"feature node {nid!r} has feature {node.get('feature')!r}; it must be an int")
    for key in ("activation", "prob"):
        if node.get(key) is not None and not _is_number(node[key]):
            _fail(f"node {nid!r} has {key} {node[key]!r}; it must be a finite number or null")
    if "top_examples" in node:
        _check_examples(nid, node["top_examples"])
    link = node.get("dashboard")
    if link is not None and (not isinstance(link, str) or not SAFE_URL.match(link)):
        _fail(f"node {nid!r} has dashboard link {link!r}; valid: a relative, http(s) or file URL")


def _check_examples(nid: str, examples: Any) -> None:
    """A feature's optional "top_examples": a list of {tokens: [str], acts: [finite number] as many, max: number}."""
    if not isinstance(examples, list):
        _fail(f"node {nid!r} has top_examples {str(examples)[:80]}; it must be a list")
    for ex in examples:
        ok = (isinstance(ex, dict) and isinstance(ex.get("tokens"), list) and isinstance(ex.get("acts"), list)
              and all(isinstance(t, str) for t in ex["tokens"]) and all(_is_number(a) for a in ex["acts"])
              and len(ex["tokens"]) == len(ex["acts"]) and _is_number(ex.get("max")))
        if not ok:
            _fail(f"node {nid!r} has a top example {str(ex)[:80]}; valid: {{tokens: [strings], acts: [as many "
                  "finite numbers], max: a finite number}")


def check_graph(graph: Any) -> None:
    """Raise one `InterplabError` unless `graph` is a well-formed attribution graph (contract of issue 22): the
    kind and version, tokens, node types, layers -1..n_layers, positions inside the prompt, unique node ids, finite
    influences and weights, edges between existing nodes, and well-formed "top_examples" where a node has them."""
    if not isinstance(graph, dict) or graph.get("kind") != "attribution_graph" or graph.get("version") != 1:
        _fail("wrong or missing 'kind'/'version'")
    tokens, n_layers = graph.get("tokens"), graph.get("n_layers")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        _fail("'tokens' must be a non-empty list of strings")
    if not _is_int(n_layers) or n_layers < 0:
        _fail(f"'n_layers' is {n_layers!r}; it must be an int >= 0")
    nodes, edges = graph.get("nodes"), graph.get("edges")
    if not isinstance(nodes, list) or not isinstance(edges, list):
        _fail("'nodes' and 'edges' must be lists")
    seen: set[str] = set()
    for node in nodes:
        _check_node(node, n_layers, len(tokens), seen)
    for edge in edges:
        if not isinstance(edge, dict) or edge.get("source") not in seen or edge.get("target") not in seen:
            _fail(f"edge {str(edge)[:80]} does not join two nodes of the graph")
        if not _is_number(edge.get("weight")):
            _fail(f"edge {edge['source']} -> {edge['target']} has weight {edge.get('weight')!r}; it must be finite")


def check_dashboard_url(url: str | None) -> None:
    """Raise unless `url` is None or a link template the page can use: a relative, http(s) or file URL whose only
    placeholders are {layer} and {feature}."""
    if url is None:
        return
    if not isinstance(url, str) or not url or not SAFE_URL.match(url):
        raise InterplabError(f"dashboard_url {url!r} is not usable; valid: a relative, http(s) or file URL "
                             "(e.g. '../dashboards/layer{layer}/latent.html?id={feature}' or a dashboard site)")
    bad = [p for p in _PLACEHOLDER.findall(url) if p not in ("layer", "feature")]
    if bad:
        raise InterplabError(f"dashboard_url {url!r} has placeholders {bad}; valid: {{layer}} and {{feature}}")


def link_template(dashboard_url: str | None) -> str | None:
    """The link the page builds for a feature node without its own "dashboard" URL: `dashboard_url` itself when it
    holds {feature}, else a dashboard site's latent page, `dashboard_url`/latent.html?id={feature}."""
    if dashboard_url is None or "{feature}" in dashboard_url:
        return dashboard_url
    return join(dashboard_url, "latent.html?id={feature}")


def encode_graph_data(graph: dict, dashboard_url: str | None) -> str:
    """The text of data/graph.js: the graph with the page's link template under "dashboard_url"."""
    return GRAPH_PREFIX + dumps({**graph, "dashboard_url": link_template(dashboard_url)}) + GRAPH_SUFFIX


def write_graph_page(graph: dict, out_folder: str, *, dashboard_url: str | None = None) -> str:
    """Write the viewer of `graph` (the "attribution_graph" JSON) into `out_folder`; return the index.html to open.

    `dashboard_url` links feature nodes that carry no "dashboard" URL of their own to their feature dashboard page:
    a template with {feature} (and {layer}, for one dashboard per layer's transcoder), relative to the page or
    absolute, or the folder of a dashboard site (then `dashboard_url`/latent.html?id={feature}). The graph and the
    URL are checked before anything is written; `out_folder` must not be a feature dashboard site itself (its
    index.html would be replaced): put graphs in a subfolder of it, e.g. SITE/graphs/NAME with
    dashboard_url="../../latent.html?id={feature}".
    """
    check_graph(graph)
    check_dashboard_url(dashboard_url)
    if read_url(join(join(out_folder, DATA_DIR), META_FILE)) is not None:
        raise InterplabError(f"{out_folder} is a feature dashboard site; write the graph page into a subfolder "
                             "of it (e.g. graphs/NAME) so that the dashboard's index.html stays")
    data = encode_graph_data(graph, dashboard_url).encode("utf-8")
    missing = [name for name in PAGE_ASSETS if not (ASSETS / name).is_file()]
    if missing:
        raise InterplabError(f"the graph page assets {missing} are missing from {ASSETS}; reinstall interplab")
    for name in PAGE_ASSETS:
        write_url_atomic(join(out_folder, name), (ASSETS / name).read_bytes())
    write_url_atomic(join(join(out_folder, DATA_DIR), GRAPH_DATA_FILE), data)
    write_url_atomic(join(out_folder, "index.html"), PAGE_HTML.encode("utf-8"))
    return site_index(out_folder)
