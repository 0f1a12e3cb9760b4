"use strict";
// Helpers shared by the dashboard pages (plain JS, no libraries, works from file://).
//
// Safety: every string that comes from the corpus or the data files reaches the DOM through textContent or an
// attribute value (el() below), never as markup, so HTML inside a token renders as the text it is.

const IL = (function () {
  const SVG_NS = "http://www.w3.org/2000/svg";

  // el("a", {href: "x", class: "c", title: "t", "data-x": "1"}, ["text", childNode]): one element, its children
  // appended as text nodes (strings/numbers) or nodes.
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
  }

  function append(node, children) {
    if (children === undefined || children === null) return;
    for (const child of Array.isArray(children) ? children : [children]) {
      if (child === undefined || child === null) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
  }

  // Four significant digits without trailing zeros: 12.34, 0.01235, 1235, 1e-7.
  function fmt(x) {
    if (typeof x !== "number" || !isFinite(x)) return String(x);
    return String(Number(x.toPrecision(4)));
  }

  function fmtPct(freq) {
    return freq === 0 ? "0%" : fmt(freq * 100) + "%";
  }

  // Make whitespace visible: newlines and tabs always (they would vanish or break the line), spaces only when the
  // token is shown on its own (in a sentence a space reads as a space; alone, " the" and "the" must differ).
  function showToken(s, alone) {
    let text = String(s).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
    if (alone) text = text.replace(/ /g, "\u2423");
    return alone && text === "" ? "(empty)" : text;
  }

  // Background of a token by its activation as a fraction of the latent's max (orange; blue if negative).
  function actColor(act, maxAct) {
    const frac = maxAct > 0 ? Math.min(1, Math.abs(act) / maxAct) : 0;
    return act >= 0 ? `rgba(255, 140, 0, ${frac.toFixed(3)})` : `rgba(60, 120, 255, ${frac.toFixed(3)})`;
  }

  // One example: its max value ("max 12.34") then its tokens, each a span tinted by activation, the value on hover.
  function example(ex, maxAct, attrs) {
    const tokens = el("span", {class: "tokens"});
    ex.tokens.forEach((tok, i) => {
      const act = ex.acts[i];
      const span = el("span", {
        class: i === ex.max_pos ? "tok max" : "tok",
        title: `${JSON.stringify(tok)}: ${fmt(act)}`,
        "data-act": act,
      }, showToken(tok, false));
      span.style.backgroundColor = actColor(act, maxAct);
      tokens.appendChild(span);
    });
    const value = el("span", {class: "example-value"}, "max " + fmt(ex.acts[ex.max_pos]));
    const where = el("span", {class: "example-where", title: "context, position in the corpus stream"},
      `ctx ${ex.context} @${ex.position}`);
    return el("div", Object.assign({class: "example"}, attrs || {}), [value, tokens, where]);
  }

  // Indices [lo, hi) of the non-empty bins (the shared bin edges span every latent; one latent fills a few).
  function nonEmptyRange(counts) {
    let lo = 0;
    let hi = counts.length;
    while (lo < hi && !counts[lo]) lo++;
    while (hi > lo && !counts[hi - 1]) hi--;
    return lo < hi ? [lo, hi] : [0, counts.length];
  }

  // A bar chart of `counts` over bins [edges[i], edges[i+1]) as an inline SVG, cropped to its non-empty bins.
  // opts: {width, height, color(lo, hi) -> fill, xlabel}.
  function histogram(edges, counts, opts) {
    const o = Object.assign({width: 360, height: 120, xlabel: "", color: () => "#e67e00"}, opts || {});
    if (!counts || !edges || edges.length !== counts.length + 1) {
      return el("p", {class: "muted"}, "no histogram");
    }
    const [lo, hi] = nonEmptyRange(counts);
    const pad = {left: 34, right: 8, top: 6, bottom: 30};
    const w = o.width - pad.left - pad.right;
    const h = o.height - pad.top - pad.bottom;
    const x0 = edges[lo];
    const span = edges[hi] - x0 || 1;
    const x = (v) => pad.left + ((v - x0) / span) * w;
    let top = 0;
    for (let i = lo; i < hi; i++) top = Math.max(top, counts[i]);
    const chart = svg("svg", {
      class: "hist", width: o.width, height: o.height, viewBox: `0 0 ${o.width} ${o.height}`, role: "img",
    });
    for (let i = lo; i < hi; i++) {
      if (!counts[i]) continue;
      const bh = top > 0 ? (counts[i] / top) * h : 0;
      const bar = svg("rect", {
        x: x(edges[i]), y: pad.top + h - bh, width: Math.max(1, x(edges[i + 1]) - x(edges[i]) - 0.5),
        height: bh, fill: o.color(edges[i], edges[i + 1]),
      }, svg("title", {}, `[${fmt(edges[i])}, ${fmt(edges[i + 1])}): ${counts[i]}`));
      chart.appendChild(bar);
    }
    const axisY = pad.top + h;
    chart.appendChild(svg("line", {x1: pad.left, x2: pad.left + w, y1: axisY, y2: axisY, class: "axis"}));
    const label = (xv, anchor, text) => svg("text", {x: xv, y: axisY + 12, "text-anchor": anchor}, text);
    chart.appendChild(label(pad.left, "start", fmt(edges[lo])));
    chart.appendChild(label(pad.left + w, "end", fmt(edges[hi])));
    if (edges[lo] < 0 && edges[hi] > 0) chart.appendChild(label(x(0), "middle", "0"));
    chart.appendChild(svg("text", {x: 2, y: pad.top + 8}, fmt(top)));
    if (o.xlabel) {
      chart.appendChild(svg("text", {x: pad.left + w / 2, y: o.height - 3, "text-anchor": "middle"}, o.xlabel));
    }
    return chart;
  }

  // Where latent `id` sits in the site: data/chunk-NNNNN.js holds latents [n * chunk_size, (n + 1) * chunk_size).
  function chunkFile(chunk) {
    return `data/chunk-${String(chunk).padStart(5, "0")}.js`;
  }

  function latentHref(id) {
    return `latent.html?id=${id}`;
  }

  // A full-page error message (the data did not load, a bad id, ...).
  function showError(container, message) {
    container.replaceChildren(el("p", {class: "error", role: "alert"}, message));
  }

  return {el, svg, fmt, fmtPct, showToken, actColor, example, histogram, chunkFile, latentHref, showError};
})();
