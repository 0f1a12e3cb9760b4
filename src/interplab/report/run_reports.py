"""`interplab report runs`: one self-contained `report.html` per run folder, and one index linking them all.

A run folder written through `interplab.runs` records its kind, the name of the command that wrote it ("probe",
"toy train", "beliefs train", "weights svd", "lens", ...): the "kind" of its metrics.json, else of its config.json
{"kind", "config"} (a run without metrics.json is incomplete, and says so). Folders that record no kind (written by
older versions or other tools, and formats that are not run folders) are recognised by the files in them:

    demo              report.md beside a saes/ folder           sae train       train_config.json + metrics.json
    sae               cfg.json (one trained SAE)                sae eval        a JSON with "sae_config" + "metrics"
    toy train         train.json + log.jsonl                    toy inspect     inspect.json
    beliefs           train.json and/or regress.json            beliefs msp     msp.json
    probe             probe.json                                refusal         refusal.json
    synth tms         tms.json                                  synth bench     bench.json
    weights svd       svd.json                                  weights outliers outliers.json
    lens              lens.json                                 perturb         a JSON with steps, curves, plateau
    activations       manifest.json with "shards" (a harvest)   dashboard       index.html + data/meta.js (linked as is)
    run               anything else with a config.json and another *.json or *.png, and no weight files

(a folder holding *.safetensors / *.pt / *.bin and no known result is a model or checkpoint, not a run; checkpoints/
and hidden folders are not searched). A report shows the configs (config files, and the "config" object of each
result JSON, flattened to dotted keys), the headline scalars of each result JSON with the full JSON one click away,
every report.md rendered as HTML, every PNG under the folder that no nested run owns, and links to nested runs.
All text is escaped; images and links are relative, so a folder of runs can be moved or zipped whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interplab.activations.store import RANK_DIR_RE
from interplab.dashboard import store
from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.report.configs import RunReportConfig
from interplab.report.html import esc, fmt, href, kv_table, markdown_to_html, page
from interplab.runs import CONFIG, METRICS

REPORT_NAME = "report.html"
REPORT_MARKER = "<!-- interplab run report -->"
INDEX_MARKER = "<!-- interplab run index -->"
CONFIG_FILES = ("config.json", "cfg.json", "train_config.json")
IGNORED_JSON = {"progress.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json", "added_tokens.json", "vocab.json", "labelled.json"}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf", ".pth", ".ckpt")
NOT_METRICS = ("config", "sae_config", "figures")
"""Top-level keys of a result JSON that are not metrics: configs are shown as configs, figures as images."""
PRUNED_DIRS = {"checkpoints", "__pycache__", "node_modules"}
DASHBOARD_KINDS = ("dashboard", "dashboard build")
"""A dashboard site, sniffed (older sites) or recorded by `interplab dashboard build`: linked as is, never given a
report.html, and its data/ not searched."""
NAMED_KINDS = (("toy inspect", "inspect.json"), ("probe", "probe.json"), ("refusal", "refusal.json"),
               ("synth tms", "tms.json"), ("weights svd", "svd.json"), ("weights outliers", "outliers.json"),
               ("lens", "lens.json"), ("beliefs msp", "msp.json"), ("synth bench", "bench.json"))
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {  # by kind: a command name, as recorded or recognised
    "beliefs train": ("r2", "gap", "tokens"),
    "beliefs regress": ("r2", "gap"),
    "weights svd": ("proxies.kind_share.mean", "proxies.coherence.mean", "control.kind_share.mean"),
    "perturb": ("step_unit", "n_pairs"),
    "sae": ("fvu", "l0", "dead_fraction", "mse"),
    "sae train": ("fvu", "l0", "dead_fraction"),
    "sae eval": ("reconstruction.fvu", "model_performance.ce_loss_score", "sparsity.l0", "kl_div_with_sae"),
    "demo": ("fvu", "ce_loss_score", "l0"),
    "toy train": ("final.test_acc", "jump_step", "steps_trained"),
    "toy inspect": ("accuracy.sample", "accuracy.test"),
    "beliefs": ("r2", "gap"),
    "probe": ("diff_means.scores.auc", "logistic.scores.auc", "n_examples"),
    "refusal": ("chosen.layer", "harmful_baseline.refusal_rate", "harmful_ablated.refusal_rate"),
    "weights outliers": ("verdict", "n_tokens"),
    "lens": ("n_tokens", "final_entropy"),
    "patch": ("baseline.clean_mean", "baseline.corrupted_mean", "n_pairs"),
    "dla": ("logit_diff.mean", "sum_error.max_abs", "n_prompts"),
    "heads": ("n_seqs",),
    "synth tms": ("pictures.represented", "sweep.d_star"),
    "dashboard": ("d_sae", "n_tokens", "hook"),
    "dashboard build": ("d_sae", "n_tokens", "hook"),
}
"""Flattened keys (or dotted suffixes of them) shown first for each kind; other scalars follow in file order."""


@dataclass
class Run:
    path: Path
    kind: str
    configs: dict[str, dict] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    markdown: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    children: list["Run"] = field(default_factory=list)
    recorded: bool = False
    """The kind was read from the folder's config.json / metrics.json (an `interplab.runs` run folder)."""

    @property
    def page(self) -> Path:
        """What the index links to: the report, or a dashboard's own index.html."""
        return self.path / ("index.html" if self.kind in DASHBOARD_KINDS else REPORT_NAME)


