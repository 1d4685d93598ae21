"""Interactive figures of ``report.html``, drawn with plotly from the data the PNGs are drawn from.

Each figure takes the same ``NamedTuple`` its matplotlib twin takes (``ParetoPlotData``,
``ImportancePlotData``, ``FidelityPlotData``) or the same table (the controlled ablation), so the
two can never show different numbers. What only the interactive form can add is per point: the
hover of a trial says its number, its configuration in the short form (``config_summary``), its
modules with their settings, its objective values and status, and the command that trains it
fully (``TrialDetails``, from ``trials_table``). Figures are plain ``plotly.graph_objects.Figure``
objects; ``ehrsr.reports.html`` puts them in the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ehrsr.reports.fidelity import FidelityPlotData
from ehrsr.reports.pareto import config_summary, module_settings
from ehrsr.reports.plots import (
    ImportancePlotData,
    ParetoPlotData,
    PlotPoint,
    axis_tick_text,
    log_ticks,
    place_labels,
)
from ehrsr.study_schema import StudyInfo, format_metric, is_count, metric_header, train_command

__all__ = [
    "TRIAL_TRACE",
    "TrialDetails",
    "ablation_figure",
    "fidelity_figure",
    "importance_figure",
    "pareto_figure",
    "trial_details",
]

TRIAL_TRACE = "trials"
"""``meta`` of the traces that hold the study's finished trials (one marker per trial): the front,
the dominated and the over-limit ones. The browser test counts their points."""

# the PNGs' colours (matplotlib's tab10), so both forms read alike
_BLUE, _ORANGE, _GREEN, _RED, _GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"
_FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12}
# plot area the label placement assumes (the page draws figures about this size)
_PLOT_PX = (560.0, 330.0)


@dataclass(frozen=True)
class TrialDetails:
    """What the report says about one trial when a point is hovered or clicked."""

    number: int
    summary: str  # 'w8 L1 T1 naf: repmix+noise'
    modules: tuple[str, ...]  # 'wab (window_size=8, heads=2, ...)' per switched-on module
    objectives: tuple[str, ...]  # 'PSNR (dB) 27.16' per objective of the study
    status: str  # 'complete', 'complete, violates a limit', ...
    command: str  # python run_search.py train --study-name NAME --trial N

    def hover_html(self, role: str) -> str:
        """The hover label (plotly's subset of HTML: <b>, <br>)."""
        lines = [
            f"<b>trial #{self.number}</b> ({html.escape(role)})",
            html.escape(self.summary),
            "modules: " + (html.escape("; ".join(self.modules)) or "none (conv-only)"),
            "objectives: " + html.escape(", ".join(self.objectives)),
            f"status: {html.escape(self.status)}",
            f"train it: {html.escape(self.command)}",
        ]
        return "<br>".join(lines)


def trial_details(trials: pd.DataFrame, info: StudyInfo, reports_dir: str | Path) -> dict[int, TrialDetails]:
    """``TrialDetails`` of every trial in ``trials`` (``trials_table``), by trial number;
    ``reports_dir`` is the folder holding the study's folder (for the train command)."""
    out: dict[int, TrialDetails] = {}
    for _, row in trials.iterrows():
        number = int(row["number"])
        objectives = tuple(
            f"{metric_header(o.metric_key)} {format_metric(o.metric_key, row.get(o.metric_key))}"
            for o in info.objectives
        )
        status = str(row.get("status") or str(row.get("state", "")).lower())
        if row.get("state") == "COMPLETE" and not bool(row.get("feasible", True)):
            status += ", violates a limit"
        reference = row.get("reference")
        if isinstance(reference, str) and reference:
            status += f", reference configuration '{reference}'"
        out[number] = TrialDetails(number, config_summary(row), tuple(module_settings(row)), objectives, status,
                                   train_command(info.name, number, reports_dir))
    return out


# ---------------------------------------------------------------------------------------------
# Pareto fronts


def _layout(fig: go.Figure, title: str, x_label: str, y_label: str, *, height: int = 470) -> None:
    fig.update_layout(
        title={"text": html.escape(title), "font": {"size": 14}},
        font=_FONT,
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 20, "t": 50, "b": 60},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0, "font": {"size": 11}},
        hoverlabel={"align": "left", "font": {"size": 12}},
    )
    fig.update_xaxes(title={"text": html.escape(x_label), "font": {"size": 12}})
    fig.update_yaxes(title={"text": html.escape(y_label), "font": {"size": 12}})


