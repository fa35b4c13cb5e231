"""Self-contained HTML pieces: base64-embedded PNGs, tables from dicts, relative links, one inline stylesheet.

Nothing refers to the network (no external CSS, scripts or fonts), so a report opens offline and can be
mailed or archived as one file; links to output files are relative to the report's folder.
"""

from __future__ import annotations

import base64
import html
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CSS = """
:root { --fg: #1d2327; --muted: #5f6b73; --line: #d9dee2; --accent: #2b6f3e; --bg: #f6f7f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header, main, footer { max-width: 1100px; margin: 0 auto; padding: 0 16px; }
header { padding-top: 24px; }
h1 { margin: 0 0 4px; font-size: 1.7em; color: var(--accent); }
h2 { margin: 28px 0 8px; font-size: 1.25em; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
.subtitle { color: var(--muted); margin: 0 0 12px; }
.summary { display: flex; flex-wrap: wrap; gap: 10px; margin: 16px 0; }
.kpi { background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--accent); border-radius: 6px;
       padding: 8px 14px; min-width: 150px; }
.kpi .v { font-size: 1.35em; font-weight: 600; }
.kpi .k { color: var(--muted); font-size: 0.85em; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 4px 18px 14px;
          margin: 18px 0; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 14px; }
figure { margin: 8px 0; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #eee; }
figcaption { color: var(--muted); font-size: 0.9em; margin-top: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.92em; display: block; overflow-x: auto; }
caption { text-align: left; color: var(--muted); padding-bottom: 4px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: var(--bg); }
ul.links { padding-left: 20px; }
.missing { color: #b00020; }
footer { color: var(--muted); font-size: 0.85em; padding: 16px; }
@media (max-width: 600px) { body { font-size: 14px; } section { padding: 2px 10px 10px; } }
"""


def esc(text: Any) -> str:
    """HTML-escape ``str(text)``."""
    return html.escape(str(text), quote=True)


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of an image."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def fmt(v: Any) -> str:
    """A table cell: ints with thousands separators, floats with 4 significant digits, None as an em dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2014"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def figure_html(png: bytes, caption: str = "", alt: str = "") -> str:
    """A ``<figure>`` with the PNG embedded as base64 and an optional caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt or caption or "figure")}">{cap}</figure>'


def table_html(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """A table from a mapping (two columns: key, value) or a list of mappings (columns in first-seen order)."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    if isinstance(rows, Mapping):
        body = "".join(f"<tr><th>{esc(k)}</th>{_td(v)}</tr>" for k, v in rows.items())
        return f"<table>{cap}<tbody>{body}</tbody></table>"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(v: Any) -> str:
    num = isinstance(v, int | float) and not isinstance(v, bool)
    return f'<td class="num">{esc(fmt(v))}</td>' if num else f"<td>{esc(fmt(v))}</td>"


def relative_href(path: str | os.PathLike[str], html_dir: str | os.PathLike[str]) -> str:
    """URL-quoted path of ``path`` relative to the report's folder (POSIX separators)."""
    rel = os.path.relpath(Path(path).absolute(), Path(html_dir).absolute())
    return urllib.parse.quote(Path(rel).as_posix())


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} TB"  # pragma: no cover


def links_html(links: Sequence[tuple[str | os.PathLike[str], str, str]], html_dir: str | os.PathLike[str]) -> str:
    """A list of relative links ``(path, label, note)`` with file sizes; missing files are marked."""
    items = []
    for path, label, note in links:
        p = Path(path)
        text = esc(label or p.name)
        extra = f" \u2014 {esc(note)}" if note else ""
        if p.exists():
            kind = "folder, " if p.is_dir() else ""
            items.append(f'<li><a href="{relative_href(p, html_dir)}">{text}</a> '
                         f"<small>({kind}{human_size(_size(p))})</small>{extra}</li>")
        else:
            items.append(f'<li class="missing">{text} (missing: {esc(p)}){extra}</li>')
    return f'<ul class="links">{"".join(items)}</ul>'


def summary_html(summary: Mapping[str, Any]) -> str:
    """The key-numbers box."""
    if not summary:
        return ""
    boxes = "".join(f'<div class="kpi"><div class="v">{esc(fmt(v))}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in summary.items())
    return f'<div class="summary">{boxes}</div>'


def page_html(title: str, body: str, *, subtitle: str = "", summary: Mapping[str, Any] | None = None,
              footer: str = "") -> str:
    """The whole document: inline CSS, header, summary box, ``body`` (sections), footer."""
    sub = f'<p class="subtitle">{esc(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
        f"<header><h1>{esc(title)}</h1>{sub}{summary_html(summary or {})}</header>\n"
        f"<main>{body}</main>\n<footer>{footer}</footer></body></html>\n"
    )
