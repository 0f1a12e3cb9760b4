"use strict";
// The index page: every latent in a table that is searched, sorted and paged in the browser. Only one page of rows
// (at most a few hundred) is ever in the DOM, so tens of thousands of latents stay responsive.

(function () {
  const {el, fmt, fmtPct, showToken, latentHref, histogram, showError} = IL;
  const meta = window.INTERPLAB_META;
  const index = window.INTERPLAB_INDEX;
  const app = document.getElementById("app");
  if (!meta || !index) {
    showError(app, "The dashboard data did not load (data/meta.js, data/index.js). " +
      "Build the site with `interplab dashboard build`.");
    return;
  }

  const n = index.id.length;
  const lowerTop = index.top_token.map((s) => String(s).toLowerCase());
  const lowerLogit = index.top_logit.map((s) => String(s).toLowerCase());
  const rowOf = new Map(index.id.map((id, row) => [id, row]));
  // Frequency bars on a log scale (SAE latents fire from 1e-6 to 1e-1 of tokens); reduce, not a spread of 65k args.
  const logMax = Math.log10(index.freq.reduce((a, b) => Math.max(a, b), 0));
  const logMin = Math.min(logMax - 1, Math.log10(index.freq.reduce((a, b) => (b > 0 ? Math.min(a, b) : a), 1)));
  const sortedCache = new Map(); // "column:dir" -> rows in that order (sorting 65k rows costs ~50 ms: do it once)

  const search = document.getElementById("search");
  const sortSelect = document.getElementById("sort");
  const sizeSelect = document.getElementById("page-size");
  const state = {q: "", sort: "id:1", page: 0, size: 100};

  function sortedRows(key) {
    if (!sortedCache.has(key)) {
      const [column, dir] = key.split(":");
      const values = index[column];
      const rows = Array.from({length: n}, (_, i) => i);
      rows.sort((a, b) => (values[a] - values[b]) * Number(dir) || index.id[a] - index.id[b]);
      sortedCache.set(key, rows);
    }
    return sortedCache.get(key);
  }

  // A number (optionally "#12") selects that latent; any other text matches the top token or top logit,
  // case-insensitively, as a substring (whitespace counts: " the" finds only tokens with a leading space).
  function matchingRows() {
    const q = state.q;
    const rows = sortedRows(state.sort);
    if (q.trim() === "") return rows;
    const number = q.trim().match(/^#?(\d+)$/);
    if (number) {
      const row = rowOf.get(Number(number[1]));
      return row === undefined ? [] : [row];
    }
    const needle = q.toLowerCase();
    return rows.filter((r) => lowerTop[r].includes(needle) || lowerLogit[r].includes(needle));
  }

  function tokenCell(text) {
    return el("td", {class: "token", title: JSON.stringify(text)}, el("code", {}, showToken(text, true)));
  }

  function row(r) {
    const id = index.id[r];
    const freq = index.freq[r];
    const bar = el("span", {class: "freq-bar"});
    bar.style.width = `${freq > 0 ? 2 + (58 * (Math.log10(freq) - logMin)) / (logMax - logMin) : 0}px`;
    const tr = el("tr", {class: freq === 0 ? "dead" : null, "data-id": id}, [
      el("td", {class: "num"}, el("a", {href: latentHref(id), class: "latent-link"}, String(id))),
      el("td", {class: "num", title: String(freq)}, [fmtPct(freq), " ", bar]),
      el("td", {class: "num"}, fmt(index.max_act[r])),
      el("td", {class: "num"}, fmt(index.mean_act[r])),
      tokenCell(index.top_token[r]),
      tokenCell(index.top_logit[r]),
    ]);
    tr.addEventListener("click", (event) => {
      if (event.target.tagName !== "A") window.location.href = latentHref(id);
    });
    return tr;
  }

  function render() {
    const rows = matchingRows();
    const pages = Math.max(1, Math.ceil(rows.length / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    const start = state.page * state.size;
    const shown = rows.slice(start, start + state.size);
    document.getElementById("rows").replaceChildren(...shown.map(row));
    document.getElementById("range").textContent = rows.length === 0 ? "no latent matches"
      : `${start + 1}–${start + shown.length} of ${rows.length}${rows.length < n ? ` (of ${n})` : ""}`;
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    for (const th of document.querySelectorAll("th[data-sort]")) {
      const [column, dir] = state.sort.split(":");
      th.setAttribute("aria-sort", th.dataset.sort !== column ? "none" : dir === "1" ? "ascending" : "descending");
    }
    saveState();
    return rows;
  }

  // The search, sort and page live in the URL's hash, so "back" from a latent returns to the same view.
  function saveState() {
    const params = new URLSearchParams({q: state.q, sort: state.sort, page: state.page, size: state.size});
    try {
      history.replaceState(null, "", "#" + params.toString());
    } catch (e) {
      // Some browsers refuse replaceState on file:// URLs; the view still works, it just is not remembered.
    }
  }

  function loadState() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    state.q = params.get("q") || "";
    const sort = params.get("sort");
    if (sort && [...sortSelect.options].some((o) => o.value === sort)) state.sort = sort;
    state.page = Number(params.get("page")) || 0;
    const size = params.get("size");
    if (size && [...sizeSelect.options].some((o) => o.value === size)) state.size = Number(size);
    search.value = state.q;
    sortSelect.value = state.sort;
    sizeSelect.value = String(state.size);
  }

  function summary() {
    const dead = index.freq.filter((f) => f === 0).length;
    document.getElementById("summary").textContent =
      `${meta.d_sae} latents of ${meta.sae} on ${meta.model} at ${meta.hook}; ` +
      `${Number(meta.n_tokens).toLocaleString("en")} tokens of ${meta.corpus}; ${dead} never fired.`;
    document.title = `${meta.sae} · interplab feature dashboard`;
  }

  // How often latents fire, on a log scale: the usual health check of an SAE (dead and dense latents).
  function density() {
    const logs = index.freq.filter((f) => f > 0).map((f) => Math.log10(f));
    const box = document.getElementById("density");
    if (logs.length === 0) {
      box.replaceChildren(el("p", {class: "muted"}, "no latent fired"));
      return;
    }
    const lo = Math.floor(logs.reduce((a, b) => Math.min(a, b)));
    const hi = Math.max(lo + 1, Math.ceil(logs.reduce((a, b) => Math.max(a, b))));
    const bins = 40;
    const edges = Array.from({length: bins + 1}, (_, i) => lo + ((hi - lo) * i) / bins);
    const counts = new Array(bins).fill(0);
    for (const v of logs) counts[Math.min(bins - 1, Math.floor(((v - lo) / (hi - lo)) * bins))]++;
    box.replaceChildren(histogram(edges, counts, {width: 520, height: 130, xlabel: "log10 firing frequency"}));
  }

  search.addEventListener("input", () => {
    state.q = search.value;
    state.page = 0;
    render();
  });
  // Enter opens the latent when the search names exactly one.
  search.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    const rows = matchingRows();
    if (rows.length === 1) window.location.href = latentHref(index.id[rows[0]]);
  });
  // "/" jumps to the search box, as on most sites with one.
  document.addEventListener("keydown", (event) => {
    if (event.key === "/" && document.activeElement !== search) {
      event.preventDefault();
      search.focus();
    }
  });
  sortSelect.addEventListener("change", () => {
    state.sort = sortSelect.value;
    state.page = 0;
    render();
  });
  sizeSelect.addEventListener("change", () => {
    state.size = Number(sizeSelect.value);
    state.page = 0;
    render();
  });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const column = th.dataset.sort;
      const [current, dir] = state.sort.split(":");
      // A first click sorts ids ascending and the statistics high-first; a second click flips it.
      const first = column === "id" ? "1" : "-1";
      state.sort = `${column}:${current === column ? String(-Number(dir)) : first}`;
      if (![...sortSelect.options].some((o) => o.value === state.sort)) {
        const order = state.sort.endsWith(":-1") ? "high" : "low";
        sortSelect.appendChild(el("option", {value: state.sort}, `${column} (${order} first)`));
      }
      sortSelect.value = state.sort;
      state.page = 0;
      render();
    });
  }
  document.getElementById("prev").addEventListener("click", () => { state.page--; render(); });
  document.getElementById("next").addEventListener("click", () => { state.page++; render(); });

  loadState();
  summary();
  render();
  density();
})();
