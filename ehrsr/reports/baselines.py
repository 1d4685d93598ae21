"""The hand-designed baselines of a study, read from ``<study>-baselines``, and "EHR-SR vs baselines".

For each baseline (trained with the study's trial protocol by ``ehrsr.ablation.baselines``): the
best searched configuration at no more latency (and at no more MACs) with the PSNR difference and
its paired 95 % interval over the validation images (``ehrsr.stats.paired_interval``), and the
reverse view, the cheapest searched configuration at no less PSNR. The per-image PSNR values are
read through ``per_image_psnr`` alone; a run that stored none gets the difference without an
interval and the reason. Reads the storage only (docs/reports.md, "Baselines").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ehrsr.stats import PairedInterval, StatsError, paired_interval
from ehrsr.study_schema import (
    DASH,
    PER_IMAGE_ATTR,
    PLAN_ATTR,
    STUDY,
    TRIAL,
    StudyInfo,
    baselines_study_name,
    finite,
    format_metric,
    is_feasible,
    load_side_study,
)

__all__ = [
    "PER_IMAGE_PSNR_KEY",
    "BaselineRun",
    "Comparison",
    "baseline_runs",
    "baselines_markdown",
    "compare_with_baselines",
    "per_image_psnr",
]

PER_IMAGE_PSNR_KEY = PER_IMAGE_ATTR
"""Trial user attribute holding each validation image's ``[psnr, ssim]`` (docs/study_schema.md)."""

COMPARED_COSTS: tuple[str, ...] = ("latency_ms", "macs")


def per_image_psnr(trial: FrozenTrial) -> list[float] | None:
    """The PSNR of each validation image a run stored, or None when it stored none."""
    stored = trial.user_attrs.get(PER_IMAGE_PSNR_KEY)
    if not isinstance(stored, dict) or not stored:
        return None
    # ordered by image name, so two runs on the same validation set pair image by image
    try:
        value = [stored[name][0] for name in sorted(stored)]
    except (TypeError, IndexError, KeyError):
        return None
    if not all(finite(v) for v in value):
        return None
    return [float(v) for v in value]


@dataclass(frozen=True)
class BaselineRun:
    """One stored baseline run."""

    number: int  # trial number in <study>-baselines
    name: str
    label: str
    size_class: str
    status: str
    metrics: dict[str, Any] = field(repr=False)
    train: dict[str, Any] = field(repr=False)
    steps_done: int
    charged_seconds: float
    per_image: list[float] | None = field(repr=False)
    below_trivial: str | None  # e.g. "below bicubic (29.38 dB)" when its PSNR is under the trivial answer

    @property
    def plot_label(self) -> str:
        return f"{self.label} (below {self.below_trivial.split(' ')[1]})" if self.below_trivial else self.label


def baseline_runs(study: optuna.Study) -> list[BaselineRun]:
    """The finished runs of ``<study>-baselines`` (the latest complete one per label, else the
    latest finished one), in the order they were run; [] when the study has none."""
    side = load_side_study(study, baselines_study_name(study.study_name))
    if side is None:
        return []
    trivial = study.user_attrs.get(STUDY.baseline) or {}
    trivial_psnr = trivial.get("psnr")
    latest: dict[str, FrozenTrial] = {}
    for trial in side.get_trials(deepcopy=False):
        label = trial.user_attrs.get(TRIAL.label)
        if not label or not trial.state.is_finished():
            continue
        previous = latest.get(label)
        if previous is None or trial.state == TrialState.COMPLETE or previous.state != TrialState.COMPLETE:
            latest[label] = trial
    runs = []
    for trial in sorted(latest.values(), key=lambda t: t.number):
        attrs = trial.user_attrs
        metrics = dict(attrs.get(TRIAL.metrics) or {})
        psnr = metrics.get("psnr")
        below = None
        if trial.state == TrialState.COMPLETE and finite(psnr) and finite(trivial_psnr) and psnr < trivial_psnr:
            below = f"below {trivial.get('name', 'bicubic')} ({float(trivial_psnr):.2f} dB)"
        runs.append(BaselineRun(
            number=trial.number, name=str(attrs.get(TRIAL.baseline, attrs[TRIAL.label])), label=str(attrs[TRIAL.label]),
            size_class=str(attrs.get(TRIAL.size_class, "?")),
            status=str(attrs.get(TRIAL.status) or trial.state.name.lower()), metrics=metrics,
            train=dict(attrs.get(TRIAL.train) or {}), steps_done=int(attrs.get(TRIAL.steps_done) or 0),
            charged_seconds=float(attrs.get(TRIAL.charged_seconds) or 0.0), per_image=per_image_psnr(trial),
            below_trivial=below,
        ))
    return runs