# ---- finding runs -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # not ours, or half-written: the report links it as a plain file


def _sniff(results: dict[str, Any]) -> str | None:
    dicts = [r for r in results.values() if isinstance(r, dict)]
    if any({"sae_config", "metrics"} <= set(r) for r in dicts):
        return "sae eval"
    if any({"steps", "curves", "plateau"} <= set(r) for r in dicts):
        return "perturb"
    return None


def recorded_kind(folder: Path, files: set[str], results: dict[str, Any]) -> str | None:
    """The kind an `interplab.runs` run folder records: "kind" of metrics.json, else of config.json when that is
    {"kind": ..., "config": {...}}; None if the folder records none (e.g. a Hugging Face config.json)."""
    metrics = results.get(METRICS)
    if isinstance(metrics, dict) and isinstance(metrics.get("kind"), str) and metrics["kind"]:
        return metrics["kind"]
    if CONFIG in files:
        config = _read_json(folder / CONFIG)
        if (isinstance(config, dict) and isinstance(config.get("kind"), str) and config["kind"]
                and isinstance(config.get("config"), dict)):
            return config["kind"]
    return None


def sniff_kind(folder: Path, files: set[str], dirs: set[str], results: dict[str, Any]) -> str | None:
    """The kind of a folder that records none, guessed from its file names (see the module docstring), or None if
    it is not a run folder."""
    if "index.html" in files and (folder / "data" / "meta.js").is_file():
        return "dashboard"
    if "report.md" in files and "saes" in dirs:
        return "demo"
    if "cfg.json" in files:
        return "sae"
    if {"train_config.json", "metrics.json"} <= files:
        return "sae train"
    if {"train.json", "log.jsonl"} <= files:
        return "toy train"
    if "train.json" in files or "regress.json" in files:
        return "beliefs"
    for kind, name in NAMED_KINDS:
        if name in files:
            return kind
    if isinstance(results.get("manifest.json"), dict) and "shards" in results["manifest.json"]:
        return "activations"
    sniffed = _sniff(results)
    if sniffed:
        return sniffed
    has_weights = any(f.endswith(WEIGHT_SUFFIXES) for f in files)
    others = [f for f in files if f.endswith(".png") or (f.endswith(".json") and f not in CONFIG_FILES)]
    if "config.json" in files and others and not has_weights:
        return "run"
    return None


def classify(folder: Path, files: set[str], dirs: set[str], results: dict[str, Any]) -> str | None:
    """The kind of run `folder` holds: the kind it records, else the one its file names suggest; None if it is not
    a run folder."""
    return recorded_kind(folder, files, results) or sniff_kind(folder, files, dirs, results)


def _load_run(folder: Path, kind: str, files: set[str], results: dict[str, Any], recorded: bool) -> Run:
    run = Run(folder, kind, recorded=recorded)
    for name in CONFIG_FILES:
        if name in files and isinstance(data := _read_json(folder / name), dict):
            # a run folder's config.json is {"kind", "config"}: the kind is the title, the config is the table
            inner = data.get("config") if recorded and name == CONFIG else None
            run.configs[name] = inner if isinstance(inner, dict) else data
    for name, data in results.items():
        if isinstance(data, dict):
            for key in ("config", "sae_config"):
                if isinstance(data.get(key), dict):
                    run.configs[f"{name}: {key}"] = data[key]
    run.results = results
    run.markdown = [folder / f for f in sorted(files) if f.endswith(".md")]
    run.files = [folder / f for f in sorted(files) if f != REPORT_NAME and ".tmp-" not in f]
    return run