def _axis_range(values: Sequence[float], log: bool) -> tuple[float, float]:
    """The drawn range (5 % padding), in log10 units for a log axis (as plotly wants it)."""
    data = np.log10(np.asarray(values, dtype=float)) if log else np.asarray(values, dtype=float)
    low, high = float(np.min(data)), float(np.max(data))
    pad = 0.05 * (high - low) if high > low else (0.5 if log else max(abs(low) * 0.05, 1e-6))
    return low - pad, high + pad


def _trial_trace(points: Sequence[PlotPoint], name: str, role: str, details: Mapping[int, TrialDetails],
                 marker: dict) -> go.Scatter:
    return go.Scatter(
        x=[p.x for p in points], y=[p.y for p in points], mode="markers", name=name, marker=marker,
        customdata=[p.number for p in points],
        text=[details[p.number].hover_html(role) if p.number in details else f"trial #{p.number}" for p in points],
        hovertemplate="%{text}<extra></extra>", meta=TRIAL_TRACE,
    )


def pareto_figure(data: ParetoPlotData, details: Mapping[int, TrialDetails]) -> go.Figure:
    """Quality against cost as the PNG draws it (``ehrsr.reports.plots``): dominated points faint,
    the study's front solid, over-limit trials as x, the pair's front as a step line, references
    and baselines labelled, the trivial answer as a dashed line, the knee as a star. Every trial
    marker carries its ``TrialDetails`` in the hover and its number in ``customdata``."""
    fig = go.Figure()
    if data.front_line:
        fig.add_trace(go.Scatter(
            x=[p.x for p in data.front_line], y=[p.y for p in data.front_line], mode="lines",
            line={"shape": "hv", "color": _ORANGE, "width": 2}, name="front of this pair", hoverinfo="skip",
        ))
    if data.dominated:
        fig.add_trace(_trial_trace(data.dominated, "dominated", "dominated", details,
                                   {"color": _BLUE, "opacity": 0.3, "size": 8}))
    if data.infeasible:
        fig.add_trace(_trial_trace(data.infeasible, "violates a limit", "violates a limit", details,
                                   {"color": _RED, "symbol": "x", "size": 9, "opacity": 0.8}))
    if data.study_front:
        fig.add_trace(_trial_trace(data.study_front, "study Pareto front", "on the study's Pareto front", details,
                                   {"color": _BLUE, "size": 10, "line": {"color": "black", "width": 1}}))
    labelled: list[tuple[PlotPoint, str, str]] = []
    if data.references:
        points = [p for p, _ in data.references]
        fig.add_trace(go.Scatter(
            x=[p.x for p in points], y=[p.y for p in points], mode="markers", name="reference configuration",
            marker={"symbol": "diamond-open", "size": 14, "color": "black", "line": {"width": 1.5}},
            hoverinfo="skip",
        ))
        labelled += [(p, f"{name} (#{p.number})", "black") for p, name in data.references]
    if data.baselines:
        points = [p for p, _ in data.baselines]
        fig.add_trace(go.Scatter(
            x=[p.x for p in points], y=[p.y for p in points], mode="markers", name="hand-designed baseline",
            marker={"symbol": "triangle-up", "size": 12, "color": _GREEN, "line": {"color": "black", "width": 1}},
            text=[html.escape(label) for _, label in data.baselines],
            hovertemplate=(f"<b>%{{text}}</b><br>hand-designed baseline, the study's trial protocol<br>"
                           f"{html.escape(data.x_label)}: %{{x:.4g}}<br>{html.escape(data.y_label)}: %{{y:.4g}}"
                           "<extra></extra>"),
        ))
        labelled += [(p, label, "darkgreen") for p, label in data.baselines]
    xs = [p.x for p in (*data.study_front, *data.dominated, *data.infeasible)] + [p.x for p, _ in data.baselines]
    ys = [p.y for p in (*data.study_front, *data.dominated, *data.infeasible)] + [p.y for p, _ in data.baselines]
    if data.baseline is not None:
        name, value = data.baseline
        ys.append(value)
    x_range = _axis_range(xs, data.x_log)
    y_range = _axis_range(ys, False)
    if data.baseline is not None:
        name, value = data.baseline
        low, high = (10 ** x_range[0], 10 ** x_range[1]) if data.x_log else x_range
        fig.add_trace(go.Scatter(
            x=[low, high], y=[value, value], mode="lines", name=html.escape(f"{name} ({value:.4g})"),
            line={"color": _GREY, "dash": "dash", "width": 1.2},
            hovertemplate=html.escape(f"{name}: {value:.4g}") + "<extra></extra>",
        ))
    if data.knee is not None:
        fig.add_trace(go.Scatter(
            x=[data.knee.x], y=[data.knee.y], mode="markers", name=f"knee (#{data.knee.number})",
            marker={"symbol": "star", "size": 18, "color": "gold", "line": {"color": "black", "width": 1}},
            customdata=[data.knee.number],
            text=[details[data.knee.number].hover_html("the knee of the study's front")
                  if data.knee.number in details else f"trial #{data.knee.number}"],
            hovertemplate="%{text}<extra></extra>",
        ))
    _layout(fig, data.title, data.x_label, data.y_label)
    xaxis: dict = {"range": list(x_range)}
    if data.x_log:
        ticks = log_ticks(10 ** x_range[0], 10 ** x_range[1])
        xaxis.update(type="log", tickvals=ticks, ticktext=[axis_tick_text(data.cost_key, t) for t in ticks])
    elif is_count(data.cost_key):
        xaxis.update(exponentformat="SI")
    fig.update_xaxes(**xaxis)
    fig.update_yaxes(range=list(y_range))
    _label_points(fig, labelled, x_range, y_range, data.x_log,
                  [(p.x, p.y) for p in (*data.study_front, *data.dominated, *data.infeasible)])
    return fig


