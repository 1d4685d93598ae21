"""Text rendering of tables: numbers formatted with their units, Markdown, LaTeX (booktabs), CSV.

Written here rather than with ``DataFrame.to_markdown`` / ``to_latex`` so the report needs no
optional dependency (tabulate, jinja2) and the LaTeX is exactly the booktabs form papers use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ehrsr.study_schema import COST_TABLE_ORDER, DASH, Objective, format_metric, metric_header

__all__ = [
    "controlled_rows",
    "format_metric",
    "latex_table",
    "markdown_table",
    "observational_rows",
    "write_table",
]

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_text(value: Any) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(value))
    # symbols written as Unicode in the Markdown become math in LaTeX
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(DASH, "--").replace("−", "-")


def latex_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str, label: str) -> str:
    """A ``table`` environment with a booktabs ``tabular`` (\\toprule, \\midrule, \\bottomrule);
    first column left-aligned, the others right-aligned. Needs ``\\usepackage{booktabs}``."""
    spec = "l" + "r" * (len(headers) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_text(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_text(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_text(v) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(
    table: pd.DataFrame,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    path_stem: Path,
    *,
    caption: str,
    label: str,
) -> list[Path]:
    """``path_stem.csv`` (the full numeric table), ``.md`` and ``.tex`` (the formatted one)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = path_stem.with_suffix(".csv")
    md_path = path_stem.with_suffix(".md")
    tex_path = path_stem.with_suffix(".tex")
    table.to_csv(csv_path, index=False)
    md_path.write_text(f"{caption}\n\n" + markdown_table(headers, rows))
    tex_path.write_text(latex_table(headers, rows, caption, label))
    return [csv_path, md_path, tex_path]


# ---------------------------------------------------------------------------------------------
# the two ablation tables as text


def observational_rows(
    table: pd.DataFrame, objectives: Sequence[Objective]
) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the observational table (one row per module and objective)."""
    headers = ["module", "objective", "n on", "best on", "median on", "n off", "best off", "median off"]
    rows = []
    for _, r in table.iterrows():
        key = r["metric"]
        rows.append(
            [
                r["module"],
                metric_header(key),
                str(int(r["n_on"])),
                format_metric(key, r["best_on"]),
                format_metric(key, r["median_on"]),
                str(int(r["n_off"])),
                format_metric(key, r["best_off"]),
                format_metric(key, r["median_off"]),
            ]
        )
    return headers, rows


def controlled_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the controlled table.

    The reference row gives absolute values (mean ± std over seeds); every other row gives the
    change against its comparison (``vs``): quality as mean ± std of the per-seed differences,
    cost as the difference of means. LPIPS is left out when no run measured it.
    """
    quality = ["psnr", "ssim"]
    if "lpips_mean" in table and table["lpips_mean"].notna().any():
        quality.append("lpips")
    costs = list(COST_TABLE_ORDER)
    headers = ["variant", "vs", "seeds"]
    headers += [f"Δ{metric_header(k)}" for k in quality]
    headers += [f"Δ{metric_header(k)}" for k in costs]
    headers.append("note")
    rows = []
    for _, r in table.iterrows():
        if r["kind"] == "reference":
            cells = [r["variant"], DASH, str(int(r["n_complete"]))]
            cells += [format_metric(k, r[f"{k}_mean"], std=r[f"{k}_std"]) for k in quality]
            cells += [format_metric(k, r[f"{k}_mean"]) for k in costs]
        else:
            cells = [r["variant"], str(r["vs"]), str(int(r["n_paired"]))]
            cells += [
                format_metric(k, r[f"delta_{k}_mean"], signed=True, std=r[f"delta_{k}_std"]) for k in quality
            ]
            cells += [format_metric(k, r[f"delta_{k}_mean"], signed=True) for k in costs]
        note = r.get("note")
        cells.append("" if note is None or (isinstance(note, float) and math.isnan(note)) else str(note))
        rows.append(cells)
    return headers, rows
