"""``report.html``: report.md as one self-contained, interactive page.

The page is report.md itself, converted block by block (``markdown_to_html``: the subset of
Markdown the report writes: headings, paragraphs, bullet lists, tables, fenced code, block
quotes, bold, code spans, links, images), so every section, sentence and number of the Markdown
is in it, whatever a section says. Three things change on the way:

* each figure whose PNG the Markdown links is replaced by its interactive twin (plotly, from the
  same plot data: ``ehrsr.reports.interactive``); a PNG without a twin is embedded as data;
* figures with no PNG (the controlled ablation's intervals as error bars) are put into their
  section before its first table;
* every table can be sorted by clicking a column header (numbers with K/M/G suffixes, ``#12``
  trial references and ``27.1 ± 0.1`` cells sort by their value, dashes last).

plotly's JavaScript is embedded once (about 4.8 MB), so the page needs no network access and no
file beside it; it works from a file:// URL. Nothing here reads the storage.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

__all__ = ["HtmlFigure", "markdown_to_html", "section_id", "write_html_report"]


@dataclass(frozen=True)
class HtmlFigure:
    """An interactive figure for the page: replaces the Markdown image ``png`` (a path relative to
    the report's folder), or, without one, goes into the section headed ``section`` before its
    first table. ``kind`` becomes a CSS class ("pareto" figures get the click-for-details panel)."""

    figure: go.Figure = field(repr=False)
    kind: str
    png: str | None = None
    section: str | None = None


def section_id(heading: str) -> str:
    """The anchor of a section: 'Pareto front' -> 'pareto-front'."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"


# ---------------------------------------------------------------------------------------------
# Markdown (the subset report.md is written in)

_CODE_SPAN = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _inline(text: str) -> str:
    """Inline Markdown to HTML: code spans (verbatim), links, bold (also around code spans);
    everything else escaped."""
    spans: list[str] = []

    def hold(match: re.Match[str]) -> str:
        spans.append(f"<code>{html.escape(match[1])}</code>")
        return f"\x00{len(spans) - 1}\x00"

    out = html.escape(_CODE_SPAN.sub(hold, text), quote=False)
    out = _LINK.sub(lambda m: f'<a href="{html.escape(m[2], quote=True)}">{m[1]}</a>', out)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    return re.sub("\x00(\\d+)\x00", lambda m: spans[int(m[1])], out)


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(inner)]


def _table(lines: Sequence[str]) -> str:
    headers = _cells(lines[0])
    separator = len(lines) > 1 and re.fullmatch(r"[\s|:-]*-[\s|:-]*", lines[1]) is not None
    body = [_cells(line) for line in lines[2 if separator else 1 :]]
    head = "".join(f'<th scope="col">{_inline(h)}</th>' for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """Split Markdown into (kind, lines) blocks: h1/h2/h3, table, list, code, quote, image, paragraph."""
    blocks: list[tuple[str, list[str]]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
            continue
        if stripped.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append(("code", lines[i + 1 : j]))
            i = j + 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            blocks.append((f"h{min(len(heading[1]), 3)}", [heading[2].strip()]))
            i += 1
            continue
        if _IMAGE_LINE.match(stripped):
            blocks.append(("image", [stripped]))
            i += 1
            continue
        for kind, starts in (("table", ("|",)), ("list", ("- ", "* ")), ("quote", (">",))):
            if stripped.startswith(starts):
                j = i
                while j < len(lines) and lines[j].strip() and (
                    lines[j].strip().startswith(starts) or (kind == "list" and lines[j].startswith("  "))
                ):
                    j += 1
                blocks.append((kind, lines[i:j]))
                i = j
                break
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#{1,6}\s|```|\||- |\* |>|!\[)",
                                                                       lines[j].strip()):
                j += 1
            blocks.append(("paragraph", lines[i : max(j, i + 1)]))
            i = max(j, i + 1)
    return blocks


def _list(lines: Sequence[str]) -> str:
    items: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(("- ", "* ")) and not line.startswith("  "):
            items.append(stripped[2:])
        elif items:
            items[-1] += " " + stripped
    return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>"


def markdown_to_html(markdown: str, image: Mapping[str, str] | None = None) -> str:
    """HTML of ``markdown`` (report.md's subset, see the module docstring), without sections;
    ``image`` maps an image path to the HTML that stands for it (else an ``<img>``)."""
    return "".join(_block_html(kind, lines, image or {}) for kind, lines in _blocks(markdown))


def _block_html(kind: str, lines: list[str], image: Mapping[str, str]) -> str:
    if kind in ("h1", "h2", "h3"):
        return f'<{kind} id="{section_id(lines[0])}">{_inline(lines[0])}</{kind}>'
    if kind == "table":
        return _table(lines)
    if kind == "list":
        return _list(lines)
    if kind == "code":
        return f"<pre><code>{html.escape(chr(10).join(lines))}</code></pre>"
    if kind == "quote":
        text = " ".join(line.strip().lstrip(">").strip() for line in lines)
        return f"<blockquote><p>{_inline(text)}</p></blockquote>"
    if kind == "image":
        match = _IMAGE_LINE.match(lines[0])
        assert match is not None
        alt, path = match[1], match[2]
        if path in image:
            return image[path]
        return f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}"></figure>'
    return f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>"