def find_runs(root: Path) -> list[Run]:
    """Every run folder under `root` (itself included), in path order, with its nested runs attached."""
    runs: list[Run] = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in PRUNED_DIRS)
        if "manifest.json" in filenames:  # a torchrun harvest's per-rank stores are part of the merged store
            dirnames[:] = [d for d in dirnames if not RANK_DIR_RE.fullmatch(d)]
        files = set(filenames)
        results = {f: _read_json(folder / f) for f in sorted(files)
                   if f.endswith(".json") and f not in IGNORED_JSON and f not in CONFIG_FILES}
        recorded = recorded_kind(folder, files, results)
        kind = recorded or sniff_kind(folder, files, set(dirnames), results)
        if kind is None:
            continue
        runs.append(_load_run(folder, kind, files, results, recorded is not None))
        if kind in DASHBOARD_KINDS:
            dirnames[:] = []  # a site's data/ is the dashboard's business
    runs.sort(key=lambda r: r.path.parts)
    for run in runs:
        parent = max((p for p in runs if p is not run and p.path in run.path.parents),
                     key=lambda p: len(p.path.parts), default=None)
        if parent is not None:
            parent.children.append(run)
    return runs


def images(run: Run) -> list[Path]:
    """PNGs under the run folder, except those inside a nested run or a searched-around folder."""
    owned = {c.path for c in run.children}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(run.path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in PRUNED_DIRS
                             and Path(dirpath, d) not in owned)
        found += [Path(dirpath, f) for f in sorted(filenames) if f.lower().endswith(".png")]
    return found


# ---- values -----------------------------------------------------------------------------------------------------
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Scalars of nested dicts under dotted keys; short lists of scalars become one comma-joined value."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list):
        if len(obj) <= 10 and all(v is None or isinstance(v, (str, int, float, bool)) for v in obj):
            out[prefix] = ", ".join(fmt(v) for v in obj)
    else:
        out[prefix] = obj
    return out


def pretty_json(obj: Any, indent: int = 0) -> str:
    """Indented JSON with lists of scalars kept on one line (a 1,000-number curve is one line, not 1,000)."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(str(k))}: {pretty_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + pretty_json(v, indent + 1) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj)


def headline(kind: str, flat: dict[str, Any], n: int) -> dict[str, Any]:
    """Up to `n` scalars: the kind's preferred keys first, then the others in file order."""
    keys = [k for pattern in HEADLINE_KEYS.get(kind, ()) for k in flat if k == pattern or k.endswith("." + pattern)]
    keys += [k for k in flat if not isinstance(flat[k], str) or len(flat[k]) <= 80]
    chosen = list(dict.fromkeys(keys))
    return {k: flat[k] for k in (chosen[:n] if n > 0 else chosen)}


def metric_values(run: Run, data: dict[str, Any]) -> dict[str, Any]:
    """A result JSON's metrics, flattened: without its configs and figures, and without the "kind" that names the
    run (shown as the report's title)."""
    return flatten({k: v for k, v in data.items()
                    if k not in NOT_METRICS and not (k == "kind" and v == run.kind)})


def run_headline(run: Run, n: int) -> dict[str, Any]:
    """The headline scalars of a run over all its result files (metrics without their configs)."""
    flat: dict[str, Any] = {}
    if run.recorded and METRICS not in run.results:
        flat["status"] = f"incomplete (no {METRICS})"
    for name, data in run.results.items():
        if isinstance(data, dict):
            flat.update(metric_values(run, data))
    if run.kind in DASHBOARD_KINDS:
        flat.update(_dashboard_meta(run.path))
    return headline(run.kind, flat, n)


def _dashboard_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = store.load_meta(str(folder))
    except InterplabError:
        return {"status": "incomplete (no data/meta.js)"}
    return {k: meta[k] for k in ("d_sae", "n_tokens", "hook", "model", "sae", "corpus") if k in meta}


