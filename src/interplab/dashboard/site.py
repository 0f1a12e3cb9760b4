"""`interplab dashboard build`: the static feature dashboard, a folder a browser opens without any server.

    SITE/index.html         every latent: search by id or by top token / top logit, sort, pages of rows
    SITE/latent.html?id=N   one latent: stats, activation histogram, top examples highlighted by activation,
                            samples per activation interval, logit effects, correlated latents and neurons
    SITE/*.js, style.css    the page code (plain JS, no libraries, no network)
    SITE/data/              the numbers, written by `interplab.dashboard.data` (see `interplab.dashboard.store`)

The pages read their data through <script src="data/...js"> tags rather than fetch(): Chromium refuses fetch() of
local files, so this is what lets a site opened as file://.../index.html work. Corpus text is placed in the page
with textContent only, so HTML in a corpus shows as text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.data import build_dashboard_data
from interplab.errors import InterplabError
from interplab.fileio import join, write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.sae.base import SparseAutoencoder

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


def build_site(cfg: DashboardConfig, *, model: HookedModel | None = None,
               sae: SparseAutoencoder | None = None) -> dict[str, Any]:
    """Compute the dashboard data for `cfg.sae` into `cfg.out`/data/, then write the pages beside it.

    `model` and `sae`, when given, are used instead of loading `cfg.model` and `cfg.sae` (e.g. by `interplab demo`,
    which holds both already). Returns the data builder's summary plus "index" (the index.html to open) and
    "assets" (the page files).
    """
    summary = dict(build_dashboard_data(cfg, model=model, sae=sae))
    summary["assets"] = write_assets(cfg.out)
    summary["index"] = site_index(cfg.out)
    return summary


def format_build(summary: dict[str, Any]) -> str:
    """One line for the CLI: where the dashboard is and how to look at it."""
    index = summary["index"]
    opener = Path(index).as_uri() if os.path.isabs(index) else index
    return f"dashboard written: open {opener} (or run `interplab dashboard serve {os.path.dirname(index)}`)"