@dataclass(frozen=True)
class Comparison:
    """One baseline against the searched configurations on one cost."""

    baseline: str
    cost_key: str
    baseline_cost: float
    baseline_psnr: float
    best_trial: int | None  # best searched PSNR at no more cost; None when none is that cheap
    best_cost: float | None
    psnr_difference: float | None  # best searched - baseline (dB)
    interval: PairedInterval | None  # paired over validation images
    no_interval_reason: str | None
    cheapest_trial: int | None  # cheapest searched configuration at no less PSNR
    cheapest_cost: float | None
    cheapest_psnr: float | None


def _searched(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if is_feasible(t) and finite((t.user_attrs.get(TRIAL.metrics) or {}).get("psnr"))
    ]


def _metric(trial: FrozenTrial, key: str) -> float | None:
    value = (trial.user_attrs.get(TRIAL.metrics) or {}).get(key)
    return float(value) if finite(value) else None


def paired_difference(searched: FrozenTrial, run: BaselineRun) -> tuple[PairedInterval | None, str | None]:
    """Interval of the per-image PSNR difference searched - baseline, or (None, why not)."""
    mine = per_image_psnr(searched)
    if mine is None or run.per_image is None:
        which = " and ".join(w for w, v in (("the searched trial", mine), ("the baseline", run.per_image)) if v is None)
        return None, f"no per-image PSNR stored for {which}"
    if len(mine) != len(run.per_image):
        return None, f"per-image PSNR over {len(mine)} vs {len(run.per_image)} images (different validation sets)"
    try:
        return paired_interval(np.asarray(mine) - np.asarray(run.per_image)), None
    except StatsError as exc:
        return None, str(exc)


def compare_with_baselines(study: optuna.Study, runs: Sequence[BaselineRun] | None = None) -> list[Comparison]:
    """For each complete baseline run and each of latency and MACs: the best searched configuration
    at no more cost, and the cheapest at no less PSNR (feasible complete trials of ``study``)."""
    runs = baseline_runs(study) if runs is None else runs
    searched = _searched(study)
    out = []
    for run in runs:
        psnr = run.metrics.get("psnr")
        if run.status != "complete" or not finite(psnr):
            continue
        for cost_key in COMPARED_COSTS:
            cost = run.metrics.get(cost_key)
            if not finite(cost):
                continue
            cheaper = [t for t in searched if (_metric(t, cost_key) is not None and _metric(t, cost_key) <= cost)]
            best = max(cheaper, key=lambda t: (_metric(t, "psnr"), -t.number), default=None)
            interval, why = paired_difference(best, run) if best is not None else (None, None)
            better = [t for t in searched if _metric(t, cost_key) is not None and _metric(t, "psnr") >= psnr]
            cheapest = min(better, key=lambda t: (_metric(t, cost_key), t.number), default=None)
            out.append(Comparison(
                baseline=run.label, cost_key=cost_key, baseline_cost=float(cost), baseline_psnr=float(psnr),
                best_trial=best.number if best else None, best_cost=_metric(best, cost_key) if best else None,
                psnr_difference=(_metric(best, "psnr") - float(psnr)) if best else None,
                interval=interval, no_interval_reason=why,
                cheapest_trial=cheapest.number if cheapest else None,
                cheapest_cost=_metric(cheapest, cost_key) if cheapest else None,
                cheapest_psnr=_metric(cheapest, "psnr") if cheapest else None,
            ))
    return out


def _difference_text(row: Comparison) -> str:
    if row.psnr_difference is None:
        return DASH
    if row.interval is None:
        return f"{row.psnr_difference:+.2f} (no CI: {row.no_interval_reason})"
    return f"{row.interval.mean:+.2f} [{row.interval.low:+.2f}, {row.interval.high:+.2f}]"


