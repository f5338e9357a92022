"""The report's static HTML page, rendered from DIR/summary.json and the files it names: a one-screen summary
(each lens' headline numbers and first figure), then a section per lens with its figures (PNG, each linking to its
vector PDF), tables and steering result, or its error. Relative links, no script, no network."""

from __future__ import annotations

import html
import json
import struct
from pathlib import Path

SUMMARY = "summary.json"

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 10px} .card h3{margin:0 0 4px;font-size:1em}
.card img{width:100%;max-height:240px;object-fit:contain} .err{color:#b00020}
pre{white-space:pre-wrap;background:#fff4f4;padding:8px}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{padding:1px 8px;border-bottom:1px solid #eee;
text-align:left} .figs img{max-width:100%;vertical-align:top;margin:2px} .muted{color:#666;font-size:.9em}
.scroll{overflow-x:auto}"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _headline(section: dict, rows: int | None = None) -> str:
    items = list(section["headline"].items())
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in items[:rows])
    more = f'<p class="muted">{len(items) - rows} more in the section</p>' if rows and len(items) > rows else ""
    return f"<table>{body}</table>{more}" if body else ""


def _figure(png: str, root: Path | None = None) -> str:
    """A figure linking to its PDF; with `root`, shown at its printed size (so that every figure's text reads at
    the same size on the page, a double-column figure twice as wide as a single-column one)."""
    pdf = Path(png).with_suffix(".pdf").as_posix()
    size = f' style="width:{_css_width(root / png)}px"' if root is not None and (root / png).is_file() else ""
    return (f'<a href="{html.escape(pdf)}"><img src="{html.escape(png)}"{size} '
            f'alt="{html.escape(Path(png).stem)}"></a>')


def _css_width(png: Path) -> int:
    """CSS pixels (96 per inch) of a PNG saved at the paper style's dpi: its printed width."""
    from interp.plotting import STYLE

    width = struct.unpack(">I", png.read_bytes()[16:20])[0]  # the IHDR chunk: width, then height
    return round(width / STYLE["savefig.dpi"] * 96)


def _table(root: Path, caption: str, csv: str, rows: int = 12) -> str:
    import pandas as pd

    frame = pd.read_csv(root / csv)
    more = f" (first {rows} of {len(frame)} rows)" if len(frame) > rows else ""
    body = frame.head(rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    return (f'<p class="muted">{html.escape(caption)}{more}: <a href="{html.escape(csv)}">{html.escape(csv)}</a></p>'
            f'<div class="scroll">{body}</div>')


def _card(section: dict, part: str = "") -> str:
    """A section's summary card; `part`: the folder of a report part (its paths are relative to it)."""
    body = (f'<p class="err">{html.escape(section["error"])}</p>' if section["error"] else
            _headline(section, rows=6) + (_figure(f"{part}{section['figures'][0]}") if section["figures"] else ""))
    link = f'{part}index.html#{section["name"]}' if part else f'#{section["name"]}'
    return f'<div class="card"><h3><a href="{link}">{html.escape(section["title"])}</a></h3>{body}</div>'


def _part(root: Path, part: dict) -> str:
    """A report part (a report of its own in a sub-folder): its title, a link to its page and its cards."""
    summary = json.loads((root / part["folder"] / SUMMARY).read_text())
    folder = f'{part["folder"]}/'
    models = ", ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in summary["tuned"].items())
    return (f'<h2 id="part-{html.escape(part["folder"])}">{html.escape(part["title"])}</h2>'
            f'<p>{html.escape(summary["base"])} vs {models}; every figure and table on '
            f'<a href="{html.escape(folder)}index.html">its own page</a>.</p>'
            f'<div class="cards">{"".join(_card(s, folder) for s in summary["sections"])}</div>')


def _section(root: Path, section: dict) -> str:
    parts = [f'<h2 id="{section["name"]}">{html.escape(section["title"])}</h2>']
    if section["error"]:
        parts.append(f'<p class="err">This analysis did not run.</p><pre>{html.escape(section["error"])}</pre>')
        return "\n".join(parts)
    if section["notes"]:
        parts.append(f"<p>{html.escape(section['notes'])}</p>")
    parts.append(_headline(section))
    if section["steering"]:
        parts.append(f"<p><b>Steering.</b> {html.escape(section['steering'])}</p>")
    parts.append('<div class="figs">' + " ".join(_figure(f, root) for f in section["figures"]) + "</div>")
    parts += [_table(root, caption, csv) for caption, csv in section["tables"].items()]
    if section["seconds"] is not None:
        parts.append(f'<p class="muted">{section["seconds"]:.0f} s</p>')
    return "\n".join(parts)


def render(folder: str | Path, summary_file: Path | None = None, page_file: Path | None = None) -> Path:
    """Write DIR/index.html (or `page_file`) from DIR/summary.json (or `summary_file`) and the files it names."""
    root = Path(folder)
    summary = json.loads((summary_file or root / SUMMARY).read_text())
    running = "" if summary.get("complete", True) else (
        '<p class="err">This report is incomplete: the run is still going, or it stopped after the sections '
        'below.</p>')
    models = ", ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in summary["tuned"].items())
    sets = ", ".join(f"{html.escape(k)} ({n})" for k, n in summary["prompt_sets"].items())
    sections = summary["sections"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>interp report</title><style>{CSS}</style></head><body>
<h1>What fine-tuning changed: {html.escape(summary["base"])} vs {models}</h1>
<p class="muted">Prompt sets: {sets}.{" Quick run (small settings)." if summary["quick"] else ""}
Every figure links to its PDF; every number is in summary.json and each analysis' folder.</p>
{running}
<div class="cards">{"".join(_card(s) for s in sections)}</div>
{"".join(_section(root, s) for s in sections)}
{"".join(_part(root, p) for p in summary.get("parts", []))}
</body></html>
"""
    target = page_file or root / "index.html"
    target.write_text(page, encoding="utf-8")
    return target