def render_report(run: Run, cfg: RunReportConfig, root: Path, index: Path) -> str:
    """The HTML of one run's report."""
    title = f"{run.kind}: {run.path.name or run.path.resolve().name}"
    body = [f"<h1>{esc(title)}</h1>",
            f'<p>Folder <code>{esc(run.path)}</code> · <a href="{href(index, run.path)}">all runs</a></p>']
    for name, config in run.configs.items():
        body += [f"<h2>Config: {esc(name)}</h2>", kv_table(flatten(config))]
    for name, data in run.results.items():
        path = run.path / name
        body.append(f'<h2>Metrics: <a href="{href(path, run.path)}">{esc(name)}</a></h2>')
        if not isinstance(data, dict):
            body.append("<p>(not a JSON object; open the file)</p>")
            continue
        body.append(kv_table(headline(run.kind, metric_values(run, data), cfg.headline)))
        if path.stat().st_size <= cfg.max_json_kb * 1024:
            body.append(f"<details><summary>full JSON</summary><pre>{esc(pretty_json(data))}</pre>"
                        "</details>")
    for md in run.markdown:
        body += [f"<h2>Report: {esc(md.name)}</h2>",
                 f'<div class="md">{markdown_to_html(md.read_text(encoding="utf-8", errors="replace"), run.path)}'
                 "</div>"]
    figures = images(run)
    if figures:
        body.append("<h2>Figures</h2>")
        body += [f'<figure><img src="{href(p, run.path)}" alt="{esc(p.name)}" loading="lazy">'
                 f"<figcaption>{esc(p.relative_to(run.path).as_posix())}</figcaption></figure>" for p in figures]
    if run.children:
        body += ["<h2>Runs inside this folder</h2>", "<ul>" + "".join(
            f'<li><a href="{href(c.page, run.path)}">{esc(c.kind)}: {esc(c.path.relative_to(run.path).as_posix())}'
            "</a></li>" for c in run.children) + "</ul>"]
    body += ["<h2>Files</h2>", "<ul>" + "".join(
        f'<li><a href="{href(f, run.path)}">{esc(f.name)}</a> ({f.stat().st_size:,} bytes)</li>'
        for f in run.files if f.is_file()) + "</ul>"]
    return page(title, REPORT_MARKER, body)


def render_index(runs: list[Run], root: Path, index: Path) -> str:
    """The HTML of the index page listing every run."""
    rows = []
    for run in runs:
        numbers = "; ".join(f"{k} = {fmt(v)}" for k, v in run_headline(run, 3).items())
        rel = run.path.relative_to(root).as_posix() or "."
        rows.append(f"<tr><td>{esc(run.kind)}</td><td><a href=\"{href(run.page, index.parent)}\">{esc(rel)}</a>"
                    f"</td><td>{esc(numbers)}</td></tr>")
    body = [f"<h1>Runs under {esc(root)}</h1>", f"<p>{len(runs)} run folder(s).</p>",
            "<table><tr><th>kind</th><th>folder</th><th>headline</th></tr>" + "".join(rows) + "</table>"]
    return page(f"interplab runs: {root.resolve().name}", INDEX_MARKER, body)


def _write_html(path: Path, text: str, marker: str) -> None:
    # Refuse to replace an HTML file some other tool wrote (e.g. a dashboard's own index.html).
    if path.is_file() and marker not in path.read_text(encoding="utf-8", errors="replace")[:200]:
        raise InterplabError(f"{path} exists and was not written by `interplab report runs`; move it or choose "
                             "another --out")
    write_url_atomic(str(path), text.encode("utf-8"))


def write_run_reports(cfg: RunReportConfig) -> dict[str, Any]:
    """Find every run folder under cfg.root, write its report.html and the index; return what was written."""
    root = Path(cfg.root)
    if "://" in cfg.root or not root.is_dir():
        raise InterplabError(f"--root {cfg.root!r} is not a local folder; give the folder holding your run folders")
    index = Path(cfg.out) if cfg.out else root / "index.html"
    runs = find_runs(root)
    if not runs:
        raise InterplabError(
            f"no run folders under {cfg.root}: looked for interplab run folders (a config.json or metrics.json that "
            "records its kind) and the result files of interplab commands (cfg.json, "
            "metrics.json + train_config.json, train.json, regress.json, inspect.json, probe.json, refusal.json, "
            "tms.json, svd.json, outliers.json, lens.json, msp.json, bench.json, an sae-eval JSON, report.md + "
            "saes/, a dashboard's data/meta.js) or a config.json beside other *.json / *.png files")
    for run in runs:
        if run.kind not in DASHBOARD_KINDS:
            _write_html(run.page, render_report(run, cfg, root, index), REPORT_MARKER)
    _write_html(index, render_index(runs, root, index), INDEX_MARKER)
    return {"root": str(root), "index": str(index), "n_runs": len(runs),
            "runs": [{"kind": r.kind, "path": str(r.path), "page": str(r.page), "headline": run_headline(r, 3)}
                     for r in runs]}


def format_summary(result: dict[str, Any]) -> str:
    """One line per kind, then where the index is."""
    kinds: dict[str, int] = {}
    for run in result["runs"]:
        kinds[run["kind"]] = kinds.get(run["kind"], 0) + 1
    listed = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    return f"{result['n_runs']} run folder(s) under {result['root']} ({listed}); open {result['index']}"