def baselines_markdown(study: optuna.Study, info: StudyInfo, markdown_table: Any) -> str:
    """The "Baselines" section of report.md (``markdown_table(headers, rows)`` renders tables)."""
    from ehrsr.study_schema import metric_header

    runs = baseline_runs(study)
    name = baselines_study_name(study.study_name)
    if not runs:
        return (
            f"Not run (no study `{name}`). A search run with `--baselines` (the default) trains the "
            "hand-designed baselines with this study's trial protocol after the search.\n\n"
        )
    plan = {}
    side = load_side_study(study, name)
    if side is not None:
        plan = dict(side.user_attrs.get(PLAN_ATTR) or {})
    train = runs[0].train
    minutes = sum(r.charged_seconds for r in runs) / 60
    out = [
        f"Hand-designed efficient-SR networks (docs/baselines.md), each trained once with exactly the "
        f"protocol of a trial of this study: the reference trial #{plan.get('reference_trial', '?')}'s "
        f"training settings ({train.get('steps', '?')} steps = the top rung, batch {train.get('batch_size', '?')} of "
        f"{train.get('patch_size', '?')} px LR patches, {train.get('loss', '?')} loss, lr {train.get('lr', '?')}, "
        f"seed {train.get('seed', '?')}), the same data, evaluation and cost measurement of the deploy form at "
        f"{info.shape_text()}. Sizes: `tiny` for the tiny space, `full` (the published size) otherwise; the "
        "`tiny` rule reduces channels and blocks until the MACs fall inside the tiny space's range. "
        "\"+bicubic skip\": the network predicts a residual over bicubic upsampling with its last "
        "convolution zeroed, as EHR-SR does (the fair start at search fidelities). Their training is "
        f"charged to the budget: {minutes:.3g} device-minutes. They are the labelled triangles in the "
        f"Pareto figures. Stored in the study `{name}`.\n\n",
    ]
    metrics = ("params_deploy", "macs", "latency_ms", "psnr")
    rows = []
    for run in runs:
        rows.append([run.label, run.size_class, run.status, run.steps_done,
                     *(format_metric(k, run.metrics.get(k)) for k in metrics), run.below_trivial or ""])
    out.append(markdown_table(["baseline", "size", "status", "steps", *(metric_header(k) for k in metrics), "note"],
                              rows) + "\n")
    flagged = [r.label for r in runs if r.below_trivial]
    if flagged:
        out.append(f"Below the trivial answer after this protocol: {', '.join(flagged)} (flagged in the figures).\n\n")
    comparisons = compare_with_baselines(study, runs)
    out.append("### EHR-SR vs baselines\n\n")
    if not comparisons:
        out.append("No complete baseline run with PSNR and cost to compare.\n\n")
        return "".join(out)
    out.append(
        "For each baseline and cost: the best searched configuration (feasible, complete) at no more cost, "
        "its PSNR minus the baseline's with a paired 95 % bootstrap interval over the validation images "
        "(docs/statistics.md), and the reverse view, the cheapest searched configuration at no less PSNR. "
        "Searched numbers come from the same brief protocol; both sides saw one seed, so the interval "
        "covers images, not seeds.\n\n"
    )
    rows = []
    for row in comparisons:
        header = metric_header(row.cost_key)
        rows.append([
            row.baseline, header, format_metric(row.cost_key, row.baseline_cost),
            f"#{row.best_trial} ({format_metric(row.cost_key, row.best_cost)})" if row.best_trial is not None
            else "none at no more cost",
            _difference_text(row),
            f"#{row.cheapest_trial} ({format_metric(row.cost_key, row.cheapest_cost)}, "
            f"{format_metric('psnr', row.cheapest_psnr)} dB)" if row.cheapest_trial is not None
            else "none at no less PSNR",
        ])
    out.append(markdown_table(["baseline", "cost", "baseline cost", "best searched at no more cost",
                               "PSNR difference, 95 % CI (dB)", "cheapest searched at no less PSNR"], rows) + "\n")
    return "".join(out)
