"""``write_report``: everything under ``reports/<study>/``, regenerated from the storage alone.

Files (``docs/reports.md`` describes each):

    report.md                         the summary tying everything together
    report.html                       the same, one self-contained interactive page (unless html=False)
    trials.csv  pareto.csv            every trial; the Pareto front (study.best_trials)
    figures/pareto_<q>_vs_<c>.png|svg quality q against cost c
    figures/importance.png|svg        parameter importance per objective
    importance.csv
    ablation_observational.csv|md|tex from the study (module on vs off among finished trials)
    ablation_controlled.csv|md|tex    retrained variants (only once ``ablate`` has run)
    deploy/<profile>.json             deployment picks (written by ``deploy``; listed here)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

import ehrsr
from ehrsr.ablation.table import load_controlled_ablation
from ehrsr.reports import interactive
from ehrsr.reports.baselines import baseline_runs, baselines_markdown
from ehrsr.reports.fidelity import (
    FidelityPlotData,
    checks_markdown,
    fidelity_markdown,
    fidelity_plot_data,
    fidelity_report,
    render_fidelity_plot,
)
from ehrsr.reports.html import HtmlFigure, write_html_report
from ehrsr.reports.interactive import trial_details
from ehrsr.reports.latency import latency_section
from ehrsr.reports.observational import observational_table, param_importances
from ehrsr.reports.pareto import config_summary, pareto_table, trials_table
from ehrsr.reports.plots import (
    ImportancePlotData,
    ParetoPlotData,
    importance_plot_data,
    pareto_plot_data,
    render_importance_plot,
    render_pareto_plot,
)
from ehrsr.reports.render import (
    controlled_rows,
    controlled_summary,
    markdown_table,
    observational_rows,
    write_table,
)
from ehrsr.search.budget import BudgetError, parse_budget
from ehrsr.study_schema import (
    COST_METRICS,
    DASH,
    LATENCY_MODELS_ATTR,
    PSNR_CONVENTION_FALLBACK,
    QUALITY_METRICS,
    STUDY,
    TRIAL,
    StudyInfo,
    device_latency_profile,
    fidelity_checks,
    format_metric,
    macs_convention,
    metric_header,
    metric_info,
)

__all__ = ["write_report"]

CONTROLLED_HEADING = "Controlled ablation (what papers call an ablation)"


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[report] {message}", file=sys.stderr)


def write_report(study: optuna.Study, out_dir: Path, *, quiet: bool = False, html: bool = True) -> Path:
    """Write the whole report of ``study`` into ``out_dir`` and return the path of ``report.md``.

    Works for any study the search wrote (docs/study_schema.md), including one with no finished
    trial (the report says so) and one with a single objective. ``html``: also write
    ``report.html``, report.md with interactive figures (``ehrsr.reports.html``); with False an
    older ``report.html`` is removed, so the folder never holds a page that disagrees with it.
    """
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = StudyInfo.from_study(study)

    trials = trials_table(study)
    trials.to_csv(out_dir / "trials.csv", index=False)
    pareto = pareto_table(study, trials)
    pareto.to_csv(out_dir / "pareto.csv", index=False)
    _log(f"{len(trials)} trials, {len(pareto)} on the Pareto front", quiet)

    # figures: each quality metric measured by some finished trial against each cost
    plots: list[tuple[str, str, Path]] = []
    pareto_data: list[tuple[ParetoPlotData, Path]] = []
    front_numbers = pareto["number"].astype(int).tolist()
    knee = pareto.loc[pareto["knee"], "number"]
    knee_number = int(knee.iloc[0]) if len(knee) else None
    baselines = baseline_runs(study)
    for quality in QUALITY_METRICS:
        for cost in COST_METRICS:
            data = pareto_plot_data(trials, info, quality, cost, front_numbers, knee_number, baselines)
            if data is None:
                continue
            stem = figures / f"pareto_{metric_info(quality).name}_vs_{metric_info(cost).name}"
            render_pareto_plot(data, stem)
            plots.append((quality, cost, stem.with_suffix(".png")))
            pareto_data.append((data, stem.with_suffix(".png")))
    _log(f"{len(plots)} Pareto plots", quiet)

    observational = observational_table(trials, info.objectives)
    headers, rows = observational_rows(observational, info.objectives)
    write_table(
        observational, headers, rows, out_dir / "ablation_observational",
        caption=f"Ablation from the study {info.name} (observational): finished trials with each module on vs off",
        label="tab:ablation-observational",
    )

    importances = param_importances(study)
    importance_png = None
    importance_data = None
    if not importances.empty:
        importances.to_csv(out_dir / "importance.csv")
        importance_data = importance_plot_data(importances, info.name)
        if importance_data is not None:
            importance_png = render_importance_plot(importance_data, figures / "importance")[0]
    else:
        pd.DataFrame(columns=["param"]).to_csv(out_dir / "importance.csv", index=False)

    controlled = load_controlled_ablation(study)
    if controlled is not None:
        table, plan = controlled
        headers, rows = controlled_rows(table)
        write_table(
            table, headers, rows, out_dir / "ablation_controlled",
            caption=(
                f"Controlled ablation of trial {plan['reference_trial']} of {info.name}: each variant "
                f"retrained for {plan.get('steps', '?')} steps with seeds {plan.get('seeds')} "
                f"({plan.get('fidelity') or 'the trials own fidelity'}); "
                "reference row absolute (mean ± std over seeds), other rows change vs the 'vs' variant: "
                "mean paired delta with its 95 % pigeonhole-bootstrap interval over (seed, image) pairs "
                "(per seed for runs without per-image values), verdict on PSNR"
            ),
            label="tab:ablation-controlled",
        )
        _log(f"controlled ablation of trial {plan['reference_trial']}: {len(table)} variants", quiet)

    picks = _deployment_picks(out_dir / "deploy")
    report = out_dir / "report.md"
    text = _report_text(
        study, info, trials, pareto, plots, observational, importances, importance_png, controlled, picks, out_dir,
    )
    text, fidelity_figure_data = _with_trust_sections(text, study, info, baselines, figures, out_dir)
    report.write_text(text)
    _log(f"wrote {report}", quiet)
    page = out_dir / "report.html"
    if html:
        page_figures = _interactive_figures(
            trials, info, out_dir, pareto_data, (importance_data, importance_png), fidelity_figure_data,
            controlled[0] if controlled is not None else None,
        )
        write_html_report(text, page_figures, page, note=_measured_note(info))
        _log(f"wrote {page}", quiet)
    elif page.exists():
        page.unlink()
        _log(f"removed {page} (not written on request)", quiet)
    return report


def _interactive_figures(
    trials: pd.DataFrame,
    info: StudyInfo,
    root: Path,
    pareto_data: list[tuple[ParetoPlotData, Path]],
    importance: tuple[ImportancePlotData | None, Path | None],
    fidelity: tuple[FidelityPlotData, Path] | None,
    controlled: pd.DataFrame | None,
) -> list[HtmlFigure]:
    """report.html's figures: the twin of each PNG report.md links, and the controlled ablation's
    intervals as error bars (no PNG)."""
    details = trial_details(trials, info, root.parent)
    out = [HtmlFigure(interactive.pareto_figure(data, details), "pareto", png=_rel(png, root))
           for data, png in pareto_data]
    importance_data, importance_png = importance
    if importance_data is not None and importance_png is not None:
        out.append(HtmlFigure(interactive.importance_figure(importance_data), "importance",
                              png=_rel(importance_png, root)))
    if fidelity is not None:
        out.append(HtmlFigure(interactive.fidelity_figure(fidelity[0]), "fidelity", png=_rel(fidelity[1], root)))
    if controlled is not None:
        figure = interactive.ablation_figure(controlled)
        if figure is not None:
            out.append(HtmlFigure(figure, "ablation", section=CONTROLLED_HEADING))
    return out


def _measured_note(info: StudyInfo) -> str:
    """What report.html says under its title about measured and predicted numbers."""
    predicted = bool(info.attrs.get(LATENCY_MODELS_ATTR)) or any(
        device_latency_profile(o.metric_key) is not None for o in info.objectives)
    return (
        "Quality (PSNR, SSIM, LPIPS) is measured on the validation set after each trial's brief training; "
        f"latency and memory are measured on {info.device_name}, MACs and parameters counted on the deploy form"
        + ("; numbers labelled \"predicted\" come from a device's latency model, whose measured accuracy the "
           "latency section states." if predicted else ". No number in this report is predicted.")
    )


# ---------------------------------------------------------------------------------------------
# report.md


def _with_trust_sections(text: str, study: optuna.Study, info: StudyInfo, baselines: list, figures: Path,
                         root: Path) -> tuple[str, tuple[FidelityPlotData, Path] | None]:
    """Insert the "Baselines" and "Proxy fidelity" sections (docs/reports.md) before "Deployment
    picks", written from ``<study>-baselines`` and ``<study>-fidelity``; also returns the fidelity
    figure's data and PNG (for report.html)."""
    fidelity = fidelity_report(study)
    figure = None
    figure_data = None
    if fidelity is not None:
        brief = [(r.label, float(r.metrics["psnr"])) for r in baselines
                 if r.status == "complete" and isinstance(r.metrics.get("psnr"), (int, float))]
        data = fidelity_plot_data(fidelity, info.name, brief)
        if data is not None:
            png = render_fidelity_plot(data, figures / "fidelity")[0]
            figure = _rel(png, root)
            figure_data = (data, png)
    sections = (
        "## Baselines\n\n" + baselines_markdown(study, info, markdown_table)
        + "## Proxy fidelity\n\n" + checks_markdown(fidelity_checks(study), markdown_table)
        + fidelity_markdown(fidelity, info.name, figure, markdown_table, checks=fidelity_checks(study))
    )
    marker = "## Deployment picks\n\n"
    return (text.replace(marker, sections + marker, 1) if marker in text else text + sections), figure_data


