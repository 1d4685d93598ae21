"""Tables of a study: every trial (``trials.csv``) and the Pareto front (``pareto.csv``), and the
knee of the front (the default reference of the controlled ablation).

The front is taken from Optuna (``study.best_trials``: finished, feasible when the study has
constraints, non-dominated over the study's objectives) rather than re-derived, so the report and
Optuna can never disagree about it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from ehrsr.config import MODULE_TOGGLES
from ehrsr.search.pareto import comparable_trials, front_trials, knee_point, knee_trial, trial_steps
from ehrsr.search.ranking import check_line, study_verdict
from ehrsr.study_schema import (
    DASH,
    METRIC_KEYS,
    TRIAL,
    Objective,
    StudyInfo,
    fidelity_checks,
    is_feasible,
    objective_values,
    trial_status,
)

__all__ = [
    "config_summary",
    "knee_point",
    "knee_trial",
    "module_settings",
    "pareto_table",
    "trial_row",
    "trials_table",
    "write_trials_csv",
]

SECONDS_KEYS: tuple[str, ...] = ("train", "eval", "profile", "total")


def _flatten(data: Any, prefix: str, out: dict[str, Any]) -> None:
    """Nested dicts to dotted keys; lists become JSON text so they fit one CSV cell."""
    if isinstance(data, dict):
        for key, value in data.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(data, (list, tuple)):
        out[prefix] = json.dumps(list(data))
    else:
        out[prefix] = data


def trial_row(trial: FrozenTrial, objectives: tuple[Objective, ...]) -> dict[str, Any]:
    """One row of ``trials.csv``: identity, state, feasibility, objective values, every metric,
    timings, the search parameters (``param.*``), training settings (``train.*``) and the
    configuration (``config.*``)."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "status": trial_status(trial),
        "reason": attrs.get(TRIAL.reason),
        "reference": attrs.get(TRIAL.reference),
        "feasible": is_feasible(trial),
    }
    for key, value in sorted(trial.constraints.items()):
        row[f"constraint.{key}"] = value
    values = objective_values(trial, objectives)
    for index, objective in enumerate(objectives):
        row[f"value.{objective.name}"] = values[index] if values is not None else np.nan
    metrics = attrs.get(TRIAL.metrics) or {}
    for key in METRIC_KEYS:
        value = metrics.get(key)
        row[key] = np.nan if value is None else value
    seconds = attrs.get(TRIAL.seconds) or {}
    for key in SECONDS_KEYS:
        value = seconds.get(key)
        row[f"seconds.{key}"] = np.nan if value is None else value
    row["charged_seconds"] = attrs.get(TRIAL.charged_seconds, np.nan)
    row["steps_done"] = attrs.get(TRIAL.steps_done, np.nan)
    row["device_name"] = attrs.get(TRIAL.device_name)
    row["weights"] = attrs.get(TRIAL.weights)
    row["datetime_start"] = trial.datetime_start.isoformat() if trial.datetime_start else None
    row["duration_s"] = trial.duration.total_seconds() if trial.duration is not None else np.nan
    for name, value in sorted(trial.params.items()):
        row[f"param.{name}"] = value
    _flatten(attrs.get(TRIAL.train) or {}, "train", row)
    _flatten(attrs.get(TRIAL.config) or {}, "config", row)
    return row


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial of the study, one row each, ordered by trial number (``trials.csv``)."""
    objectives = StudyInfo.from_study(study).objectives
    rows = [trial_row(t, objectives) for t in study.get_trials(deepcopy=False)]
    if not rows:
        return pd.DataFrame(columns=_empty_columns(objectives))
    # the ranking proxy of each trial (its final validation PSNR after its steps), the latest verdict
    # on how well that ranks like long training, and whether it is on the fronts' footing
    checks = fidelity_checks(study)
    verdicts = {steps: check_line(study_verdict([c for c in checks if c.trial_steps == steps]))
                for steps in {c.trial_steps for c in checks}}  # per length: the check it stands on
    comparable = {t.number for t in comparable_trials(study)}
    for trial, row in zip(study.get_trials(deepcopy=False), rows):
        steps = trial_steps(trial)
        row["proxy"] = f"final PSNR after {steps} steps" if steps is not None else None
        row["proxy_fidelity"] = verdicts.get(steps, "no verdict for this length") if steps is not None else None
        row["comparable"] = trial.number in comparable
    table = pd.DataFrame(rows)
    # columns that only some trials have (constraints, params, config) are filled with NaN by pandas
    return table.sort_values("number").reset_index(drop=True)


def write_trials_csv(study: optuna.Study, path: str | Path) -> Path:
    """Write ``trials_table(study)`` to ``path`` (the search refreshes ``trials.csv`` after every
    trial with this); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trials_table(study).to_csv(path, index=False)
    return path


def _empty_columns(objectives: tuple[Objective, ...]) -> list[str]:
    return [
        "number",
        "state",
        "status",
        "reason",
        "reference",
        "feasible",
        *(f"value.{o.name}" for o in objectives),
        *METRIC_KEYS,
        *(f"seconds.{k}" for k in SECONDS_KEYS),
        "charged_seconds",
        "steps_done",
    ]


def _config_value(row: pd.Series, key: str) -> Any:
    value = row.get(f"config.{key}")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _is_on(value: Any) -> bool:
    return value in (True, "True", "true")


def config_summary(row: pd.Series) -> str:
    """The short form of a trial's configuration, as the README writes it: 'w16 L2 T2 naf: wab+moe'
    (width, MSG levels, trunk blocks, block type: the modules switched on), from the ``config.*``
    columns of a ``trials_table`` row; a dash for a trial without a configuration."""
    if _config_value(row, "width") is None:
        return DASH
    modules = [m for m in MODULE_TOGGLES if _is_on(_config_value(row, f"{m}.enabled"))]
    return (
        f"w{int(_config_value(row, 'width'))} L{int(_config_value(row, 'msg.levels') or 0)} "
        f"T{int(_config_value(row, 'trunk_blocks') or 0)} "
        f"{_config_value(row, 'block_type')}: {'+'.join(modules) or 'conv-only'}"
    )


def module_settings(row: pd.Series) -> list[str]:
    """Each switched-on module with its settings, e.g. 'wab (window_size=8, heads=2, shift=True)',
    from the ``config.*`` columns of a ``trials_table`` row (trunk order)."""
    out = []
    for module in MODULE_TOGGLES:
        if not _is_on(_config_value(row, f"{module}.enabled")):
            continue
        prefix = f"config.{module}."
        settings = []
        for column in row.index:
            name = str(column)
            if not name.startswith(prefix) or name == f"{prefix}enabled":
                continue
            value = _config_value(row, name[len("config."):])
            if value is None:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 8.0 in a column that has NaN elsewhere
            settings.append(f"{name[len(prefix):]}={value}")
        out.append(f"{module} ({', '.join(settings)})" if settings else module)
    return out


def pareto_table(study: optuna.Study, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's Pareto front (``search.pareto.front_trials``), best first in the first objective, with
    the same columns as ``trials_table`` plus ``knee`` (True on the knee point)."""
    if trials is None:
        trials = trials_table(study)
    info = StudyInfo.from_study(study)
    front = front_trials(study)
    numbers = [t.number for t in front]
    table = trials[trials["number"].isin(numbers)].copy()
    first = f"value.{info.objectives[0].name}"
    table = table.sort_values(
        [first, "number"], ascending=[not info.objectives[0].maximize, True]
    ).reset_index(drop=True)
    knee = knee_trial(study, front)
    table["knee"] = table["number"] == (knee.number if knee is not None else -1)
    return table
