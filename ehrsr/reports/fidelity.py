"""Proxy fidelity of a study: brief (trial) PSNR against long-retrain PSNR, read from ``<study>-fidelity``.

Spearman's rho and Kendall's tau between the two, with bootstrap 95 % intervals
(``ehrsr.stats.rank_agreement``), a scatter plot (brief vs long, the line y = x, the baselines'
brief points), and one verdict sentence: the ranking is trusted when the lower end of tau's
interval exceeds ``TRUST_TAU_LOW``. Reads the storage only (docs/reports.md, "Proxy fidelity").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from ehrsr.search.ranking import check_line, study_verdict
from ehrsr.stats import (
    MIN_RANK_POINTS,
    MIN_TRUST_POINTS,
    TRUST_TAU_LOW,
    RankAgreement,
    StatsError,
    rank_agreement,
)
from ehrsr.study_schema import TRIAL, FidelityCheck, fidelity_study_name, finite, load_side_study

__all__ = [
    "MIN_TRUST_POINTS",
    "TRUST_TAU_LOW",
    "FidelityPlotData",
    "FidelityPoint",
    "FidelityReport",
    "checks_markdown",
    "fidelity_markdown",
    "fidelity_plot_data",
    "fidelity_report",
    "render_fidelity_plot",
]



class FidelityPoint(NamedTuple):
    source_trial: int
    brief: float  # PSNR after the trial's steps
    long: float  # PSNR after factor x those steps


@dataclass(frozen=True)
class FidelityReport:
    points: list[FidelityPoint]
    factor: float | None
    brief_steps: list[int]
    agreement: RankAgreement | None
    message: str  # the verdict sentence, or why there is none
    trusted: bool | None  # None: not enough points


def fidelity_report(study: optuna.Study) -> FidelityReport | None:
    """The agreement of ``<study>-fidelity``'s long runs with their trials' brief PSNR; None when
    the fidelity study was never created."""
    side = load_side_study(study, fidelity_study_name(study.study_name))
    if side is None:
        return None
    points, factors, steps = [], set(), set()
    for trial in side.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        brief = (trial.user_attrs.get(TRIAL.brief_metrics) or {}).get("psnr")
        long = (trial.user_attrs.get(TRIAL.metrics) or {}).get("psnr")
        if finite(brief) and finite(long):
            points.append(FidelityPoint(int(trial.user_attrs[TRIAL.source_trial]), float(brief), float(long)))
            factors.add(float(trial.user_attrs.get(TRIAL.factor, 0)))
            steps.add(int(trial.user_attrs.get(TRIAL.brief_steps, 0)))
    points.sort()
    factor = next(iter(factors)) if len(factors) == 1 else None
    if len(points) < MIN_RANK_POINTS:
        return FidelityReport(points, factor, sorted(steps), None,
                              f"Only {len(points)} long retrain{'s' if len(points) != 1 else ''} finished; the "
                              f"rank agreement needs at least {MIN_RANK_POINTS} (resume with `run_search.py "
                              f"fidelity --study-name {study.study_name}`).", None)
    try:
        agreement = rank_agreement([p.brief for p in points], [p.long for p in points])
    except StatsError as exc:
        return FidelityReport(points, factor, sorted(steps), None, f"No rank agreement: {exc}.", None)
    trusted: bool | None = agreement.kendall_low > TRUST_TAU_LOW
    longer = f"{factor:g}x" if factor else "longer"
    if agreement.n < MIN_TRUST_POINTS:
        trusted = None
        message = (
            f"No verdict yet: Kendall's tau between brief and {longer} training is {agreement.kendall:.2f} over only "
            f"{agreement.n} configurations, too few for its bootstrap interval to mean much (at least "
            f"{MIN_TRUST_POINTS}: `fidelity --configs {max(MIN_TRUST_POINTS, 8)}`)."
        )
    elif trusted:
        message = (
            f"The study's ranking can be trusted: Kendall's tau between brief and {longer} training is "
            f"{agreement.kendall:.2f} (95 % CI {agreement.kendall_low:.2f} to {agreement.kendall_high:.2f}, lower "
            f"bound above {TRUST_TAU_LOW}) over {agreement.n} configurations."
        )
    else:
        message = (
            f"Warning: the study's ranking is not shown to hold under longer training: Kendall's tau is "
            f"{agreement.kendall:.2f} (95 % CI {agreement.kendall_low:.2f} to {agreement.kendall_high:.2f}, lower "
            f"bound not above {TRUST_TAU_LOW}) over {agreement.n} configurations. Give trials more steps per "
            "rung (`training.max_steps` in the space YAML), start the first rung later (`training.min_steps`), "
            "or check more "
            "configurations (`fidelity --configs`) before trusting the front."
        )
    return FidelityReport(points, factor, sorted(steps), agreement, message, trusted)


class FidelityPlotData(NamedTuple):
    points: list[FidelityPoint]
    baselines: list[tuple[str, float]]  # (label, brief PSNR) of the baselines: drawn as ticks on x
    title: str
    x_label: str
    y_label: str


def fidelity_plot_data(report: FidelityReport, study_name: str,
                       baselines: Sequence[tuple[str, float]] = ()) -> FidelityPlotData | None:
    if not report.points:
        return None
    steps = "/".join(map(str, report.brief_steps)) or "?"
    factor = f"{report.factor:g}x" if report.factor else "longer"
    return FidelityPlotData(list(report.points), list(baselines), f"{study_name}: proxy fidelity",
                            f"PSNR after the trial's {steps} steps (dB, Y channel)",
                            f"PSNR after {factor} the steps (dB, Y channel)")


def render_fidelity_plot(data: FidelityPlotData, path_stem: Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Brief vs long PSNR with the line y = x; baselines (brief only) as labelled ticks on the x axis."""
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot()
    xs = [p.brief for p in data.points]
    ys = [p.long for p in data.points]
    ax.scatter(xs, ys, s=30, color="tab:blue", edgecolors="black", linewidths=0.5, zorder=3, label="retrained trial")
    for p in data.points:
        ax.annotate(f"#{p.source_trial}", (p.brief, p.long), xytext=(4, 4), textcoords="offset points", fontsize=7)
    everything = xs + ys + [v for _, v in data.baselines]
    low, high = min(everything), max(everything)
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linestyle="--", linewidth=1, label="y = x")
    for label, value in data.baselines:
        ax.axvline(value, color="tab:green", alpha=0.4, linewidth=1)
        ax.annotate(label, (value, low - pad), rotation=90, fontsize=6, va="bottom", ha="right", color="tab:green")
    ax.set_xlabel(data.x_label, fontsize=9)
    ax.set_ylabel(data.y_label, fontsize=9)
    ax.set_title(data.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = path_stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def fidelity_markdown(report: FidelityReport | None, study_name: str, figure: str | None, markdown_table,
                      checks: Sequence[FidelityCheck] = ()) -> str:
    """The "Proxy fidelity" section of report.md: the study's own retrains (``checks``: its
    stored verdicts, which say why none ran when its space's measurement stands)."""
    if report is None and any(c.source == "space" and c.when == "end" for c in checks):
        return (
            "No retrains in this study: its space, trial protocol, task and data are those the space's "
            "agreement was measured on (docs/proxy_fidelity.md). `run_search.py fidelity --study-name "
            f"{study_name}` retrains some of its configurations for longer all the same.\n\n"
        )
    if report is None:
        return (
            f"Not run. `run_search.py fidelity --study-name {study_name}` (or a search with "
            "`--fidelity-share` > 0) retrains some configurations for longer and checks that brief "
            "training ranks them the same way.\n\n"
        )
    out = [f"**{report.message}**\n\n"]
    if report.agreement is not None:
        a = report.agreement
        out.append(
            f"{a.n} configurations chosen across the Pareto front and the dominated trials (spread over "
            f"their brief PSNR), each retrained with its trial's settings and seed for "
            f"{f'{report.factor:g}x' if report.factor else 'more'} its {'/'.join(map(str, report.brief_steps))} "
            f"steps. Spearman's rho {a.spearman:.3f} [{a.spearman_low:.3f}, {a.spearman_high:.3f}], Kendall's tau "
            f"{a.kendall:.3f} [{a.kendall_low:.3f}, {a.kendall_high:.3f}] (bootstrap over configurations, 95 %).\n\n"
        )
    if figure:
        out.append(f"![proxy fidelity]({figure})\n\n")
    if report.points:
        rows = [[f"#{p.source_trial}", f"{p.brief:.3f}", f"{p.long:.3f}", f"{p.long - p.brief:+.3f}"]
                for p in report.points]
        out.append(markdown_table(["trial", "brief PSNR (dB)", "long PSNR (dB)", "gain (dB)"], rows) + "\n")
    return "".join(out)


def checks_markdown(checks: Sequence[FidelityCheck], markdown_table) -> str:
    """The study's proxy-fidelity verdicts (at the start, part-way, at the end) and what the search
    did about each, the latest first in words."""
    if not checks:
        return ""
    latest = study_verdict(checks)
    out = [f"**Verdict ({_WHEN[latest.when]}): {check_line(latest)}.**\n\n"]
    rows = []
    for c in checks:
        tau = (f"{c.kendall:+.2f} [{c.kendall_low:+.2f}, {c.kendall_high:+.2f}]" if c.kendall is not None else "—")
        verdict = {True: "trusted", False: "not trusted", None: "no verdict"}[c.trusted]
        source = ("the space's measured agreement" if c.source == "space"
                  else f"{c.configurations} retrains, {c.factor:g}x longer" if c.factor else "retrains")
        rows.append([_WHEN[c.when], source, str(c.trial_steps), tau, str(c.configurations), verdict,
                     c.action or "—", c.note or ""])
    out.append(markdown_table(["when", "from", "steps per trial", "Kendall tau [95 % CI]", "configurations",
                               "verdict", "action", "note"], rows) + "\n")
    return "".join(out)


_WHEN = {"start": "at the start", "early": "part-way", "end": "at the end"}