def _rel(path: Path | None, root: Path) -> str:
    return path.relative_to(root).as_posix() if path is not None else ""


def _deployment_picks(deploy_dir: Path) -> list[dict[str, Any]]:
    picks = []
    if deploy_dir.is_dir():
        for path in sorted(deploy_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            data["_file"] = path
            picks.append(data)
    return picks


def _bullets(items: dict[str, Any]) -> str:
    return "".join(f"- **{k}**: {v}\n" for k, v in items.items() if v not in (None, "", {}))


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items() if v is not None) or DASH
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value)) if all(isinstance(v, int) for v in value) else ", ".join(map(str, value))
    return str(value)


def _budget_text(study: optuna.Study, info: StudyInfo) -> str:
    text = info.attrs.get(STUDY.budget)
    if not text:
        return "not recorded"
    try:
        budget = parse_budget(str(text))
    except BudgetError as exc:
        return f"`{text}` (cannot be parsed: {exc})"
    spent = budget.spent(study)
    shares = info.attrs.get(STUDY.shares) or {}
    kept = {"controlled ablation": shares.get("ablation"), "baselines": shares.get("baselines_share"),
            "proxy-fidelity check": shares.get("fidelity")}
    kept_text = ", ".join(f"{v:.0%} for the {k}" for k, v in kept.items() if isinstance(v, (int, float)) and v > 0)
    extra = f"; kept: {kept_text}" if kept_text else ""
    return f"`{budget.describe_short()}`: used {spent.describe()} ({budget.used_fraction(spent):.0%}){extra}"