def _label_points(fig: go.Figure, labelled: Sequence[tuple[PlotPoint, str, str]], x_range: tuple[float, float],
                  y_range: tuple[float, float], x_log: bool, obstacles: Sequence[tuple[float, float]]) -> None:
    """Annotations placed by ``place_labels`` (as in the PNG) on the plot area the page draws,
    about ``_PLOT_PX``; plotly's annotation offsets are pixels, y downwards."""
    if not labelled:
        return
    width, height = _PLOT_PX

    def to_px(x: float, y: float) -> tuple[float, float]:
        u = math.log10(x) if x_log else x
        return ((u - x_range[0]) / (x_range[1] - x_range[0]) * width,
                (y - y_range[0]) / (y_range[1] - y_range[0]) * height)

    sizes = [(6.6 * len(text) + 4, 15.0) for _, text, _ in labelled]  # 11 px text, measured roughly
    placements = place_labels([to_px(p.x, p.y) for p, _, _ in labelled], sizes, (0, 0, width, height),
                              [to_px(x, y) for x, y in obstacles])
    for (point, text, colour), where in zip(labelled, placements):
        fig.add_annotation(
            x=math.log10(point.x) if x_log else point.x, y=point.y, text=html.escape(text),
            showarrow=True, arrowhead=0, arrowwidth=0.8, arrowcolor=_GREY if where.leader else "rgba(0,0,0,0)",
            ax=where.dx, ay=-where.dy, xanchor=where.ha, yanchor=where.va,
            font={"size": 11, "color": colour},
        )


# ---------------------------------------------------------------------------------------------
# importance, proxy fidelity, controlled ablation


