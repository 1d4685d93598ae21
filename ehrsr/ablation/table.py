"""The controlled ablation table, computed from the ``<study>-ablation`` study alone.

Each run is one trial of the ablation study (docs/study_schema.md). Per variant the table gives
the change in quality against its comparison (the reference for leave-one-out rows and for the
baseline row, the baseline for add-one-in rows) and in cost (MACs, parameters, latency, memory).
Quality changes are paired over (seed, validation image): the mean delta, a 95 % pigeonhole
bootstrap interval (Owen 2007, ``ehrsr.stats.paired_interval``'s default), a verdict ("helps",
"hurts", "no detectable effect at this fidelity") and the minimum detectable effect
(docs/statistics.md). Read-only: the reports use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ehrsr.ablation.variants import Variant
from ehrsr.search.budget import trial_charge
from ehrsr.stats import StatsError, minimum_detectable_effect, paired_interval, verdict
from ehrsr.study_schema import (
    COST_METRICS,
    OBJECTIVES,
    PER_IMAGE_ATTR,
    PLAN_ATTR,
    QUALITY_METRICS,
    TRIAL,
    load_ablation_study,
)

__all__ = [
    "CUT_SHORT",
    "FINAL_FAILURES",
    "INTERVAL_METHOD",
    "TABLE_METRICS",
    "ablation_runs",
    "controlled_table",
    "delta_table",
    "load_controlled_ablation",
]

CUT_SHORT = "cut_short"  # training hit the ablation budget's deadline: excluded from the deltas
INTERVAL_METHOD = "bootstrap"  # ehrsr.stats.paired_interval's default: the pigeonhole bootstrap
INTERVAL_CONFIDENCE = 0.95
_PER_IMAGE_INDEX = {"psnr": 0, "ssim": 1}  # position in a stored per-image pair (encode_per_image)
_HIGHER_IS_BETTER = {o.metric_key: o.direction == "maximize" for o in OBJECTIVES.values()}

# Outcomes that a rerun with the same seed would repeat: a resumed ablation does not retry them.
FINAL_FAILURES: tuple[str, ...] = ("diverged", "oom", "refused")


def _is_done(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(TRIAL.status) in FINAL_FAILURES


def stored_runs(
    ablation: optuna.Study, reference_trial: int, steps: int | None = None
) -> dict[tuple[str, int], FrozenTrial]:
    """The last finished run of each (variant, seed) for this reference (and training length)."""
    runs: dict[tuple[str, int], FrozenTrial] = {}
    for trial in ablation.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get(TRIAL.reference_trial) != reference_trial or not _is_done(trial):
            continue
        if steps is not None and (attrs.get(TRIAL.train) or {}).get("steps") != steps:
            continue
        runs[(str(attrs.get(TRIAL.variant)), int(attrs.get(TRIAL.seed, -1)))] = trial
    return runs


TABLE_METRICS: tuple[str, ...] = (*QUALITY_METRICS, *COST_METRICS)


def ablation_runs(
    ablation: optuna.Study,
    reference_trial: int | None = None,
    *,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
) -> pd.DataFrame:
    """One row per stored run (the last finished one of each variant and seed) of a reference
    (default: the ablation study's current ``reference_trial``), optionally only ``seeds`` and
    runs trained for ``steps``."""
    if reference_trial is None:
        reference_trial = ablation.user_attrs.get(TRIAL.reference_trial)
    rows = []
    done = stored_runs(ablation, reference_trial, steps)
    # a run cut short by the budget is not done (a resume retries it) but the table says so
    cut = {}
    for trial in ablation.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get(TRIAL.status) != CUT_SHORT or attrs.get(TRIAL.reference_trial) != reference_trial:
            continue
        if steps is not None and (attrs.get(TRIAL.train) or {}).get("steps") != steps:
            continue
        key = (str(attrs.get(TRIAL.variant)), int(attrs.get(TRIAL.seed, -1)))
        if key not in done:
            cut[key] = trial
    for (variant, seed), trial in sorted({**done, **cut}.items()):
        if seeds is not None and seed not in seeds:
            continue
        metrics = trial.user_attrs.get(TRIAL.metrics) or {}
        row = {
            "trial": trial.number,
            "variant": variant,
            "kind": trial.user_attrs.get(TRIAL.kind),
            "module": trial.user_attrs.get(TRIAL.module),
            "seed": seed,
            "status": trial.user_attrs.get(TRIAL.status, trial.state.name.lower()),
            "reason": trial.user_attrs.get(TRIAL.reason),
            "charged_seconds": trial_charge(trial).seconds,
            "per_image": trial.user_attrs.get(PER_IMAGE_ATTR),
        }
        for key in TABLE_METRICS:
            value = metrics.get(key)
            row[key] = math.nan if value is None else float(value)
        rows.append(row)
    columns = ["trial", "variant", "kind", "module", "seed", "status", "reason", "charged_seconds", "per_image",
               *TABLE_METRICS]
    return pd.DataFrame(rows, columns=columns)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    mean = float(np.mean(clean))
    std = float(np.std(clean, ddof=1)) if len(clean) >= 2 else math.nan
    return mean, std


def _per_image(encoded: Any, key: str) -> dict[str, float] | None:
    """One metric of a stored per-image attribute as ``{image: value}``; None when absent/unreadable."""
    if key not in _PER_IMAGE_INDEX or not isinstance(encoded, dict) or not encoded:
        return None
    from ehrsr.metrics import decode_per_image  # lazy: the reports import this module cheaply

    try:
        decoded = decode_per_image(encoded)
    except ValueError:
        return None
    return {name: float("nan") if pair[_PER_IMAGE_INDEX[key]] is None else float(pair[_PER_IMAGE_INDEX[key]])
            for name, pair in decoded.items()}


def delta_table(mine: pd.DataFrame, other: pd.DataFrame, key: str, seeds: Sequence[int]) -> tuple[np.ndarray, str]:
    """Paired deltas of ``key`` (variant minus comparison) for the given ``seeds``, and their unit.

    ``mine`` / ``other``: complete runs indexed by seed. With per-image values stored for every
    run on both sides: a ``(n_seeds, n_images)`` table over the images common to all of them
    (images with a non-finite value anywhere dropped), unit ``"seed x image"``. Otherwise (runs
    stored before per-image values existed, or a metric not stored per image, like LPIPS): the
    per-seed deltas of the means as one row, unit ``"seed"``.
    """
    seeds = list(seeds)
    per_image = []
    for seed in seeds:
        pair = (_per_image(mine.at[seed, "per_image"], key), _per_image(other.at[seed, "per_image"], key))
        if pair[0] is None or pair[1] is None:
            per_image = []
            break
        per_image.append(pair)
    if per_image:
        names = [n for n in per_image[0][0] if all(n in a and n in b for a, b in per_image)]
        table = np.array([[a[n] - b[n] for n in names] for a, b in per_image], dtype=np.float64)
        if table.size:
            table = table[:, np.all(np.isfinite(table), axis=0)]
        if table.size:
            return table, "seed x image"
    diffs = [float(mine.at[s, key]) - float(other.at[s, key]) for s in seeds]
    return np.array([[d for d in diffs if math.isfinite(d)]], dtype=np.float64), "seed"


def _interval_columns(table: np.ndarray, unit: str, key: str) -> dict[str, Any]:
    """Interval, verdict and MDE of a delta table (NaN / "n/a" with fewer than 2 units)."""
    out: dict[str, Any] = {
        f"delta_{key}_low": math.nan, f"delta_{key}_high": math.nan, f"mde_{key}": math.nan,
        f"verdict_{key}": "n/a", f"units_{key}": f"{table.size} x {unit}" if table.size else "none",
    }
    if table.size == 0:
        return out
    try:
        interval = paired_interval(table, method=INTERVAL_METHOD, confidence=INTERVAL_CONFIDENCE)
        mde = minimum_detectable_effect(table)
    except StatsError:  # fewer than 2 units: no interval
        return out
    out[f"delta_{key}_low"], out[f"delta_{key}_high"] = interval.low, interval.high
    out[f"mde_{key}"] = mde
    out[f"verdict_{key}"] = verdict(interval, _HIGHER_IS_BETTER[key])
    return out


def controlled_table(runs: pd.DataFrame, variants: Sequence[Variant]) -> pd.DataFrame:
    """The controlled ablation table from ``ablation_runs`` and the variant plan.

    Per variant: finished runs, absolute means (and std) of every metric, and deltas against its
    comparison (``Variant.compare_to``). Quality deltas are paired by seed (variant seed s minus
    comparison seed s): ``delta_<k>_mean`` / ``_std`` are the mean ± sample std over seeds of the
    per-seed differences; ``delta_<k>_low`` / ``_high`` the 95 % interval of the mean delta over
    (seed, image) pairs (``delta_table``; per seed for runs without per-image values),
    ``verdict_<k>`` and ``mde_<k>`` (docs/statistics.md); ``verdict`` is PSNR's. Cost deltas are
    differences of means (costs do not depend on the seed, except for timing noise). Runs cut
    short by the budget are left out and counted in ``n_cut_short``. A variant marked
    ``same_as`` another uses that one's runs.
    """
    complete = runs[runs["status"] == "complete"] if not runs.empty else runs
    by_name = {v.name: v for v in variants}

    def source(name: str) -> str:
        variant = by_name.get(name)
        return variant.same_as if variant is not None and variant.same_as else name

    def per_seed(name: str) -> pd.DataFrame:
        return complete[complete["variant"] == source(name)].set_index("seed")

    rows = []
    for variant in variants:
        mine = per_seed(variant.name)
        all_runs = runs[runs["variant"] == source(variant.name)] if not runs.empty else runs
        row: dict[str, Any] = {
            "variant": variant.name,
            "kind": variant.kind,
            "module": variant.module,
            "vs": variant.compare_to,
            "same_as": variant.same_as,
            "n_complete": len(mine),
            "n_paired": 0,
            "n_cut_short": int((all_runs["status"] == CUT_SHORT).sum()) if not all_runs.empty else 0,
        }
        failures = all_runs[all_runs["status"] != "complete"] if not all_runs.empty else all_runs
        if variant.refused:
            row["note"] = f"not run: {variant.refused}"
        elif len(mine) == 0 and len(failures):
            row["note"] = "; ".join(sorted({f"{s}: {r}" for s, r in zip(failures["status"], failures["reason"])}))
        elif len(mine) == 0:
            row["note"] = "not run yet (budget or interrupted)"
        else:
            row["note"] = f"same runs as {variant.same_as}" if variant.same_as else ""
        if row["n_cut_short"] and not variant.refused:
            cut = f"{row['n_cut_short']} run(s) cut short by the budget, left out"
            row["note"] = f"{row['note']}; {cut}" if row["note"] else cut
        for key in TABLE_METRICS:
            mean, std = _mean_std(mine[key].tolist()) if len(mine) else (math.nan, math.nan)
            row[f"{key}_mean"] = mean
            row[f"{key}_std"] = std
        other = per_seed(variant.compare_to) if variant.compare_to else None
        for key in TABLE_METRICS:
            row[f"delta_{key}_mean"] = math.nan
            row[f"delta_{key}_std"] = math.nan
        for key in QUALITY_METRICS:
            row.update(_interval_columns(np.empty((1, 0)), "", key))
        if other is not None and len(mine) and len(other):
            paired = sorted(set(mine.index) & set(other.index))
            row["n_paired"] = len(paired)
            for key in QUALITY_METRICS:
                diffs = [float(mine.at[s, key]) - float(other.at[s, key]) for s in paired]
                row[f"delta_{key}_mean"], row[f"delta_{key}_std"] = _mean_std(diffs)
                if paired:
                    row.update(_interval_columns(*delta_table(mine, other, key, paired), key))
            for key in COST_METRICS:
                row[f"delta_{key}_mean"] = _mean_std(mine[key].tolist())[0] - _mean_std(other[key].tolist())[0]
        row["verdict"] = row["verdict_psnr"]
        row["interval"] = f"{INTERVAL_CONFIDENCE:.0%} {INTERVAL_METHOD}"
        rows.append(row)
    return pd.DataFrame(rows)


def load_controlled_ablation(study: optuna.Study) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The controlled table of the ablation study stored beside ``study`` (its current plan), and
    the plan; None when no controlled ablation was ever started."""
    ablation = load_ablation_study(study)
    if ablation is None:
        return None
    plan = ablation.user_attrs.get(PLAN_ATTR)
    if not plan:
        return None
    variants = [Variant.from_dict(v) for v in plan["variants"]]
    runs = ablation_runs(ablation, plan["reference_trial"], seeds=plan.get("seeds"), steps=plan.get("steps"))
    return controlled_table(runs, variants), plan
