"""HTML pieces of the run reports: escaping, relative links, the page shell, key-value tables, and a small
Markdown-to-HTML converter (headings, tables, lists, code, bold, images, links) that escapes everything and keeps
only http(s) links and relative links that stay inside the run folder."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote


def esc(text: Any) -> str:
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


def page(title: str, marker: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", marker, '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>", *body, "</body></html>", ""])


def kv_table(values: dict[str, Any]) -> str:
    rows = "".join(f'<tr><th>{esc(k)}</th><td{" class=num" if isinstance(v, (int, float)) else ""}>'
                   f"{esc(fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>" if rows else "<p>(no scalar values)</p>"


def _inline(text: str, base: Path) -> str:
    """Markdown inline markup of one escaped-as-we-go line: `code`, **bold**, ![img](src), [link](href)."""
    out, pos = [], 0
    pattern = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)")
    for m in pattern.finditer(text):
        out.append(esc(text[pos:m.start()]))
        code, bold, alt, src, label, target = m.groups()
        if code is not None:
            out.append(f"<code>{esc(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{esc(bold)}</strong>")
        elif src is not None:
            out.append(f'<img src="{esc(src)}" alt="{esc(alt)}">' if _safe_url(src, base) else esc(m.group(0)))
        else:
            out.append(f'<a href="{esc(target)}">{esc(label)}</a>' if _safe_url(target, base) else esc(m.group(0)))
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def _safe_url(url: str, base: Path) -> bool:
    """http(s) links, and relative paths that stay inside the report's folder tree; nothing else (no javascript:)."""
    if re.match(r"^https?://", url):
        return True
    return ":" not in url.split("/")[0] and not url.startswith("/") and ".." not in url.split("/")


def markdown_to_html(text: str, base: Path) -> str:
    """A small Markdown subset: # headings, | tables |, - / 1. lists, ``` fences, paragraphs. Everything escaped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(f"<pre>{esc(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            out.append(f"<h{len(m.group(1)) + 1}>{_inline(m.group(2), base)}</h{len(m.group(1)) + 1}>")
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_md_table(lines[i:j], base))
            i = j
        elif re.match(r"^\s*([-*]|\d+\.)\s+", line):
            j, items = i, []
            while j < len(lines) and re.match(r"^\s*([-*]|\d+\.)\s+", lines[j]):
                items.append(re.sub(r"^\s*([-*]|\d+\.)\s+", "", lines[j]))
                j += 1
            tag = "ol" if re.match(r"^\s*\d+\.", line) else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(t, base)}</li>" for t in items) + f"</{tag}>")
            i = j
        elif line.strip():
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#|```|\s*\||\s*([-*]|\d+\.)\s)",
                                                                       lines[j]):
                j += 1
            j = max(j, i + 1)
            out.append("<p>" + " ".join(_inline(t, base) for t in lines[i:j]) + "</p>")
            i = j
        else:
            i += 1
    return "\n".join(out)


def _md_table(rows: list[str], base: Path) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    body = [r for r in cells if not all(re.fullmatch(r":?-{2,}:?", c) for c in r if c)]
    if not body:
        return ""
    head = "".join(f"<th>{_inline(c, base)}</th>" for c in body[0])
    rest = "".join("<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in r) + "</tr>" for r in body[1:])
    return f"<table><tr>{head}</tr>{rest}</table>"


def fmt(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, None as a dash, long text cut."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"
