"""The search: spaces, budget, multi-fidelity early stopping, the study driver and its storage.

The building blocks are re-exported here: search spaces (YAML -> Optuna parameters ->
EHRSRConfig), budget accounting, MO-ASHA early stopping and the Pareto maths they share
(docs/search_spaces.md, docs/budget.md, docs/early_stopping.md). The driver lives in
``ehrsr.search.driver``; ``ehrsr.search.record`` records every run.
"""

from __future__ import annotations

from ehrsr.search.asha import MOASHA, Decision, record_rung, rung_steps, rung_values
from ehrsr.search.budget import Budget, BudgetError, Spent, check_budget_device, parse_budget
from ehrsr.search.pareto import crowding_distance, hypervolume, hypervolume_2d, non_dominated_sort
from ehrsr.search.space import Fidelity, SampledConfig, SearchSpace, SearchSpaceError, load_space

__all__ = [
    "MOASHA",
    "Budget",
    "BudgetError",
    "Decision",
    "Fidelity",
    "SampledConfig",
    "SearchSpace",
    "SearchSpaceError",
    "Spent",
    "check_budget_device",
    "crowding_distance",
    "hypervolume",
    "hypervolume_2d",
    "load_space",
    "non_dominated_sort",
    "parse_budget",
    "record_rung",
    "rung_steps",
    "rung_values",
]
