"""Reports of a search: Pareto fronts, ablation tables, parameter importance, the listing of
deployment picks, ``report.md`` and ``report.html``, the same as one interactive page
(docs/reports.md).

Everything is read from the Optuna storage alone (``docs/study_schema.md``): this package trains
nothing, profiles nothing and charges nothing. The controlled ablation that retrains is
``ehrsr.ablation``; deployment picks are ``ehrsr.deploy``; ``ehrsr.pipeline`` runs them in order.
"""

from __future__ import annotations

from ehrsr.reports.observational import observational_table, param_importances
from ehrsr.reports.pareto import knee_point, knee_trial, pareto_table, trials_table, write_trials_csv
from ehrsr.reports.plots import (
    ImportancePlotData,
    ParetoPlotData,
    importance_plot_data,
    pareto_plot_data,
    render_importance_plot,
    render_pareto_plot,
)
from ehrsr.reports.report import write_report

__all__ = [
    "ImportancePlotData",
    "ParetoPlotData",
    "importance_plot_data",
    "knee_point",
    "knee_trial",
    "observational_table",
    "param_importances",
    "pareto_plot_data",
    "pareto_table",
    "render_importance_plot",
    "render_pareto_plot",
    "trials_table",
    "write_report",
    "write_trials_csv",
]