# ---------------------------------------------------------------------------------------------
# the page


def _figure_html(item: HtmlFigure, div_id: str) -> str:
    plot = pio.to_html(
        item.figure, include_plotlyjs=False, full_html=False, div_id=div_id, default_width="100%",
        config={"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "svg"}},
    )
    details = ""
    if item.kind == "pareto":
        details = (f'<div class="point-details" id="{div_id}-details" aria-live="polite">Hover over a point for '
                   "its trial; click it to keep its details and the command that trains it here.</div>")
    return f'<figure class="figure {html.escape(item.kind)}" data-figure="{div_id}">{plot}{details}</figure>'


def _embedded_png(root: Path, path: str) -> str | None:
    file = root / path
    if not file.is_file():
        return None
    data = base64.b64encode(file.read_bytes()).decode("ascii")
    return f'<figure class="figure"><img src="data:image/png;base64,{data}" alt="{html.escape(path)}"></figure>'


def _group_figures(parts: list[str]) -> list[str]:
    """Consecutive figures side by side in a grid."""
    out: list[str] = []
    run: list[str] = []
    for part in [*parts, ""]:
        if part.startswith("<figure"):
            run.append(part)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else '<div class="figure-grid">' + "".join(run) + "</div>")
            run = []
        if part:
            out.append(part)
    return out


