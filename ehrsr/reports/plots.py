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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from ehrsr.reports.baselines import BaselineRun
from ehrsr.search.pareto import pareto_front
from ehrsr.study_schema import StudyInfo, finite, is_count, metric_info

__all__ = [
    "ImportancePlotData",
    "ParetoPlotData",
    "PlotPoint",
    "importance_plot_data",
    "pareto_plot_data",
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
    baseline = info.attrs.get("baseline") or {}
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


def render_pareto_plot(data: ParetoPlotData, path_stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Draw ``data`` to ``path_stem.png`` / ``.svg``; returns the files written."""
    fig = Figure(figsize=(6.4, 4.6))
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
    for point, name in data.references:
        ax.scatter([point.x], [point.y], s=70, marker="D", facecolors="none", edgecolors="black", zorder=4)
        ax.annotate(
            f"{name} (#{point.number})", (point.x, point.y), xytext=(6, 6),
            textcoords="offset points", fontsize=8,
        )
    for index, (point, label) in enumerate(data.baselines):
        ax.scatter([point.x], [point.y], s=60, marker="^", color="tab:green", edgecolors="black", linewidths=0.6,
                   zorder=4, label="hand-designed baseline" if index == 0 else None)
        ax.annotate(label, (point.x, point.y), xytext=(5, -10), textcoords="offset points", fontsize=7,
                    color="darkgreen")
    if data.baseline is not None:
        name, value = data.baseline
        ax.axhline(value, color="grey", linestyle="--", linewidth=1.0, label=f"{name} ({value:.4g})")
    if data.knee is not None:
        ax.scatter([data.knee.x], [data.knee.y], s=160, marker="*", color="gold", edgecolors="black",
                   linewidths=0.6, zorder=5, label=f"knee (#{data.knee.number})")
    if data.x_log:
        ax.set_xscale("log")
    if is_count(data.cost_key):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M rather than 1.2e6 in a corner
    if data.x_log:
        # labels at 1, 2 and 5 per decade; matplotlib's labelled minor ticks would overlap
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if not is_count(data.cost_key):
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 50, 100, 200 ms
    ax.set_xlabel(data.x_label, fontsize=9)
    ax.set_ylabel(data.y_label, fontsize=9)
    ax.set_title(data.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path_stem, formats)


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
