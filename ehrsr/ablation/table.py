"""The controlled ablation table, computed from the ``<study>-ablation`` study alone.

Each run is one trial of the ablation study (docs/study_schema.md). Per variant the table gives
the change in quality (mean ± sample std over seeds of the per-seed differences with the
comparison: the reference for leave-one-out rows and for the baseline row, the baseline for
add-one-in rows) and in cost (MACs, parameters, latency, memory). Read-only: the reports use it.
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
from ehrsr.study_schema import COST_METRICS, QUALITY_METRICS, load_ablation_study

__all__ = ["FINAL_FAILURES", "TABLE_METRICS", "ablation_runs", "controlled_table", "load_controlled_ablation"]

# Outcomes that a rerun with the same seed would repeat: a resumed ablation does not retry them.
FINAL_FAILURES: tuple[str, ...] = ("diverged", "oom", "refused")


def _is_done(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("status") in FINAL_FAILURES


def stored_runs(
    ablation: optuna.Study, reference_trial: int, steps: int | None = None
) -> dict[tuple[str, int], FrozenTrial]:
    """The last finished run of each (variant, seed) for this reference (and training length)."""
    runs: dict[tuple[str, int], FrozenTrial] = {}
    for trial in ablation.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get("reference_trial") != reference_trial or not _is_done(trial):
            continue
        if steps is not None and (attrs.get("train") or {}).get("steps") != steps:
            continue
        runs[(str(attrs.get("variant")), int(attrs.get("seed", -1)))] = trial
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
        reference_trial = ablation.user_attrs.get("reference_trial")
    rows = []
    for (variant, seed), trial in sorted(stored_runs(ablation, reference_trial, steps).items()):
        if seeds is not None and seed not in seeds:
            continue
        metrics = trial.user_attrs.get("metrics") or {}
        row = {
            "trial": trial.number,
            "variant": variant,
            "kind": trial.user_attrs.get("kind"),
            "module": trial.user_attrs.get("module"),
            "seed": seed,
            "status": trial.user_attrs.get("status", trial.state.name.lower()),
            "reason": trial.user_attrs.get("reason"),
            "charged_seconds": trial_charge(trial).seconds,
        }
        for key in TABLE_METRICS:
            value = metrics.get(key)
            row[key] = math.nan if value is None else float(value)
        rows.append(row)
    columns = ["trial", "variant", "kind", "module", "seed", "status", "reason", "charged_seconds", *TABLE_METRICS]
    return pd.DataFrame(rows, columns=columns)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    mean = float(np.mean(clean))
    std = float(np.std(clean, ddof=1)) if len(clean) >= 2 else math.nan
    return mean, std


def controlled_table(runs: pd.DataFrame, variants: Sequence[Variant]) -> pd.DataFrame:
    """The controlled ablation table from ``ablation_runs`` and the variant plan.

    Per variant: finished runs, absolute means (and std) of every metric, and deltas against its
    comparison (``Variant.compare_to``). Quality deltas are paired by seed (variant seed s minus
    comparison seed s), then averaged: mean ± sample std of the paired differences. Cost deltas
    are differences of means (costs do not depend on the seed, except for timing noise).
    A variant marked ``same_as`` another uses that one's runs.
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
        for key in TABLE_METRICS:
            mean, std = _mean_std(mine[key].tolist()) if len(mine) else (math.nan, math.nan)
            row[f"{key}_mean"] = mean
            row[f"{key}_std"] = std
        other = per_seed(variant.compare_to) if variant.compare_to else None
        for key in TABLE_METRICS:
            row[f"delta_{key}_mean"] = math.nan
            row[f"delta_{key}_std"] = math.nan
        if other is not None and len(mine) and len(other):
            paired = sorted(set(mine.index) & set(other.index))
            row["n_paired"] = len(paired)
            for key in QUALITY_METRICS:
                diffs = [float(mine.at[s, key]) - float(other.at[s, key]) for s in paired]
                row[f"delta_{key}_mean"], row[f"delta_{key}_std"] = _mean_std(diffs)
            for key in COST_METRICS:
                row[f"delta_{key}_mean"] = _mean_std(mine[key].tolist())[0] - _mean_std(other[key].tolist())[0]
        rows.append(row)
    return pd.DataFrame(rows)


def load_controlled_ablation(study: optuna.Study) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The controlled table of the ablation study stored beside ``study`` (its current plan), and
    the plan; None when no controlled ablation was ever started."""
    ablation = load_ablation_study(study)
    if ablation is None:
        return None
    plan = ablation.user_attrs.get("plan")
    if not plan:
        return None
    variants = [Variant.from_dict(v) for v in plan["variants"]]
    runs = ablation_runs(ablation, plan["reference_trial"], seeds=plan.get("seeds"), steps=plan.get("steps"))
    return controlled_table(runs, variants), plan
