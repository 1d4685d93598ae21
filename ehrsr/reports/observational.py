"""Observational ablation: what the trials the search already ran say about each module.

For each module toggle, the best and median of every objective among finished trials with the
module on and with it off (``observational_table``), and Optuna's parameter importance per
objective (``param_importances``: PED-ANOVA, Watanabe et al., IJCAI 2023, Optuna 5's default
evaluator). These are correlations over a sampled population, not causal effects: other
parameters vary together with the toggles. The controlled ablation, which retrains, is
``ehrsr.ablation``. Both read the study only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import TrialState

from ehrsr.config import MODULE_TOGGLES
from ehrsr.study_schema import TRIAL, Objective, StudyInfo

__all__ = ["observational_table", "param_importances"]


def observational_table(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """Per module toggle and objective: trial counts, best and median among finished (COMPLETE)
    trials with the module on and off, and the difference of the medians (on - off).

    Computed from ``trials_table`` (``trials.csv``): a trial's toggle is its
    ``config.<module>.enabled`` column, an objective's value its metric column (for finished
    trials it equals the stored objective value). Trials without a configuration are left out.
    """
    rows = []
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials.iloc[0:0]
    for module in MODULE_TOGGLES:
        column = f"config.{module}.enabled"
        flags = done[column] if column in done else pd.Series([np.nan] * len(done), index=done.index)
        known = flags.notna()
        on = done[known & (flags.astype(object) == True)]  # noqa: E712 (object column of bools)
        off = done[known & (flags.astype(object) == False)]  # noqa: E712
        for objective in objectives:
            key = objective.metric_key
            on_values = pd.to_numeric(on[key], errors="coerce").dropna() if key in on else pd.Series(dtype=float)
            off_values = pd.to_numeric(off[key], errors="coerce").dropna() if key in off else pd.Series(dtype=float)

            rows.append(
                {
                    "module": module,
                    "objective": objective.name,
                    "metric": key,
                    "direction": objective.direction,
                    "n_on": int(on_values.size),
                    "n_off": int(off_values.size),
                    "best_on": _best(on_values, objective.maximize),
                    "best_off": _best(off_values, objective.maximize),
                    "median_on": _median(on_values),
                    "median_off": _median(off_values),
                    "median_on_minus_off": _median(on_values) - _median(off_values),
                }
            )
    return pd.DataFrame(rows)


def _best(values: pd.Series, maximize: bool) -> float:
    if values.empty:
        return math.nan
    return float(values.max() if maximize else values.min())


def _median(values: pd.Series) -> float:
    return float(values.median()) if not values.empty else math.nan


def param_importances(study: optuna.Study) -> pd.DataFrame:
    """Parameter importance per objective (columns) with PED-ANOVA, Optuna 5's default evaluator.

    PED-ANOVA ranks how much each parameter's distribution among the top 10 % of finished trials
    differs from its distribution among all of them; it treats lower target values as better, so
    maximised objectives are negated. Multi-objective studies get one more column, ``pareto``:
    the importance for reaching the Pareto front (Optuna's multi-objective mode, ``target=None``).
    Each column sums to 1. Empty when fewer than two trials finished or no parameter was searched.

    Cost objectives (latency, MACs, parameters, memory) are properties of the architecture, so
    their columns consider architecture parameters only: a training parameter such as ``lr`` can
    only look important for them through the sampler's correlations, never through cause.
    """
    info = StudyInfo.from_study(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = sorted({name for t in finished for name in t.params})
    if len(finished) < 2 or not params:
        return pd.DataFrame()
    training = {name for t in finished for name in t.params if name in (t.user_attrs.get(TRIAL.train) or {})}
    architecture = [name for name in params if name not in training]
    columns: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        # PED-ANOVA warns that it treats low targets as better (we negate maximised objectives)
        # and that few trials give equal importances (the report says how many trials there are)
        warnings.simplefilter("ignore")
        for index, objective in enumerate(info.objectives):
            sign = -1.0 if objective.maximize else 1.0
            is_cost = _is_cost(objective)
            columns[objective.name] = optuna.importance.get_param_importances(
                study,
                evaluator=PedAnovaImportanceEvaluator(),
                params=architecture if is_cost and architecture else None,
                target=lambda t, i=index, s=sign: s * t.values[i],
            )
        if len(info.objectives) > 1:
            columns["pareto"] = optuna.importance.get_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator()
            )
    table = pd.DataFrame(columns).reindex(params).fillna(0.0)
    table.index.name = "param"
    return table.loc[table.sum(axis=1).sort_values(ascending=False, kind="stable").index]


def _is_cost(objective: Objective) -> bool:
    return objective.kind == "cost"