def write_html_report(markdown: str, figures: Sequence[HtmlFigure], path: Path, *, note: str = "") -> Path:
    """Write ``path`` (report.html) from report.md's text and the interactive figures.

    ``note`` is a sentence put under the title (what is measured and what predicted). Image paths
    in ``markdown`` are relative to ``path``'s folder; an image with no interactive twin is
    embedded from its PNG, so the page stays one file.
    """
    path = Path(path)
    root = path.parent
    replacements: dict[str, str] = {}
    by_section: dict[str, list[str]] = {}
    for index, item in enumerate(figures):
        div = _figure_html(item, f"figure-{index}-{section_id(item.png or item.section or item.kind)}")
        if item.png is not None:
            replacements[item.png] = div
        else:
            by_section.setdefault(item.section or "", []).append(div)
    for _, lines in (b for b in _blocks(markdown) if b[0] == "image"):
        target = _IMAGE_LINE.match(lines[0])
        if target and target[2] not in replacements:
            embedded = _embedded_png(root, target[2])
            if embedded is not None:
                replacements[target[2]] = embedded

    title = "Search report"
    head: list[str] = []
    sections: list[tuple[str, list[str]]] = []  # (heading, html parts)
    for kind, lines in _blocks(markdown):
        if kind == "h1":
            title = lines[0]
            continue
        if kind == "h2":
            sections.append((lines[0], []))
            continue
        part = _block_html(kind, lines, replacements)
        (sections[-1][1] if sections else head).append(part)
    body: list[str] = []
    for heading, parts in sections:
        extra = by_section.pop(heading, [])
        if extra:
            first_table = next((i for i, p in enumerate(parts) if p.startswith('<div class="table-wrap">')), len(parts))
            parts[first_table:first_table] = extra
        body.append(
            f'<section id="{section_id(heading)}"><h2>{_inline(heading)}</h2>'
            + "".join(_group_figures(parts)) + "</section>"
        )
    for heading, extra in by_section.items():  # a figure for a section the Markdown does not have
        body.append(f'<section id="{section_id(heading)}"><h2>{_inline(heading)}</h2>{"".join(extra)}</section>')
    nav = "".join(f'<li><a href="#{section_id(h)}">{_inline(h)}</a></li>' for h, _ in sections)
    page = _PAGE.format(
        title=html.escape(title),
        title_html=_inline(title),
        head="".join(head),
        note=f'<p class="note">{html.escape(note)}</p>' if note else "",
        nav=nav,
        body="".join(body),
        style=_STYLE,
        plotly=get_plotlyjs(),
        script=_SCRIPT,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
<script type="text/javascript">{plotly}</script>
</head>
<body>
<header>
<h1>{title_html}</h1>
{head}
{note}
<p class="how">Hover over a point of a figure for its trial; click a trial to keep its details below the
figure. Click a column header to sort a table (again to reverse).</p>
<nav><ul>{nav}</ul></nav>
</header>
<main>
{body}
</main>
<script type="text/javascript">{script}</script>
</body>
</html>
"""

_STYLE = """
body { box-sizing: border-box; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45; color: #1b1b1b;
       max-width: 1280px; margin: 0 auto; padding: 0 1.2rem 3rem; }
h1 { margin-top: 1.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; }
nav ul { display: flex; flex-wrap: wrap; gap: .3rem 1rem; padding: 0; list-style: none; }
.note { background: #f1f6fb; border-left: 4px solid #1f77b4; padding: .4rem .7rem; }
.how { color: #555; font-size: .92em; }
.table-wrap { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .88em; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: .75em; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: .75em; }
tbody tr:nth-child(even) { background: #fafafa; }
.figure { margin: .6rem 0; min-width: 0; }
.figure-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: .8rem; }
.point-details { font-size: .85em; color: #333; background: #fafafa; border: 1px dashed #ccc; padding: .35rem .6rem;
                 min-height: 2.2em; }
blockquote { border-left: 4px solid #ccc; margin-left: 0; padding-left: .8rem; color: #444; }
"""

# sortable tables and the click-for-details panel of the Pareto figures (no library, no network)
_SCRIPT = r"""
(function () {
  "use strict";
  var SI = {K: 1e3, k: 1e3, M: 1e6, G: 1e9, T: 1e12};
  var NUMBER = /^#?([+\-\u2212]?\d+(?:\.\d+)?(?:[eE][+\-]?\d+)?)([kKMGT])?(?=$|\s|\(|\[|,|%)/;
  function sortKey(text) {
    var t = text.trim();
    var m = NUMBER.exec(t);
    if (!m) return null;
    return parseFloat(m[1].replace("\u2212", "-")) * (m[2] ? SI[m[2]] : 1);
  }
  function isBlank(text) { var t = text.trim(); return t === "" || t === "\u2014" || t === "n/a"; }
  function sortTable(table, column, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = th.getAttribute("aria-sort") === "ascending";
    var texts = rows.map(function (r) { return r.cells[column] ? r.cells[column].textContent : ""; });
    var numeric = texts.every(function (t) { return isBlank(t) || sortKey(t) !== null; });
    var order = rows.map(function (row, i) { return i; });
    order.sort(function (a, b) {
      var x = texts[a], y = texts[b];
      if (isBlank(x) !== isBlank(y)) return isBlank(x) ? 1 : -1;
      var c = numeric && !isBlank(x) ? sortKey(x) - sortKey(y)
                                     : x.localeCompare(y, undefined, {numeric: true, sensitivity: "base"});
      if (descending) c = -c;
      return c !== 0 ? c : a - b;
    });
    order.forEach(function (i) { body.appendChild(rows[i]); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortTable(table, column, th); });
    });
  });
  window.addEventListener("load", function () {
    Array.prototype.forEach.call(document.querySelectorAll("figure.pareto"), function (figure) {
      var id = figure.getAttribute("data-figure");
      var plot = document.getElementById(id);
      var panel = document.getElementById(id + "-details");
      if (!plot || !panel || typeof plot.on !== "function") return;
      plot.on("plotly_click", function (event) {
        var point = event.points && event.points[0];
        if (point && typeof point.customdata === "number" && point.text) panel.innerHTML = point.text;
      });
    });
  });
})();
"""