def _summary(study: optuna.Study, info: StudyInfo, trials: pd.DataFrame) -> str:
    attrs = info.attrs
    space = attrs.get(STUDY.space) or {}
    device = attrs.get(STUDY.device) or {}
    states = Counter(trials["state"]) if len(trials) else Counter()
    statuses = Counter(trials["status"]) if len(trials) else Counter()
    objectives = ", ".join(f"{o.name} ({o.direction})" for o in info.objectives)
    early = attrs.get(STUDY.early_stopping) or {}
    items = {
        "Objectives": objectives,
        "Search space": f"`{space.get('name', '?')}`" + (f" ({space['path']})" if space.get("path") else ""),
        "Task": _plain(attrs.get(STUDY.task) or {}),
        "Data": _data_text(attrs.get(STUDY.data) or {}),
        "Limits": _plain({k: v for k, v in info.limits.items() if v is not None}) or "none",
        "Budget": _budget_text(study, info),
        "Device": f"{info.device_name} ({device.get('kind', '?')})",
        "Profiling": _plain(attrs.get(STUDY.profile) or {}),
        "Baseline": _baseline_text(attrs.get(TRIAL.baseline)),
        "Early stopping": (
            f"MO-ASHA, rungs at {early.get('rung_steps')} steps, eta {early.get('eta')}"
            if early.get("enabled") else "off"
        ),
        "Trials": (", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none")
        + (f" (status: {', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})" if statuses else ""),
        "ehrsr version": attrs.get(STUDY.ehrsr_version),
    }
    return _bullets(items)


