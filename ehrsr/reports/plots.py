"""Figures: quality against each cost (Pareto plots) and parameter importance.

Built the Optuna way: a pure function computes a small ``NamedTuple`` of what is drawn
(``pareto_plot_data``, ``importance_plot_data``) and a renderer draws it (``render_pareto_plot``,
``render_importance_plot``); tests check the data. Rendering uses matplotlib's object API with the
Agg canvas (``matplotlib.figure.Figure``), never ``pyplot``, so importing the reports does not
change the caller's matplotlib backend and works on machines without a display.

What a Pareto plot shows (one quality metric against one cost metric):

* the 2-D front of that pair over the finished feasible trials, as a step line (the best quality
  reachable at each cost);
* trials on the study's own Pareto front (``study.best_trials``, over all its objectives) as solid
  markers, every other finished feasible trial faint;
* finished trials that violate a constraint as red x markers;
* reference configurations (``conv-only``, ``all-modules``) labelled by name;
* the knee of the study's front (the controlled ablation's default reference) as a star;
* hand-designed baselines trained with the study's protocol (``<study>-baselines``) as labelled
  green triangles; one below the trivial answer (bicubic) says so in its label.

Point labels are placed by ``place_labels`` so that none overlaps another or a marker (two
reference configurations at nearly the same cost and quality get labels on different sides), and
log axes get ticks at 1-2-5 or 1-2-3-5-7 per decade (``log_ticks``), enough to read a value off.
The interactive report (``ehrsr.reports.interactive``) draws the same data with the same two
helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from ehrsr.reports.baselines import BaselineRun
from ehrsr.search.pareto import pareto_front
from ehrsr.study_schema import STUDY, StudyInfo, finite, format_si, is_count, metric_info

__all__ = [
    "ImportancePlotData",
    "LabelPlacement",
    "ParetoPlotData",
    "PlotPoint",
    "axis_tick_text",
    "importance_plot_data",
    "log_ticks",
    "pareto_figure",
    "pareto_plot_data",
    "place_labels",
    "render_importance_plot",
    "render_pareto_plot",
]

FORMATS: tuple[str, ...] = ("png", "svg")  # PNG for the report, SVG for papers


class PlotPoint(NamedTuple):
    number: int  # trial number
    x: float  # cost
    y: float  # quality


class ParetoPlotData(NamedTuple):
    quality_key: str  # metric key on the y axis
    cost_key: str  # metric key on the x axis
    x_label: str
    y_label: str
    title: str
    front_line: list[PlotPoint]  # the 2-D front of this pair, ordered by cost (the step line)
    study_front: list[PlotPoint]  # on the study's Pareto front (solid)
    dominated: list[PlotPoint]  # other finished feasible trials (faint)
    infeasible: list[PlotPoint]  # finished trials violating a constraint (x markers)
    references: list[tuple[PlotPoint, str]]  # labelled reference configurations
    knee: PlotPoint | None  # the study's knee (default reference of the controlled ablation)
    x_log: bool  # log x axis when the cost spans more than a decade
    baseline: tuple[str, float] | None = None  # e.g. ("bicubic", 29.38): quality of the trivial answer
    baselines: tuple[tuple[PlotPoint, str], ...] = ()  # hand-designed baselines (number: in <study>-baselines)


def pareto_plot_data(
    trials: pd.DataFrame,
    info: StudyInfo,
    quality_key: str,
    cost_key: str,
    study_front_numbers: Sequence[int],
    knee_number: int | None = None,
    baselines: Sequence[BaselineRun] = (),
) -> ParetoPlotData | None:
    """What the ``quality_key`` vs ``cost_key`` plot draws; None when no finished trial has both.

    ``trials`` is ``trials_table(study)``; ``study_front_numbers`` the numbers of
    ``study.best_trials``; ``knee_number`` the knee trial (``knee_trial``), marked when given;
    ``baselines``: ``baseline_runs(study)``, the complete ones with both metrics are drawn.
    """
    if quality_key not in trials or cost_key not in trials:
        return None
    done = trials[trials["state"] == "COMPLETE"]
    x = pd.to_numeric(done[cost_key], errors="coerce")
    y = pd.to_numeric(done[quality_key], errors="coerce")
    usable = done[np.isfinite(x) & np.isfinite(y)]
    if usable.empty:
        return None

    def point(row: pd.Series) -> PlotPoint:
        return PlotPoint(int(row["number"]), float(row[cost_key]), float(row[quality_key]))

    feasible = usable[usable["feasible"].astype(bool)]
    infeasible = usable[~usable["feasible"].astype(bool)]
    quality = metric_info(quality_key)
    front_line: list[PlotPoint] = []
    if not feasible.empty:
        values = feasible[[cost_key, quality_key]].to_numpy(dtype=float)
        directions = ["minimize", quality.direction]
        front_rows = feasible.iloc[pareto_front(values, directions)]
        front_line = sorted((point(r) for _, r in front_rows.iterrows()), key=lambda p: (p.x, p.number))
    study_front = set(int(n) for n in study_front_numbers)
    on_front = [point(r) for _, r in feasible.iterrows() if int(r["number"]) in study_front]
    dominated = [point(r) for _, r in feasible.iterrows() if int(r["number"]) not in study_front]
    references = [
        (point(r), str(r["reference"]))
        for _, r in usable.iterrows()
        if isinstance(r.get("reference"), str) and r["reference"]
    ]
    costs = np.concatenate([usable[cost_key].to_numpy(dtype=float),
                            [float(r.metrics[cost_key]) for r in baselines if finite(r.metrics.get(cost_key))]])
    positive = costs[costs > 0]
    x_log = bool(positive.size == costs.size and positive.size > 1 and positive.max() / positive.min() > 10)
    cost = metric_info(cost_key)
    return ParetoPlotData(
        quality_key=quality_key,
        cost_key=cost_key,
        x_label=info.axis_label(cost_key),
        y_label=info.axis_label(quality_key),
        title=f"{info.name}: {quality.label} vs {cost.label}",
        front_line=front_line,
        study_front=on_front,
        dominated=dominated,
        infeasible=[point(r) for _, r in infeasible.iterrows()],
        references=references,
        knee=next((p for p in on_front if p.number == knee_number), None),
        x_log=x_log,
        baseline=_baseline(info, quality_key),
        baselines=tuple(
            (PlotPoint(run.number, float(run.metrics[cost_key]), float(run.metrics[quality_key])), run.plot_label)
            for run in baselines
            if run.status == "complete" and finite(run.metrics.get(cost_key)) and finite(run.metrics.get(quality_key))
        ),
    )


def _baseline(info: StudyInfo, quality_key: str) -> tuple[str, float] | None:
    """The study's stored baseline quality (bicubic upsampling, or the degraded input) for a metric."""
    baseline = info.attrs.get(STUDY.baseline) or {}
    value = baseline.get(quality_key)
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        return None
    return str(baseline.get("name", "baseline")), float(value)


