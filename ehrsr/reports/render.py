"""Text rendering of tables: numbers formatted with their units, Markdown, LaTeX (booktabs), CSV.

Written here rather than with ``DataFrame.to_markdown`` / ``to_latex`` so the report needs no
optional dependency (tabulate, jinja2) and the LaTeX is exactly the booktabs form papers use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ehrsr.study_schema import COST_TABLE_ORDER, DASH, Objective, format_metric, metric_header

__all__ = [
    "controlled_rows",
    "controlled_summary",
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


def _cell(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _delta_with_interval(key: str, row: Any) -> str:
    """``mean [low, high]`` of a quality delta; ``[n/a]`` when there is no interval (fewer than
    two paired units)."""
    mean = _cell(row.get(f"delta_{key}_mean"))
    if mean is None:
        return DASH
    low, high = _cell(row.get(f"delta_{key}_low")), _cell(row.get(f"delta_{key}_high"))
    if low is None or high is None:
        return f"{format_metric(key, mean, signed=True)} [n/a]"
    return (f"{format_metric(key, mean, signed=True)} "
            f"[{format_metric(key, low, signed=True)}, {format_metric(key, high, signed=True)}]")


def controlled_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the controlled table.

    The reference row gives absolute values (mean ± std over seeds); every other row gives the
    change against its comparison (``vs``): quality as the mean paired delta with its 95 %
    interval over (seed, image) pairs (pigeonhole bootstrap, ``ehrsr.ablation.table``), the
    verdict on PSNR, and cost as the difference of means. LPIPS is left out when no run
    measured it.
    """
    quality = ["psnr", "ssim"]
    if "lpips_mean" in table and table["lpips_mean"].notna().any():
        quality.append("lpips")
    costs = list(COST_TABLE_ORDER)
    headers = ["variant", "vs", "seeds"]
    headers += [f"Δ {metric_header(k)} [95% CI]" for k in quality]
    headers.append("verdict")
    headers += [f"Δ{metric_header(k)}" for k in costs]
    headers.append("note")
    rows = []
    for _, r in table.iterrows():
        if r["kind"] == "reference":
            cells = [r["variant"], DASH, str(int(r["n_complete"]))]
            cells += [format_metric(k, r[f"{k}_mean"], std=r[f"{k}_std"]) for k in quality]
            cells.append(DASH)
            cells += [format_metric(k, r[f"{k}_mean"]) for k in costs]
        else:
            cells = [r["variant"], str(r["vs"]), str(int(r["n_paired"]))]
            cells += [_delta_with_interval(k, r) for k in quality]
            cells.append(str(r.get("verdict") or "n/a") if _cell(r.get("verdict")) is not None else "n/a")
            cells += [format_metric(k, r[f"delta_{k}_mean"], signed=True) for k in costs]
        note = r.get("note")
        cells.append("" if note is None or (isinstance(note, float) and math.isnan(note)) else str(note))
        rows.append(cells)
    return headers, rows


def controlled_summary(table: pd.DataFrame) -> str:
    """Which modules help, hurt or are undecided (PSNR verdicts), and the run's minimum
    detectable effect, in two sentences for report.md.

    A module's evidence is its leave-one-out row (``-m`` hurting means m helps) and its
    add-one-in row (``+m`` helping means m helps); rows that disagree make it "mixed".
    """
    flip = {"helps": "hurts", "hurts": "helps"}
    evidence: dict[str, set[str]] = {}
    for _, r in table.iterrows():
        module, said = _cell(r.get("module")), _cell(r.get("verdict"))
        if module is None or said in (None, "n/a") or r["kind"] not in ("leave-one-out", "add-one-in"):
            continue
        effect = flip.get(said, said) if r["kind"] == "leave-one-out" else said
        evidence.setdefault(str(module), set()).add("undecided" if effect not in ("helps", "hurts") else effect)
    groups: dict[str, list[str]] = {"help": [], "hurt": [], "mixed": [], "undecided": []}
    for module, effects in sorted(evidence.items()):
        decided = effects - {"undecided"}
        if decided == {"helps"}:
            groups["help"].append(module)
        elif decided == {"hurts"}:
            groups["hurt"].append(module)
        elif decided:
            groups["mixed"].append(module)
        else:
            groups["undecided"].append(module)

    def names(group: str) -> str:
        return ", ".join(groups[group]) or "none"

    text = (f"Modules that help PSNR: {names('help')}; that hurt: {names('hurt')}; "
            f"no detectable effect at this fidelity: {names('undecided')}")
    if groups["mixed"]:
        text += f"; leave-one-out and add-one-in disagree: {names('mixed')}"
    text += "."
    mde = [float(v) for v in table.get("mde_psnr", pd.Series(dtype=float)) if _cell(v) is not None]
    # a comparison of identical runs (the baseline when the reference has no module) has MDE 0:
    # it says nothing about the run's resolution, so it stays out of the median when others vary
    mde = [v for v in mde if v > 0] or mde
    if mde:
        text += (f" Minimum detectable PSNR effect of this run (alpha 0.05, power 0.8, over the paired units: "
                 f"validation images and seeds, or seeds for runs stored without per-image values; "
                 f"docs/statistics.md): median {np.median(mde):.3f} dB over the comparisons "
                 f"(range {min(mde):.3f}–{max(mde):.3f} dB); smaller true effects are reported as "
                 "no detectable effect.")
    else:
        text += " No minimum detectable effect: fewer than two paired units per comparison."
    cut = int(table["n_cut_short"].sum()) if "n_cut_short" in table else 0
    if cut:
        text += f" {cut} run(s) were cut short by the ablation budget and are left out of the deltas."
    return text