def _data_text(data: dict) -> str:
    """The study's image folders (None: the built-in sample images)."""
    builtin = "built-in scikit-image sample images"
    return f"train {data.get('train') or builtin}; validation {data.get('val') or builtin}"


def _baseline_text(baseline: dict | None) -> str | None:
    """The trivial answer's quality on the validation set: trials below it have not learned yet."""
    if not baseline:
        return None
    parts = [f"PSNR {baseline['psnr']:.2f} dB" if baseline.get("psnr") is not None else None,
             f"SSIM {baseline['ssim']:.4f}" if baseline.get("ssim") is not None else None]
    values = ", ".join(p for p in parts if p)
    return f"{baseline.get('name', 'baseline')} on the validation set: {values} (dashed line in the quality plots)"


def _conventions(info: StudyInfo) -> str:
    conventions = dict(info.conventions)
    conventions.setdefault("psnr", PSNR_CONVENTION_FALLBACK)
    conventions.setdefault("macs", macs_convention(info.shape_text()))
    return _bullets(conventions)


def _pareto_markdown(pareto: pd.DataFrame, info: StudyInfo) -> str:
    metrics = [k for k in (*QUALITY_METRICS, *COST_METRICS) if k in pareto and pareto[k].notna().any()]
    headers = ["trial", "configuration", *(metric_header(k) for k in metrics), "note"]
    rows = []
    for _, r in pareto.iterrows():
        notes = []
        if r.get("knee"):
            notes.append("knee")
        if isinstance(r.get("reference"), str):
            notes.append(r["reference"])
        rows.append([int(r["number"]), config_summary(r), *(format_metric(k, r[k]) for k in metrics), ", ".join(notes)])
    return markdown_table(headers, rows)