def _save(fig: Figure, path_stem: Path, formats: Sequence[str]) -> list[Path]:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = path_stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# readable axes and labels (shared with the interactive report)

# ticks per decade, sparsest first: the first set that puts at least MIN_LOG_TICKS ticks on the axis
# wins (matplotlib's default log locator labels only the decades, or 1-2-5: "50, 100, 200" alone)
_LOG_SUBS: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0),
                                            (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))
MIN_LOG_TICKS = 4


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis from ``low`` to ``high`` (both > 0): decades, else 1-2-5, else
    1-2-3-5-7, else every integer multiple per decade, the first giving ``MIN_LOG_TICKS`` ticks.
    An axis that spans a decade always gets at least five with 1-2-3-5-7."""
    if not (0 < low < high and math.isfinite(high)):
        return []
    ticks: list[float] = []
    for subs in _LOG_SUBS:
        ticks = [
            float(f"{m * 10.0 ** e:.12g}")  # 3e-05 rather than 3.0000000000000004e-05
            for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in subs
            if low * (1 - 1e-9) <= m * 10.0**e <= high * (1 + 1e-9)
        ]
        if len(ticks) >= MIN_LOG_TICKS:
            break
    return ticks


def axis_tick_text(key: str, value: float) -> str:
    """A tick label: counts (MACs, parameters) as 1.2M, other values as plain numbers (50, 0.2)."""
    return format_si(value) if is_count(key) else f"{value:g}"


class LabelPlacement(NamedTuple):
    """Where a point's label goes, in pixels from the point (y up): the label's corner nearest the
    point sits at (dx, dy); ``ha``/``va`` say which corner ("left"/"right", "bottom"/"top")."""

    dx: float
    dy: float
    ha: str
    va: str
    leader: bool  # moved away from its point: draw a thin line to it


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    bounds: tuple[float, float, float, float],
    obstacles: Sequence[tuple[float, float]] = (),
    *,
    gap: float = 5.0,
    marker_radius: float = 5.0,
) -> list[LabelPlacement]:
    """Place one label per anchor point (pixels, y up), each of ``sizes[i]`` = (width, height),
    greedily in the given order: the first of the four corners around the point (right-above,
    right-below, left-above, left-below), then the same corners stacked one or more label heights
    further out, that overlaps no label placed before, no marker (``anchors`` and ``obstacles``,
    squares of ``marker_radius``) and stays inside ``bounds`` (x0, y0, x1, y1). When every
    candidate collides, the one with the least overlap wins."""
    markers = [(x - marker_radius, y - marker_radius, x + marker_radius, y + marker_radius)
               for x, y in (*anchors, *obstacles)]
    placed: list[tuple[float, float, float, float]] = []
    out: list[LabelPlacement] = []
    for (x, y), (width, height) in zip(anchors, sizes):
        best: tuple[float, LabelPlacement, tuple[float, float, float, float]] | None = None
        for level in range(5):
            lift = level * (height + 2.0)
            for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                dx, dy = sx * gap, sy * (gap + lift)
                x0 = x + dx if sx > 0 else x + dx - width
                y0 = y + dy if sy > 0 else y + dy - height
                box = (x0, y0, x0 + width, y0 + height)
                inside = _overlap(box, bounds)
                cost = 10.0 * sum(_overlap(box, p) for p in placed)
                cost += sum(_overlap(box, m) for m in markers)
                cost += 5.0 * (width * height - inside)
                candidate = LabelPlacement(dx, dy, "left" if sx > 0 else "right", "bottom" if sy > 0 else "top",
                                           leader=level > 0)
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, candidate, box)
            if best is not None and best[0] == 0.0:
                break
        assert best is not None
        out.append(best[1])
        placed.append(best[2])
    return out


def _annotate_without_overlap(fig: Figure, ax, labels: Sequence[tuple[float, float, str, dict]],
                              obstacles: Sequence[tuple[float, float]]) -> None:
    """Annotate ``labels`` ((x, y, text, text style) in data coordinates) where ``place_labels``
    puts them, measured with the Agg renderer at the figure's final axis limits."""
    if not labels:
        return
    renderer = FigureCanvasAgg(fig).get_renderer()
    to_px = ax.transData.transform
    points_per_px = 72.0 / fig.dpi
    sizes = []
    for _, _, text, style in labels:
        probe = fig.text(0, 0, text, **style)  # figure coordinates: a log axis has no 0
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    anchors = [tuple(to_px((x, y))) for x, y, _, _ in labels]
    others = [tuple(to_px(p)) for p in obstacles]
    box = ax.get_window_extent(renderer)
    placements = place_labels(anchors, sizes, (box.x0, box.y0, box.x1, box.y1), others,
                              gap=4.0 / points_per_px, marker_radius=4.0 / points_per_px)
    for (x, y, text, style), where in zip(labels, placements):
        ax.annotate(
            text, (x, y), xytext=(where.dx * points_per_px, where.dy * points_per_px), textcoords="offset points",
            ha=where.ha, va=where.va, zorder=6,
            arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3}
            if where.leader else None,
            **style,
        )


