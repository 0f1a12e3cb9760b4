"""HTML pieces of the run reports: escaping, relative links, the page shell (with its Content-Security-Policy),
key-value tables, and Markdown to HTML (markdown-it-py to render, nh3 to sanitise) that keeps only links and images
that stay inside the run folder."""

from __future__ import annotations

import base64
import hashlib
import html
import os
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

from interplab.dashboard.serve import PAGE_POLICY


def esc(text: Any) -> str:
    """`text` as HTML text or a quoted attribute value."""
    return html.escape(str(text), quote=True)


def href(target: Path, start: Path) -> str:
    """A relative, URL-quoted, attribute-escaped link from folder `start` to `target`."""
    return esc(quote(Path(os.path.relpath(target, start)).as_posix()))


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;overflow:auto;max-height:40em}img{max-width:100%;border:1px solid #ddd}
figure{margin:1em 0}figcaption{color:#666;font-size:12px}code{background:#f3f3f3;padding:0 3px}
.md{border-left:3px solid #ddd;padding-left:1em}"""


STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
POLICY = f"{PAGE_POLICY}; style-src 'self' '{STYLE_HASH}'"
"""The dashboard's page policy, plus the one inline stylesheet of a report (by its hash: a report stays one file)."""


def page(title: str, marker: str, body: list[str]) -> str:
    """A whole HTML page: the marker comment that identifies our pages, the policy first in <head>, then `body`."""
    return "\n".join([
        "<!DOCTYPE html>", marker, '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(POLICY)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>", *body, "</body></html>", ""])


def kv_table(values: dict[str, Any]) -> str:
    """A two-column table of keys and formatted values (numbers right-aligned)."""
    rows = "".join(f'<tr><th>{esc(k)}</th><td{" class=num" if isinstance(v, (int, float)) else ""}>'
                   f"{esc(fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>" if rows else "<p>(no scalar values)</p>"


def _shift_headings(tokens: list[Token]) -> list[Token]:
    # The page's own <h1> is the run's title: a report's "# Title" becomes <h2>, and so on down to <h6>.
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 1)}"
    return tokens


def safe_relative_url(url: str, base: Path) -> bool:
    """Whether `url` (as the browser will read it) names a file inside the folder `base`: a relative path without a
    scheme, host, drive or absolute start, whose `..` steps (with `/` and `\\` both read as separators, after
    percent-decoding, symlinks followed) never leave `base`; or a bare `#fragment` of the page itself.

    Everything else is refused, http(s) included: a report is a local page and fetches nothing from elsewhere
    (`\\\\host\\share` would be an SMB request on Windows, `//host/x` a fetch from another host)."""
    if not url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):  # browsers drop tabs and newlines silently
        return False
    if url.startswith("#"):
        return True
    raw = re.split(r"[?#]", url, maxsplit=1)[0]
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return False
    if not path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) or ":" in path:  # a scheme or a drive
        return False
    path = path.replace("\\", "/")
    if path.startswith("/"):  # absolute, protocol-relative (//host), or UNC (\\host)
        return False
    # Windows trims trailing dots and spaces from a name ("...", ".. " would be ".."): refuse such names outright.
    if any(part.rstrip(". ") == "" and part not in ("", ".", "..") for part in path.split("/")):
        return False
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        return False
    root = base.resolve()
    target = (root / normal).resolve()
    return target == root or root in target.parents


_ALLOWED_TAGS = {"h2", "h3", "h4", "h5", "h6", "p", "br", "hr", "strong", "em", "code", "pre", "blockquote", "ul",
                 "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a", "img", "s"}
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "ol": {"start"}}
_URL_ATTRIBUTES = {("a", "href"), ("img", "src")}


def markdown_to_html(text: str, base: Path) -> str:
    """Markdown (CommonMark with tables, rendered by markdown-it-py with raw HTML shown as text) sanitised by nh3:
    only plain formatting tags, no style or event attributes, and links and images only where `safe_relative_url`
    allows (a refused link keeps its text, a refused image its alt text as the element's description)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    rendered = md.renderer.render(_shift_headings(md.parse(text)), md.options, {})

    def keep(tag: str, attribute: str, value: str) -> str | None:
        if (tag, attribute) in _URL_ATTRIBUTES and not safe_relative_url(value, base):
            return None
        return value

    return nh3.clean(rendered, tags=_ALLOWED_TAGS, attributes=_ALLOWED_ATTRIBUTES, attribute_filter=keep,
                     url_schemes=set(), link_rel=None, strip_comments=True)


def fmt(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, None as a dash, long text cut."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"