def _report_text(
    study: optuna.Study,
    info: StudyInfo,
    trials: pd.DataFrame,
    pareto: pd.DataFrame,
    plots: list[tuple[str, str, Path]],
    observational: pd.DataFrame,
    importances: pd.DataFrame,
    importance_png: Path | None,
    controlled: tuple[pd.DataFrame, dict[str, Any]] | None,
    picks: list[dict[str, Any]],
    root: Path,
) -> str:
    n_complete = int((trials["state"] == "COMPLETE").sum()) if len(trials) else 0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# Search report: {info.name}\n\n",
        f"Generated {date} by ehrsr {ehrsr.__version__} from the study storage alone "
        f"(`run_search.py report --study-name {info.name}` regenerates it).\n\n",
        "## Summary\n\n",
        _summary(study, info, trials),
        "\nConventions of the numbers below:\n\n",
        _conventions(info),
        "\n",
        latency_section(study),
    ]

    out.append("## Pareto front\n\n")
    if n_complete == 0:
        out.append(
            f"No trial has finished yet ({len(trials)} trial{'s' if len(trials) != 1 else ''} in the study), "
            "so there is no front, no figure and no ablation from the study. Resume the search "
            "(the same command continues the study).\n\n"
        )
    elif pareto.empty:
        out.append(
            f"{n_complete} trials finished but none meets the study's limits "
            f"({_plain({k: v for k, v in info.limits.items() if v is not None})}): the front is empty. "
            "The figures mark the violating trials with x.\n\n"
        )
    else:
        objectives = " and ".join(f"{o.direction} {o.label}" for o in info.objectives)
        out.append(
            f"{len(pareto)} of {n_complete} finished trials are non-dominated ({objectives}; "
            "`study.best_trials`, feasible trials only). The knee (closest to the utopia point after "
            "min-max normalising each objective over the front) is the default reference of the "
            "controlled ablation. Full table: [pareto.csv](pareto.csv); every trial: "
            "[trials.csv](trials.csv).\n\n"
        )
        out.append(_pareto_markdown(pareto, info) + "\n")
    if plots:
        out.append(
            "Each figure: the step line is the front of that quality/cost pair; solid points are on "
            "the study's Pareto front, faint points are dominated, x marks trials over a limit, "
            "diamonds are the reference configurations, the star is the knee.\n\n"
        )
        for quality, cost, png in plots:
            out.append(f"![{metric_info(quality).label} vs {metric_info(cost).label}]({_rel(png, root)})\n\n")

    out.append("## Ablation from the study (observational)\n\n")
    if n_complete == 0:
        out.append("No finished trials yet.\n\n")
    else:
        out.append(
            "For each module: the best and median of each objective among the finished trials with "
            "the module on and with it off. The other parameters vary too, so these are correlations "
            "over the sampled configurations, not the effect of the module (see the controlled "
            "ablation for that). Files: [csv](ablation_observational.csv), "
            "[LaTeX](ablation_observational.tex).\n\n"
        )
        headers, rows = observational_rows(observational, info.objectives)
        out.append(markdown_table(headers, rows) + "\n")

    out.append("## Parameter importance\n\n")
    if importances.empty:
        out.append("Needs at least two finished trials with searched parameters.\n\n")
    else:
        out.append(
            f"PED-ANOVA (Optuna's default evaluator) over the {n_complete} finished trials: how much "
            "each parameter's values among the best 10 % differ from all trials, per objective"
            + (", and for reaching the Pareto front (`pareto`)" if "pareto" in importances else "")
            + ". Each column sums to 1. File: [importance.csv](importance.csv).\n\n"
        )
        if importance_png is not None:
            out.append(f"![parameter importance]({_rel(importance_png, root)})\n\n")
        top = importances.head(10)
        out.append(
            markdown_table(["param", *top.columns], [[p, *(f"{v:.3f}" for v in r)] for p, r in top.iterrows()])
            + "\n"
        )

    out.append(f"## {CONTROLLED_HEADING}\n\n")
    if controlled is None:
        out.append(
            "Not run yet. `run_search.py ablate --study-name "
            f"{info.name}` retrains the knee configuration with each module left out and the "
            "conv-only baseline with each module added, with several seeds.\n\n"
        )
    else:
        table, plan = controlled
        out.append(
            f"Reference: trial {plan['reference_trial']}, retrained with seeds {plan.get('seeds')} for "
            f"{plan.get('steps', '?')} steps, as every variant. Fidelity: {plan.get('fidelity') or 'the trials own'}. "
            "`-m`: the reference without module m "
            "(vs the reference); `baseline`: every module off (vs the reference); `+m`: the baseline "
            "with m added (vs the baseline). Quality: mean paired delta with its 95 % interval "
            "(pigeonhole bootstrap over (seed, validation image) pairs; per seed for runs stored "
            "without per-image values, n/a below two units); verdict: helps / hurts / no detectable "
            "effect at this fidelity, on PSNR; cost: difference of the means. Files: "
            "[csv](ablation_controlled.csv), [LaTeX](ablation_controlled.tex).\n\n"
        )
        headers, rows = controlled_rows(table)
        out.append(markdown_table(headers, rows) + "\n")
        out.append(controlled_summary(table) + "\n\n")

    out.append("## Deployment picks\n\n")
    if not picks:
        out.append(
            "None yet. `run_search.py deploy --study-name "
            f"{info.name} --device-profile NAME` measures the Pareto trials on the machine it runs on "
            "and picks the best one within the profile's limits (profiles: ehrsr/search_spaces/devices.yaml).\n\n"
        )
    else:
        headers = ["profile", "trial", "PSNR (dB)", "latency (ms)", "memory (MiB)", "params", "MACs", "measured on", "date"]
        rows = []
        for pick in picks:
            measured = pick.get("measured") or {}
            quality = pick.get("quality") or {}
            where = pick.get("where") or {}
            rows.append(
                [
                    f"[{pick['profile']['name']}]({_rel(pick['_file'], root)})",
                    pick.get("trial"),
                    format_metric("psnr", quality.get("psnr")),
                    format_metric("latency_ms", measured.get("latency_ms"))
                    + (" (predicted)" if (pick.get("latency") or {}).get("mode") == "predicted" else ""),
                    format_metric("peak_memory_mb", measured.get("peak_memory_mb")),
                    format_metric("params_deploy", measured.get("params_deploy")),
                    format_metric("macs", measured.get("macs")),
                    where.get("device", DASH),
                    where.get("date", DASH),
                ]
            )
        out.append(
            "Latency and memory measured on the named device at the profile's input size; MACs at that "
            "input size; PSNR from the search. Each pick has its fused weights beside its JSON.\n\n"
        )
        out.append(markdown_table(headers, rows) + "\n")

    out.append("## What to do next\n\n")
    if n_complete == 0:
        out.append("Let the search run: nothing has finished yet.\n")
    else:
        out.append(
            "Every number above comes from brief training. Take the deployment pick for your device "
            "(or the knee of the front) and train it fully, with the long schedule and the full "
            "training set, before deploying or publishing it; then re-measure its quality on the "
            "standard benchmarks.\n"
        )
    return "".join(out)
