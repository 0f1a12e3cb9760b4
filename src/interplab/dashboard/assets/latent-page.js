"use strict";
// The page of one latent: latent.html?id=N (or latent.html#N). Its data sits in data/chunk-NNNNN.js with the
// other latents of its chunk; the page injects that <script> (fetch() of a local file is refused under file://),
// and the script calls INTERPLAB_CHUNK(chunk, latents) back.

(function () {
  const {el, fmt, fmtPct, showToken, example, histogram, chunkFile, latentHref, showError} = IL;
  const meta = window.INTERPLAB_META;
  const app = document.getElementById("app");
  const chunks = new Map(); // chunk index -> its latents, once its script has run
  let wanted = null; // the latent id this page shows

  if (!meta) {
    showError(app, "The dashboard data did not load (data/meta.js). Build the site with `interplab dashboard build`.");
    return;
  }

  window.INTERPLAB_CHUNK = function (chunk, latents) {
    chunks.set(chunk, latents);
    if (wanted !== null && Math.floor(wanted / meta.chunk_size) === chunk) show(wanted);
  };

  // The id as typed: ?id=N, else #N (the query wins when both are there).
  function requestedText() {
    const fromQuery = new URLSearchParams(window.location.search).get("id");
    let text = fromQuery !== null ? fromQuery : window.location.hash.slice(1);
    try {
      text = fromQuery !== null ? text : decodeURIComponent(text);
    } catch (e) {
      // a malformed %-escape: show it as it is
    }
    return text.trim();
  }

  function open() {
    const text = requestedText();
    if (text === "") {
      showError(app, "No latent given: open latent.html?id=N, or pick one from the index.");
      return;
    }
    const id = /^\d+$/.test(text) ? Number(text) : NaN;
    if (!(id >= 0 && id < meta.d_sae)) {
      showError(app, `No latent ${JSON.stringify(text)} here: ids run from 0 to ${meta.d_sae - 1}.`);
      return;
    }
    wanted = id;
    const chunk = Math.floor(id / meta.chunk_size);
    if (chunks.has(chunk)) {
      show(id);
      return;
    }
    const script = document.createElement("script");
    script.src = chunkFile(chunk);
    script.onerror = () => showError(app, `Could not load ${chunkFile(chunk)} (latent ${id}).`);
    document.body.appendChild(script);
  }

  function show(id) {
    const latent = chunks.get(Math.floor(id / meta.chunk_size))[id % meta.chunk_size];
    if (!latent || latent.id !== id) {
      showError(app, `${chunkFile(Math.floor(id / meta.chunk_size))} does not hold latent ${id} where expected.`);
      return;
    }
    document.title = `Latent ${id} · interplab feature dashboard`;
    navigation(id);
    app.replaceChildren(
      header(latent),
      el("div", {class: "latent-grid"}, [
        el("div", {class: "side"}, [activations(latent), logits(latent), correlations(latent)]),
        el("div", {class: "main"}, [topExamples(latent), quantiles(latent)]),
      ]),
    );
  }

  function navigation(id) {
    const prev = document.getElementById("prev-latent");
    const next = document.getElementById("next-latent");
    prev.href = latentHref(Math.max(0, id - 1));
    next.href = latentHref(Math.min(meta.d_sae - 1, id + 1));
    prev.hidden = id === 0;
    next.hidden = id === meta.d_sae - 1;
    document.getElementById("goto-id").max = meta.d_sae - 1;
  }

  function stat(label, value, testid) {
    return el("div", {class: "stat"}, [el("dt", {}, label), el("dd", {"data-testid": testid}, value)]);
  }

  function header(latent) {
    const firing = Math.round(latent.freq * meta.n_tokens);
    return el("section", {class: "latent-header"}, [
      el("h2", {"data-testid": "latent-title"}, `Latent ${latent.id}`),
      el("dl", {class: "stats"}, [
        stat("frequency", `${fmtPct(latent.freq)} (${firing.toLocaleString("en")} of ` +
          `${Number(meta.n_tokens).toLocaleString("en")} tokens)`, "stat-freq"),
        stat("max activation", fmt(latent.max_act), "stat-max"),
        stat("mean activation (when firing)", fmt(latent.mean_act), "stat-mean"),
      ]),
      el("p", {class: "muted"}, `${meta.sae} · ${meta.model} · ${meta.hook}`),
    ]);
  }

  function section(title, children, testid) {
    return el("section", {class: "panel", "data-testid": testid}, [el("h3", {}, title), ...children]);
  }

  function activations(latent) {
    return section("Activation histogram (firing tokens)", [
      histogram(meta.hist_edges, latent.hist, {xlabel: "activation"}),
    ], "activation-histogram");
  }

  function logitTable(pairs, cls) {
    return el("table", {class: `logit-table ${cls}`}, pairs.map(([token, value]) => el("tr", {}, [
      el("td", {class: "token", title: JSON.stringify(token)}, el("code", {}, showToken(token, true))),
      el("td", {class: "num"}, fmt(value)),
    ])));
  }

  function logits(latent) {
    const effects = latent.logits || {top: [], bottom: [], hist: null};
    return section("Logit effects", [
      el("div", {class: "logit-columns"}, [
        el("div", {}, [el("h4", {}, "promoted"), logitTable(effects.top, "positive")]),
        el("div", {}, [el("h4", {}, "suppressed"), logitTable(effects.bottom, "negative")]),
      ]),
      histogram(meta.logit_hist_edges, effects.hist, {
        xlabel: "effect on the logits of every token",
        color: (lo, hi) => (lo + hi >= 0 ? "#3b7dd8" : "#d84b3b"),
      }),
    ], "logits");
  }

  function correlations(latent) {
    const others = (latent.corr_latents || []).map(([id, r]) =>
      el("li", {}, [el("a", {href: latentHref(id), class: "latent-link"}, `latent ${id}`), ` r = ${fmt(r)}`]));
    const neurons = (latent.corr_neurons || []).map(([i, r]) => el("li", {}, `neuron ${i} r = ${fmt(r)}`));
    return section("Correlated", [
      el("h4", {}, "latents"),
      others.length ? el("ul", {class: "corr"}, others) : el("p", {class: "muted"}, "none"),
      el("h4", {}, "neurons"),
      neurons.length ? el("ul", {class: "corr"}, neurons) : el("p", {class: "muted"}, "not computed"),
    ], "correlations");
  }

  function topExamples(latent) {
    const top = latent.top || [];
    const rows = top.map((ex, i) => example(ex, latent.max_act, i === 0 ? {"data-testid": "top-example"} : {}));
    return section(`Top activations (${top.length})`, rows.length ? rows : [el("p", {class: "muted"},
      "This latent never fired on the corpus.")], "top-examples");
  }

  function quantiles(latent) {
    const bins = (latent.quantiles || []).slice().reverse(); // highest interval first, under the top examples
    return section("Samples by activation interval", bins.map((q) => el("div", {class: "quantile"}, [
      el("h4", {}, `(${fmt(q.bin[0])}, ${fmt(q.bin[1])}] · ${q.examples.length} sample(s)`),
      ...(q.examples.length ? q.examples.map((ex) => example(ex, latent.max_act))
        : [el("p", {class: "muted"}, "no token in this interval")]),
    ])), "quantiles");
  }

  document.getElementById("goto").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("goto-id").value;
    if (value !== "") window.location.href = latentHref(value);
  });
  // Arrow keys step through the latents (not while typing in the box).
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" || wanted === null || event.altKey || event.ctrlKey || event.metaKey) return;
    const step = {ArrowLeft: -1, ArrowRight: 1}[event.key];
    const id = wanted + (step || 0);
    if (step && id >= 0 && id < meta.d_sae) window.location.href = latentHref(id);
  });
  window.addEventListener("hashchange", open);
  open();
})();
