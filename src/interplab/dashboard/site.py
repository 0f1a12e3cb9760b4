"""`interplab dashboard build`: the static feature dashboard, a folder a browser opens without any server.

    SITE/index.html         every latent: search by id or by top token / top logit, sort, pages of rows
    SITE/latent.html?id=N   one latent: stats, activation histogram, top examples highlighted by activation,
                            samples per activation interval, logit effects, correlated latents and neurons
    SITE/*.js, style.css    the page code (plain JS, no libraries, no network)
    SITE/data/              the numbers, written by `interplab.dashboard.data` (see `interplab.dashboard.store`)

The pages read their data through <script src="data/...js"> tags rather than fetch(): Chromium refuses fetch() of
local files, so this is what lets a site opened as file://.../index.html work. Corpus text is placed in the page
with textContent only, so HTML in a corpus shows as text, and every page carries the Content-Security-Policy of
`serve.PAGE_POLICY` in a <meta> tag.

The site is a run folder of `interplab.runs` (kind "dashboard build": SITE/config.json, SITE/metrics.json): --out
must be new, empty, or a site this command built with the same settings, so a build never overwrites someone
else's index.html. Both files name the SAE, model and corpus as the site does (`data.place_label`), never by an
absolute path, since a site is meant to be shared.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.data import build_dashboard_data, place_label
from interplab.dashboard.store import META_FILE, data_dir
from interplab.errors import InterplabError
from interplab.fileio import join, read_url, write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.runs import JSONDict, Run
from interplab.sae.base import SparseAutoencoder

KIND = "dashboard build"
"""The kind of the site's run folder (config.json, metrics.json)."""
METRIC_KEYS = ("d_sae", "n_tokens", "n_contexts", "hook", "setup_s", "forward_s", "stats_s", "finalize_s",
               "write_s", "total_s")
"""What metrics.json keeps of the build's summary (besides the labels): no paths."""

ASSETS = Path(__file__).parent / "assets"
"""The page files shipped with the package (package data `dashboard/assets/*`)."""

ASSET_FILES = ("index.html", "latent.html", "style.css", "common.js", "index-page.js", "latent-page.js")
"""Every file a site needs besides data/."""


def write_assets(site: str) -> list[str]:
    """Copy the page files into `site` (a folder or fsspec URL), each written atomically; return their paths.

    The data in `site`/data/ is left alone, so the pages of an existing site can be refreshed on their own.
    """
    missing = [name for name in ASSET_FILES if not (ASSETS / name).is_file()]
    if missing:
        raise InterplabError(f"the dashboard assets {missing} are missing from {ASSETS}; reinstall interplab "
                             "(they ship as package data)")
    written = []
    for name in ASSET_FILES:
        path = join(site, name)
        write_url_atomic(path, (ASSETS / name).read_bytes())
        written.append(path)
    return written


def site_index(site: str) -> str:
    """The path of `site`/index.html to open: absolute for a local folder, the URL as given otherwise."""
    if site.startswith("file://"):
        site = site[len("file://"):]
    if "://" not in site:
        return os.path.abspath(os.path.join(site, "index.html"))
    return join(site, "index.html")


def site_identity(cfg: DashboardConfig) -> JSONDict:
    """The settings config.json records for `cfg`: all of them, with the SAE, model and corpus as the site names
    them (so that no absolute path is written into a shared site)."""
    settings: JSONDict = asdict(cfg)
    for key in ("sae", "model", "corpus"):
        settings[key] = place_label(getattr(cfg, key), cfg.out)
    return settings


def build_site(cfg: DashboardConfig, *, model: HookedModel | None = None,
               sae: SparseAutoencoder | None = None) -> dict[str, Any]:
    """Compute the dashboard data for `cfg.sae` into `cfg.out`/data/, then write the pages beside it.

    `cfg.out` is checked first (`Run.open`): new, empty, or this command's site with the same settings, else one
    `InterplabError` and nothing written. A site already complete gets fresh page files and keeps its data. `model`
    and `sae`, when given, are used instead of loading `cfg.model` and `cfg.sae` (e.g. by `interplab demo`, which
    holds both already). Returns the data builder's summary plus "index" (the index.html to open) and "assets"
    (the page files).
    """
    if sae is not None and not cfg.sae:
        cfg = replace(cfg, sae="(in memory)")
    cfg.validate()
    with Run.open(cfg.out, KIND, site_identity(cfg)) as run:
        if run.status == "complete" and run.metrics is not None and read_url(join(data_dir(cfg.out), META_FILE)):
            summary: dict[str, Any] = dict(run.metrics)
        else:
            summary = dict(build_dashboard_data(cfg, model=model, sae=sae))
            run.write_metrics({**{k: summary[k] for k in METRIC_KEYS if k in summary}, **summary.get("labels", {})})
        summary["assets"] = write_assets(cfg.out)
    summary["index"] = site_index(cfg.out)
    return summary


def format_build(summary: dict[str, Any]) -> str:
    """One line for the CLI: where the dashboard is and how to look at it."""
    index = summary["index"]
    opener = Path(index).as_uri() if os.path.isabs(index) else index
    return f"dashboard written: open {opener} (or run `interplab dashboard serve {os.path.dirname(index)}`)"
