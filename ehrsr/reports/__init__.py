"""Reports of a search: Pareto fronts, ablation tables, parameter importance, deployment picks
(DESIGN.md section 6). Everything is computed from the Optuna storage alone
(``docs/study_schema.md``); ``docs/reports.md`` describes every file and number.
"""

from __future__ import annotations

from ehrsr.reports.ablation import (
    AblationError,
    AblationResult,
    Variant,
    ablation_runs,
    build_variants,
    controlled_table,
    load_controlled_ablation,
    module_settings_from_space,
    observational_table,
    param_importances,
    run_controlled_ablation,
)
from ehrsr.reports.deploy import (
    DEVICES_PATH,
    DeploymentError,
    DeploymentPick,
    DeviceProfile,
    DeviceProfileError,
    MeasuredCandidate,
    check_device_available,
    choose_candidate,
    export_onnx,
    load_deployed_model,
    load_device_profiles,
    load_trained_model,
    pick_deployment,
    profiles_for_device,
)
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
    "DEVICES_PATH",
    "AblationError",
    "AblationResult",
    "DeploymentError",
    "DeploymentPick",
    "DeviceProfile",
    "DeviceProfileError",
    "ImportancePlotData",
    "MeasuredCandidate",
    "ParetoPlotData",
    "Variant",
    "ablation_runs",
    "build_variants",
    "check_device_available",
    "choose_candidate",
    "controlled_table",
    "export_onnx",
    "importance_plot_data",
    "knee_point",
    "knee_trial",
    "load_controlled_ablation",
    "load_deployed_model",
    "load_device_profiles",
    "load_trained_model",
    "module_settings_from_space",
    "observational_table",
    "param_importances",
    "pareto_plot_data",
    "pareto_table",
    "pick_deployment",
    "profiles_for_device",
    "render_importance_plot",
    "render_pareto_plot",
    "run_controlled_ablation",
    "trials_table",
    "write_report",
    "write_trials_csv",
]