def importance_figure(data: ImportancePlotData) -> go.Figure:
    """One horizontal bar panel per objective, parameters in the same order (most important on top)."""
    n = len(data.objectives)
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, subplot_titles=[html.escape(o) for o in data.objectives],
                        horizontal_spacing=0.04)
    for index, objective in enumerate(data.objectives):
        fig.add_trace(go.Bar(
            x=data.importances[:, index], y=data.params, orientation="h", marker={"color": _BLUE},
            name=objective, showlegend=False,
            hovertemplate=f"%{{y}}: %{{x:.3f}} ({html.escape(objective)})<extra></extra>",
        ), row=1, col=index + 1)
        fig.update_xaxes(range=[0, 1], title={"text": "importance (normalised)", "font": {"size": 11}},
                         row=1, col=index + 1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(
        title={"text": html.escape(data.title), "font": {"size": 14}}, font=_FONT, template="plotly_white",
        height=max(260, 24 * len(data.params) + 120), margin={"l": 140, "r": 20, "t": 70, "b": 50},
    )
    return fig


def fidelity_figure(data: FidelityPlotData) -> go.Figure:
    """Brief against long PSNR with the line y = x; the baselines' brief PSNR as vertical lines."""
    xs = [p.brief for p in data.points]
    ys = [p.long for p in data.points]
    everything = xs + ys + [value for _, value in data.baselines]
    low, high = min(everything), max(everything)
    pad = 0.05 * (high - low or 1.0)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[low - pad, high + pad], y=[low - pad, high + pad], mode="lines", name="y = x",
        line={"color": _GREY, "dash": "dash", "width": 1}, hoverinfo="skip",
    ))
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers+text", name="retrained trial", text=[f"#{p.source_trial}" for p in data.points],
        textposition="top right", customdata=[[p.source_trial, p.long - p.brief] for p in data.points],
        marker={"color": _BLUE, "size": 10, "line": {"color": "black", "width": 1}},
        hovertemplate=("<b>trial #%{customdata[0]}</b><br>brief: %{x:.3f} dB<br>long: %{y:.3f} dB<br>"
                       "gain: %{customdata[1]:+.3f} dB<extra></extra>"),
    ))
    for index, (label, value) in enumerate(data.baselines):
        fig.add_trace(go.Scatter(
            x=[value, value], y=[low - pad, high + pad], mode="lines", line={"color": _GREEN, "width": 1},
            opacity=0.5, name="baseline (brief PSNR)", legendgroup="baselines", showlegend=index == 0,
            hovertemplate=html.escape(f"{label}: brief PSNR {value:.3f} dB") + "<extra></extra>",
        ))
    _layout(fig, data.title, data.x_label, data.y_label, height=480)
    fig.update_xaxes(range=[low - pad, high + 2 * pad])  # room for the labels
    fig.update_yaxes(range=[low - pad, high + 2 * pad])
    return fig


_VERDICT_COLOURS = {"helps": _GREEN, "hurts": _RED}


def _numbers(rows: pd.DataFrame, column: str) -> np.ndarray:
    if column not in rows:
        return np.full(len(rows), np.nan)
    return pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)


def ablation_figure(table: pd.DataFrame) -> go.Figure | None:
    """The controlled ablation's quality deltas with their 95 % intervals as error bars, one panel
    per quality metric (PSNR, SSIM, and LPIPS when measured), one row per variant (not the
    reference), coloured by the row's verdict on that metric; None when no row has a delta."""
    rows = table[table["kind"] != "reference"] if "kind" in table else table.iloc[0:0]
    metrics = [k for k in ("psnr", "ssim", "lpips")
               if f"delta_{k}_mean" in rows and pd.to_numeric(rows[f"delta_{k}_mean"], errors="coerce").notna().any()]
    if rows.empty or not metrics:
        return None
    labels = [f"{r['variant']} (vs {r['vs']})" for _, r in rows.iterrows()]
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[html.escape(f"Δ {metric_header(k)}, 95 % CI") for k in metrics])
    for column, key in enumerate(metrics, start=1):
        mean, low, high = (_numbers(rows, f"delta_{key}_{part}") for part in ("mean", "low", "high"))
        stated = rows[f"verdict_{key}"] if f"verdict_{key}" in rows else pd.Series([None] * len(rows))
        verdicts = [str(v) if isinstance(v, str) else "n/a" for v in stated]
        colours = [_VERDICT_COLOURS.get(v, _GREY) for v in verdicts]
        fig.add_trace(go.Scatter(
            x=mean, y=labels, mode="markers", marker={"color": colours, "size": 9}, showlegend=False,
            error_x={"type": "data", "symmetric": False, "array": np.nan_to_num(high - mean),
                     "arrayminus": np.nan_to_num(mean - low), "color": _GREY, "thickness": 1.5, "width": 4},
            customdata=[[format_metric(key, m, signed=True), format_metric(key, lo, signed=True),
                         format_metric(key, hi, signed=True), v] for m, lo, hi, v in zip(mean, low, high, verdicts)],
            hovertemplate=(f"<b>%{{y}}</b><br>Δ {html.escape(metric_header(key))}: %{{customdata[0]}} "
                           "[%{customdata[1]}, %{customdata[2]}]<br>verdict: %{customdata[3]}<extra></extra>"),
        ), row=1, col=column)
        fig.add_vline(x=0, line={"color": "black", "width": 1}, row=1, col=column)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(
        title={"text": "Controlled ablation: change against the comparison, with 95 % intervals", "font": {"size": 14}},
        font=_FONT, template="plotly_white", height=max(280, 28 * len(labels) + 130),
        margin={"l": 160, "r": 20, "t": 80, "b": 40},
    )
    return fig
