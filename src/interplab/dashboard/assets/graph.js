"use strict";
// The attribution-graph viewer (plain JS + SVG, no libraries, works from file://). Data: window.INTERPLAB_GRAPH,
// written by interplab.dashboard.graph_page. Every string from the graph (tokens, labels) reaches the DOM through
// textContent or an attribute value (IL.el / IL.svg), never as markup.

(function () {
  const G = window.INTERPLAB_GRAPH;
  if (!G || !Array.isArray(G.nodes) || typeof IL === "undefined") {
    document.getElementById("canvas").replaceChildren(IL_error("The graph data (data/graph.js) did not load; " +
      "rewrite the page with interplab's write_graph_page."));
    return;
  }
  const {el, svg, fmt, showToken, actColor} = IL;
  const TYPE_COLOR = {feature: "#f59f00", error: "#adb5bd", embedding: "#37b24d", logit: "#7950f2"};
  const TYPE_NAME = {feature: "feature", error: "error (MLP reconstruction)", embedding: "token embedding",
    logit: "logit"};
  const POSITIVE = "#d6336c";
  const NEGATIVE = "#1971c2";
  const ROW_H = 64;
  const PAD = {left: 64, right: 16, top: 96, bottom: 150};
  const MAX_LABEL = 32; // characters of a token label (the whole token is in its hover text and the detail panel)
  const SLANT = -35; // degrees: slanted labels of neighbouring positions do not overlap
  const GAP = 15; // horizontal distance between nodes of one (layer, position) cell

  function IL_error(message) {
    const p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    return p;
  }

  const L = G.n_layers;
  const T = G.tokens.length;
  const byId = new Map(G.nodes.map((n) => [n.id, n]));
  const edges = G.edges.filter((e) => byId.has(e.source) && byId.has(e.target));
  const inputs = new Map(G.nodes.map((n) => [n.id, []]));
  const outputs = new Map(G.nodes.map((n) => [n.id, []]));
  for (const e of edges) {
    outputs.get(e.source).push(e);
    inputs.get(e.target).push(e);
  }
  const maxAbs = edges.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 0) || 1;

  // ---- layout: one row per layer (embeddings at the bottom, logits on top), one column per position ----
  const cells = new Map();
  for (const n of G.nodes) {
    const key = `${n.layer}:${n.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  let widest = 1;
  for (const list of cells.values()) {
    // the strongest first, so they sit in the middle of their cell's run
    list.sort((a, b) => Math.abs(b.influence) - Math.abs(a.influence) || (a.id < b.id ? -1 : 1));
    widest = Math.max(widest, list.length);
  }
  const colW = Math.max(90, Math.min(widest, 16) * GAP + 20);
  const width = PAD.left + T * colW + PAD.right;
  const height = PAD.top + (L + 2) * ROW_H + PAD.bottom;
  const rowY = (layer) => PAD.top + (L - layer) * ROW_H + ROW_H / 2;
  const colX = (pos) => PAD.left + pos * colW + colW / 2;
  const place = new Map();
  for (const list of cells.values()) {
    const step = Math.min(GAP, (colW - 16) / Math.max(1, list.length));
    list.forEach((n, i) => {
      const offset = (i % 2 ? 1 : -1) * Math.ceil(i / 2) * step; // 0, -1, +1, -2, +2, ... steps from the centre
      place.set(n.id, {x: colX(n.pos) + offset, y: rowY(n.layer)});
    });
  }

  // ---- drawing ----
  const chart = svg("svg", {class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "attribution graph"});
  const rows = svg("g", {class: "rows"});
  for (let layer = -1; layer <= L; layer++) {
    const y = rowY(layer);
    const name = layer === -1 ? "emb" : layer === L ? "logit" : `L${layer}`;
    rows.appendChild(svg("line", {x1: PAD.left, x2: width - PAD.right, y1: y, y2: y, class: "row-line"}));
    rows.appendChild(svg("text", {x: 8, y: y + 4, class: "row-label"}, name));
  }
  G.tokens.forEach((tok, p) => {
    // the hover text in the group, beside (not inside) the label, so that the label's text is the token alone
    rows.appendChild(svg("g", {}, [svg("title", {}, `position ${p}: ${JSON.stringify(tok)}`),
      svg("text", {x: colX(p), y: height - PAD.bottom + 36, "text-anchor": "end", class: "token-label",
        transform: `rotate(${SLANT} ${colX(p)} ${height - PAD.bottom + 36})`, "data-testid": "token-label",
        "data-pos": p}, shorten(showToken(tok, true)))]));
    rows.appendChild(svg("text", {x: colX(p), y: height - PAD.bottom + 18, "text-anchor": "middle",
      class: "pos-label"}, String(p)));
  });
  chart.appendChild(rows);

  const edgeLayer = svg("g", {class: "edges"});
  const edgeEls = edges.map((e) => {
    const a = place.get(e.source);
    const b = place.get(e.target);
    const line = svg("line", {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: "edge", "data-testid": "edge",
      "data-source": e.source, "data-target": e.target, "data-weight": e.weight,
      stroke: e.weight >= 0 ? POSITIVE : NEGATIVE, "stroke-width": (0.5 + 4.5 * Math.abs(e.weight) / maxAbs).toFixed(2),
    }, svg("title", {}, `${e.source} \u2192 ${e.target}: ${fmt(e.weight)}`));
    edgeLayer.appendChild(line);
    return line;
  });
  chart.appendChild(edgeLayer);

  const nodeLayer = svg("g", {class: "nodes"});
  const nodeEls = new Map();
  for (const n of G.nodes) {
    const at = place.get(n.id);
    const r = n.type === "feature" ? 6 : 5;
    const shape = n.type === "feature" || n.type === "logit"
      ? svg("circle", {cx: at.x, cy: at.y, r})
      : svg("rect", {x: at.x - r, y: at.y - r, width: 2 * r, height: 2 * r, rx: 1});
    const g = svg("g", {class: `node ${n.type}`, "data-testid": "node", "data-node-id": n.id, "data-type": n.type,
      tabindex: 0, fill: TYPE_COLOR[n.type] || "#000"}, [shape, svg("title", {}, nodeTitle(n))]);
    if (n.type === "logit") {
      g.appendChild(svg("text", {x: at.x, y: at.y - 10, class: "logit-label",
        transform: `rotate(${SLANT} ${at.x} ${at.y - 10})`},
        shorten(showToken(n.token === null || n.token === undefined ? n.label : n.token, true))));
    }
    g.addEventListener("click", (ev) => {
      ev.stopPropagation();
      select(n.id);
    });
    g.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") select(n.id);
    });
    nodeLayer.appendChild(g);
    nodeEls.set(n.id, g);
  }
  chart.appendChild(nodeLayer);
  chart.addEventListener("click", () => select(null));
  document.getElementById("canvas").replaceChildren(chart);
  // Grow the drawing where the slanted labels of long tokens reach past its edges (measured: the length of a
  // label depends on the font).
  const box = chart.getBBox();
  const x0 = Math.min(0, Math.floor(box.x) - 8);
  const y0 = Math.min(0, Math.floor(box.y) - 8);
  const x1 = Math.max(width, Math.ceil(box.x + box.width) + 8);
  const y1 = Math.max(height, Math.ceil(box.y + box.height) + 8);
  chart.setAttribute("viewBox", `${x0} ${y0} ${x1 - x0} ${y1 - y0}`);
  chart.setAttribute("width", x1 - x0);
  chart.setAttribute("height", y1 - y0);

  function shorten(text) {
    return text.length > MAX_LABEL ? text.slice(0, MAX_LABEL - 1) + "\u2026" : text;
  }

  function nodeTitle(n) {
    const where = `layer ${layerName(n.layer)}, pos ${n.pos}`;
    if (n.type === "feature") return `${n.label || n.id} (feature ${n.feature}, ${where})`;
    return `${n.label || n.id} (${TYPE_NAME[n.type] || n.type}, ${where})`;
  }

  function layerName(layer) {
    return layer === -1 ? "embedding" : layer === L ? `logit (${L})` : String(layer);
  }

  // ---- pruning ----
  // Nodes: the fewest feature/error nodes, strongest first, whose |influence| adds up to the chosen share of the
  // total (circuit-tracer's node threshold); embeddings and logits always stay. Edges: |weight| >= share x max,
  // and both ends shown.
  const ranked = G.nodes.filter((n) => n.type === "feature" || n.type === "error")
    .sort((a, b) => Math.abs(b.influence) - Math.abs(a.influence) || (a.id < b.id ? -1 : 1));
  const totalInfluence = ranked.reduce((s, n) => s + Math.abs(n.influence), 0);
  const before = new Map(); // share of the total influence held by the nodes ranked above each node
  let acc = 0;
  for (const n of ranked) {
    before.set(n.id, totalInfluence > 0 ? acc / totalInfluence : 0);
    acc += Math.abs(n.influence);
  }
  const nodeInput = document.getElementById("node-threshold");
  const edgeInput = document.getElementById("edge-threshold");
  let visible = new Set();
  let selected = null;

  function applyPruning() {
    const keep = Number(nodeInput.value) / 100;
    const cut = (Number(edgeInput.value) / 100) * maxAbs;
    document.getElementById("node-value").textContent = `${nodeInput.value}%`;
    document.getElementById("edge-value").textContent = `${edgeInput.value}%`;
    visible = new Set(G.nodes.filter((n) => !before.has(n.id) || keep >= 1 || before.get(n.id) < keep)
      .map((n) => n.id));
    for (const [id, g] of nodeEls) g.classList.toggle("off", !visible.has(id));
    let shownEdges = 0;
    edges.forEach((e, i) => {
      const on = Math.abs(e.weight) >= cut && visible.has(e.source) && visible.has(e.target);
      edgeEls[i].classList.toggle("off", !on);
      if (on) shownEdges++;
    });
    document.getElementById("shown").textContent =
      `showing ${visible.size} of ${G.nodes.length} nodes, ${shownEdges} of ${edges.length} edges`;
    if (selected !== null && !visible.has(selected)) select(null);
  }
  nodeInput.addEventListener("input", applyPruning);
  edgeInput.addEventListener("input", applyPruning);

  // ---- details of the clicked node ----
  const detail = document.getElementById("detail");

  function dashboardLink(n) {
    let href = n.dashboard;
    if (!href && n.type === "feature" && G.dashboard_url) {
      href = G.dashboard_url.split("{layer}").join(String(n.layer)).split("{feature}").join(String(n.feature));
    }
    // only relative, http(s) and file links (never javascript: or data:), as graph_page.SAFE_URL
    if (!href || !/^(https?:\/\/|file:\/\/|[^:]*$)/i.test(href)) return null;
    return el("a", {href, "data-testid": "dashboard-link", target: "_blank", rel: "noopener"},
      "feature dashboard \u2197");
  }

  // A feature's top activating contexts (graph.json "top_examples": [{tokens, acts, max}]): each a window of
  // tokens tinted by activation / that context's max, the value on hover. Tokens are text nodes (IL.el).
  function topExamples(n) {
    if (n.type !== "feature" || !Array.isArray(n.top_examples)) return [];
    const list = n.top_examples.filter((ex) => ex && Array.isArray(ex.tokens) && Array.isArray(ex.acts));
    const head = el("h4", {}, `top activations (${list.length})`);
    if (!list.length) return [head, el("p", {class: "muted", "data-testid": "no-top-examples"},
      "never active in the contexts searched")];
    const rows = list.map((ex, k) => {
      const peak = typeof ex.max === "number" ? ex.max : Math.max(0, ...ex.acts);
      let at = ex.acts.indexOf(peak);
      if (at < 0) at = ex.acts.reduce((best, a, i) => (a > ex.acts[best] ? i : best), 0);
      const tokens = el("span", {class: "tokens"});
      ex.tokens.forEach((tok, i) => {
        const act = Number(ex.acts[i]);
        const span = el("span", {class: i === at ? "tok max" : "tok", title: `${JSON.stringify(tok)}: ${fmt(act)}`,
          "data-testid": "example-token", "data-act": act}, showToken(tok, false));
        span.style.backgroundColor = actColor(act, peak); // CSSOM, not a style attribute: the page policy allows it
        tokens.appendChild(span);
      });
      return el("div", {class: "example", "data-testid": "top-example", "data-rank": k}, [
        el("span", {class: "example-value", "data-testid": "example-max"}, fmt(peak)), tokens]);
    });
    return [head, el("div", {class: "examples", "data-testid": "top-examples"}, rows)];
  }

  function connections(title, list, end) {
    const top = list.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
    const items = top.map((e) => {
      const other = byId.get(e[end]);
      const link = el("a", {href: "#", class: "node-link", "data-node-id": other.id}, other.label || other.id);
      link.addEventListener("click", (ev) => {
        ev.preventDefault();
        select(other.id);
      });
      return el("li", {}, [el("span", {class: e.weight >= 0 ? "w pos" : "w neg"}, fmt(e.weight)), " ", link]);
    });
    return [el("h4", {}, `${title} (${list.length})`),
      items.length ? el("ul", {class: "conn"}, items) : el("p", {class: "muted"}, "none")];
  }

  function row(key, value, testid) {
    return [el("dt", {}, key), el("dd", {"data-testid": testid}, value)];
  }

  function select(id) {
    selected = id;
    for (const [nid, g] of nodeEls) g.classList.toggle("selected", nid === id);
    const lit = new Set();
    if (id !== null) for (const e of inputs.get(id).concat(outputs.get(id))) lit.add(e);
    edges.forEach((e, i) => {
      edgeEls[i].classList.toggle("lit", lit.has(e));
      edgeEls[i].classList.toggle("dim", id !== null && !lit.has(e));
    });
    if (id === null) {
      detail.replaceChildren(el("p", {class: "muted"}, "Click a node for its details."));
      return;
    }
    const n = byId.get(id);
    const dl = el("dl", {class: "facts"}, [
      ...row("type", TYPE_NAME[n.type] || n.type, "detail-type"),
      ...row("layer", layerName(n.layer), "detail-layer"),
      ...row("position", `${n.pos}: ${showToken(G.tokens[n.pos], true)}`, "detail-pos"),
      ...(n.type === "feature" ? row("feature", String(n.feature), "detail-feature") : []),
      ...(n.activation !== null && n.activation !== undefined ? row("activation", fmt(n.activation),
        "detail-activation") : []),
      ...row("influence", fmt(n.influence), "detail-influence"),
      ...(n.type === "logit" && n.prob !== null && n.prob !== undefined ? row("probability", fmt(n.prob),
        "detail-prob") : []),
      ...(n.token !== null && n.token !== undefined ? row("token", showToken(n.token, true), "detail-token") : []),
    ]);
    const parts = [
      el("h3", {"data-testid": "detail-title"}, n.label || n.id),
      el("p", {class: "muted"}, el("code", {}, n.id)),
      dl,
      dashboardLink(n),
      ...topExamples(n),
      ...connections("strongest inputs", inputs.get(id), "source"),
      ...connections("strongest outputs", outputs.get(id), "target"),
    ];
    detail.replaceChildren(...parts.filter((x) => x !== null));
  }

  // ---- header, scores, legend ----
  document.title = `${G.prompt} · attribution graph`;
  document.getElementById("prompt").textContent = G.prompt;
  const pruning = G.pruning || {};
  document.getElementById("model").textContent = `model ${G.model} · ${L} layers · ${T} tokens` +
    (pruning.n_nodes_before !== undefined ? ` · pruned from ${pruning.n_nodes_before} nodes and ` +
      `${pruning.n_edges_before} edges (node threshold ${fmt(pruning.node_threshold)}, edge threshold ` +
      `${fmt(pruning.edge_threshold)})` : "");

  const scores = G.scores || {};
  const control = G.control || {};
  const value = (x) => (typeof x === "number" ? fmt(x) : "\u2014");
  const scoreRows = [["replacement", "replacement"], ["completeness", "completeness"], ["error share", "error_share"]]
    .map(([name, key]) => el("tr", {"data-key": key}, [el("th", {}, name),
      el("td", {class: "num graph-score"}, value(scores[key])), el("td", {class: "num control-score"},
        value(control[key]))]));
  document.getElementById("scores").replaceChildren(el("table", {class: "scores", "data-testid": "scores"}, [
    el("thead", {}, el("tr", {}, [el("th", {}, ""), el("th", {}, "transcoders"),
      el("th", {title: "the same graph with a random norm-matched dictionary"}, "random control")])),
    el("tbody", {}, scoreRows),
  ]));

  const swatch = (color, shape) => svg("svg", {width: 14, height: 14, class: "swatch"},
    shape === "line" ? svg("line", {x1: 0, y1: 7, x2: 14, y2: 7, stroke: color, "stroke-width": 3})
      : svg(shape === "circle" ? "circle" : "rect", shape === "circle" ? {cx: 7, cy: 7, r: 6, fill: color}
        : {x: 1, y: 1, width: 12, height: 12, fill: color}));
  document.getElementById("legend").replaceChildren(el("ul", {class: "legend"}, [
    el("li", {}, [swatch(TYPE_COLOR.feature, "circle"), " feature"]),
    el("li", {}, [swatch(TYPE_COLOR.error, "rect"), " error (MLP reconstruction)"]),
    el("li", {}, [swatch(TYPE_COLOR.embedding, "rect"), " token embedding"]),
    el("li", {}, [swatch(TYPE_COLOR.logit, "circle"), " logit"]),
    el("li", {}, [swatch(POSITIVE, "line"), " positive edge"]),
    el("li", {}, [swatch(NEGATIVE, "line"), " negative edge (width: |weight|)"]),
  ]));
  applyPruning();
})();