def _readable_log_axis(axis, key: str, low: float, high: float) -> None:
    """Major ticks from ``log_ticks`` with plain labels, unlabelled minor ticks at every integer."""
    ticks = log_ticks(low, high)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _: axis_tick_text(key, value)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_minor_formatter(NullFormatter())


def pareto_figure(data: ParetoPlotData) -> Figure:
    """The matplotlib figure of ``data`` (``render_pareto_plot`` saves it)."""
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    if data.dominated:
        ax.scatter(
            [p.x for p in data.dominated], [p.y for p in data.dominated],
            s=18, color="tab:blue", alpha=0.25, linewidths=0, label="dominated",
        )
    if data.infeasible:
        ax.scatter(
            [p.x for p in data.infeasible], [p.y for p in data.infeasible],
            s=28, marker="x", color="tab:red", alpha=0.8, label="violates a limit",
        )
    if data.front_line:
        xs = [p.x for p in data.front_line]
        ys = [p.y for p in data.front_line]
        ax.step(xs, ys, where="post", color="tab:orange", linewidth=1.5, label="front of this pair")
    if data.study_front:
        ax.scatter(
            [p.x for p in data.study_front], [p.y for p in data.study_front],
            s=36, color="tab:blue", edgecolors="black", linewidths=0.6, zorder=3,
            label="study Pareto front",
        )
    labels: list[tuple[float, float, str, dict]] = []
    for index, (point, name) in enumerate(data.references):
        ax.scatter([point.x], [point.y], s=70, marker="D", facecolors="none", edgecolors="black", zorder=4,
                   label="reference configuration" if index == 0 else None)
        labels.append((point.x, point.y, f"{name} (#{point.number})", {"fontsize": 8}))
    for index, (point, label) in enumerate(data.baselines):
        ax.scatter([point.x], [point.y], s=60, marker="^", color="tab:green", edgecolors="black", linewidths=0.6,
                   zorder=4, label="hand-designed baseline" if index == 0 else None)
        labels.append((point.x, point.y, label, {"fontsize": 7, "color": "darkgreen"}))
    if data.baseline is not None:
        name, value = data.baseline
        ax.axhline(value, color="grey", linestyle="--", linewidth=1.0, label=f"{name} ({value:.4g})")
    if data.knee is not None:
        ax.scatter([data.knee.x], [data.knee.y], s=160, marker="*", color="gold", edgecolors="black",
                   linewidths=0.6, zorder=5, label=f"knee (#{data.knee.number})")
    if data.x_log:
        ax.set_xscale("log")
        _readable_log_axis(ax.xaxis, data.cost_key, *ax.get_xlim())
    elif is_count(data.cost_key):
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: axis_tick_text(data.cost_key, value)))
    ax.set_xlabel(data.x_label, fontsize=9)
    ax.set_ylabel(data.y_label, fontsize=9)
    ax.set_title(data.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    # below the axes, where it can cover neither a point nor a label
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    fig.subplots_adjust(bottom=0.27)
    trial_points = [(p.x, p.y) for p in (*data.study_front, *data.dominated, *data.infeasible)]
    _annotate_without_overlap(fig, ax, labels, trial_points)
    return fig


def render_pareto_plot(data: ParetoPlotData, path_stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Draw ``data`` to ``path_stem.png`` / ``.svg``; returns the files written."""
    return _save(pareto_figure(data), path_stem, formats)


class ImportancePlotData(NamedTuple):
    objectives: list[str]  # one panel per objective (column of the importance table)
    params: list[str]  # parameter names, most important (summed over objectives) first
    importances: np.ndarray  # (len(params), len(objectives)), each column sums to 1
    title: str


def importance_plot_data(importances: pd.DataFrame, study_name: str) -> ImportancePlotData | None:
    """From ``param_importances(study)`` (params x objectives); None when it is empty."""
    if importances.empty:
        return None
    order = importances.fillna(0.0).sum(axis=1).sort_values(ascending=False).index
    table = importances.loc[order].fillna(0.0)
    return ImportancePlotData(
        objectives=[str(c) for c in table.columns],
        params=[str(i) for i in table.index],
        importances=table.to_numpy(dtype=float),
        title=f"{study_name}: parameter importance (PED-ANOVA)",
    )


def render_importance_plot(
    data: ImportancePlotData, path_stem: Path, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """One horizontal bar panel per objective, parameters in the same order in every panel."""
    n = len(data.objectives)
    height = max(2.5, 0.28 * len(data.params) + 1.2)
    fig = Figure(figsize=(3.2 * n + 1.8, height))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    positions = np.arange(len(data.params))
    for index, (ax, objective) in enumerate(zip(axes, data.objectives)):
        ax.barh(positions, data.importances[:, index], color="tab:blue")
        ax.set_title(objective, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (normalised)", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(positions, data.params, fontsize=8)
    axes[0].invert_yaxis()  # most important on top
    fig.suptitle(data.title, fontsize=10)
    return _save(fig, path_stem, formats)
