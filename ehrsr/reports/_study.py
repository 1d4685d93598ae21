"""Reading a study the way ``docs/study_schema.md`` says the search writes it.

Everything under ``reports/<study>/`` is computed from the Optuna storage alone (DESIGN.md
section 6); this module is the one place that knows the study's user attributes and turns them into
typed values (objectives with their metric keys and directions, the device and input size the
costs were measured at) and into axis labels that state their units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ehrsr.search.objectives import OBJECTIVES

__all__ = [
    "COST_METRICS",
    "METRIC_KEYS",
    "QUALITY_METRICS",
    "ObjectiveInfo",
    "StudyInfo",
    "ablation_study_name",
    "load_ablation_study",
    "metric_info",
    "study_storage",
]

METRIC_KEYS: tuple[str, ...] = (
    "psnr",
    "ssim",
    "lpips",
    "latency_ms",
    "latency_ms_p10",
    "latency_ms_p90",
    "latency_repeats",
    "macs",
    "macs_ptflops",
    "params",
    "params_deploy",
    "peak_memory_mb",
)
"""Keys of ``trial.user_attrs["metrics"]`` (docs/study_schema.md), in table order."""

QUALITY_METRICS: tuple[str, ...] = tuple(o.metric_key for o in OBJECTIVES.values() if o.kind == "quality")
"""Metric keys that measure restoration quality (psnr, ssim, lpips: the y axes of the plots)."""

COST_METRICS: tuple[str, ...] = tuple(o.metric_key for o in OBJECTIVES.values() if o.kind == "cost")
"""Metric keys that measure cost (latency_ms, macs, params_deploy, peak_memory_mb: the x axes)."""


@dataclass(frozen=True)
class ObjectiveInfo:
    """One objective of a study: its name, the metric key it reads, and which way is better."""

    name: str  # objective name as stored in the study ("psnr", "latency", ...)
    metric_key: str  # key in trial.user_attrs["metrics"] ("psnr", "latency_ms", ...)
    maximize: bool
    label: str  # short human name ("PSNR", "latency")
    unit: str  # unit text ("dB (Y channel)", "ms", "" for unit-less)

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    def is_better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b`` in this objective's direction."""
        return a > b if self.maximize else a < b


def _direction_name(direction: Any) -> str:
    name = str(getattr(direction, "name", direction)).lower()
    if name not in ("maximize", "minimize"):
        raise ValueError(f"objective direction must be 'maximize' or 'minimize', got {direction!r}")
    return name


def metric_info(metric_key: str) -> ObjectiveInfo:
    """The ``OBJECTIVES`` entry that reads ``metric_key`` (every metric we plot is an objective)."""
    for objective in OBJECTIVES.values():
        if objective.metric_key == metric_key:
            return ObjectiveInfo(
                objective.name,
                objective.metric_key,
                _direction_name(objective.direction) == "maximize",
                objective.label,
                objective.unit,
            )
    known = ", ".join(o.metric_key for o in OBJECTIVES.values())
    raise ValueError(f"no objective reads metric {metric_key!r}; known metric keys: {known}")


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in (Optuna has no public accessor; the ablation study and the
    report need the same storage to find ``<study>-ablation``)."""
    return study._storage


def ablation_study_name(study_name: str) -> str:
    """Name of the controlled-ablation study kept beside a search study (docs/study_schema.md)."""
    return f"{study_name}-ablation"


def load_ablation_study(study: optuna.Study) -> optuna.Study | None:
    """The ``<study>-ablation`` study in the same storage, or None when it was never created."""
    name = ablation_study_name(study.study_name)
    storage = study_storage(study)
    if name not in optuna.study.get_all_study_names(storage=storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


@dataclass(frozen=True)
class StudyInfo:
    """What a report needs to know about a study besides its trials."""

    name: str
    objectives: tuple[ObjectiveInfo, ...]
    attrs: dict[str, Any] = field(repr=False)  # study.user_attrs as stored

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudyInfo:
        """Read objectives from ``user_attrs["objectives"]`` (else ``metric_names``) and the
        directions from ``study.directions``; unknown objective names raise ``ValueError``."""
        attrs = dict(study.user_attrs)
        directions = list(study.directions)
        names = attrs.get("objectives") or study.metric_names
        if not names:
            raise ValueError(
                f"study {study.study_name!r} names no objectives (neither user_attrs['objectives'] "
                "nor metric_names is set); was it created by ehrsr's search?"
            )
        names = list(names)
        if len(names) != len(directions):
            raise ValueError(
                f"study {study.study_name!r} lists {len(names)} objectives {names} but has "
                f"{len(directions)} directions"
            )
        objectives = []
        for name, direction in zip(names, directions):
            if name not in OBJECTIVES:
                raise ValueError(
                    f"study {study.study_name!r} has objective {name!r}; known objectives: {', '.join(OBJECTIVES)}"
                )
            spec = OBJECTIVES[name]
            objectives.append(
                ObjectiveInfo(name, spec.metric_key, direction == StudyDirection.MAXIMIZE, spec.label, spec.unit)
            )
        return cls(study.study_name, tuple(objectives), attrs)

    # -- what the study says about itself ---------------------------------------------------------
    @property
    def scale(self) -> int:
        task = self.attrs.get("task") or {}
        return int(task.get("scale", 4))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Input shape the search profiled at (docs/study_schema.md ``profile.input_shape``)."""
        profile = self.attrs.get("profile") or {}
        return tuple(int(v) for v in profile.get("input_shape", (1, 3, 256, 256)))

    @property
    def device_name(self) -> str:
        device = self.attrs.get("device") or {}
        return str(device.get("name") or device.get("kind") or "unknown device")

    @property
    def device_kind(self) -> str:
        device = self.attrs.get("device") or {}
        return str(device.get("kind") or "unknown")

    @property
    def conventions(self) -> dict[str, str]:
        return dict(self.attrs.get("conventions") or {})

    @property
    def limits(self) -> dict[str, float | None]:
        return dict(self.attrs.get("limits") or {})

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objectives)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(o.direction for o in self.objectives)

    @property
    def quality_objective(self) -> ObjectiveInfo:
        """The first quality objective of the study (PSNR by default); PSNR when the study
        optimises only costs, as every trial measures it."""
        for objective in self.objectives:
            if objective.metric_key in QUALITY_METRICS:
                return objective
        return metric_info("psnr")

    def shape_text(self) -> str:
        return "x".join(str(v) for v in self.input_shape)

    def axis_label(self, metric_key: str) -> str:
        """Axis label naming the unit and where/at what size the number was measured."""
        profile = self.attrs.get("profile") or {}
        dtype = profile.get("dtype", "float32")
        threads = profile.get("threads")
        where = self.device_name
        if self.device_kind == "cpu" and threads:
            where += f", {threads} threads"
        labels = {
            "psnr": "PSNR (dB, Y channel)",
            "ssim": "SSIM (Y channel)",
            "lpips": "LPIPS (lower is better)",
            "latency_ms": f"latency (ms, {where}, {dtype}, {self.shape_text()} input)",
            "macs": f"MACs (fvcore, deploy form, {self.shape_text()} input)",
            "params_deploy": "parameters (deploy form)",
            "params": "parameters (training form)",
            "peak_memory_mb": f"peak memory (MiB, {where}, {self.shape_text()} input)",
        }
        if metric_key in labels:
            return labels[metric_key]
        info = metric_info(metric_key)
        return f"{info.label} ({info.unit})" if info.unit else info.label


# ---------------------------------------------------------------------------------------------
# per-trial helpers


def trial_status(trial: FrozenTrial) -> str:
    """``user_attrs["status"]`` when the search recorded it, else derived from the state."""
    status = trial.user_attrs.get("status")
    if status:
        return str(status)
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
        TrialState.FAIL: "failed",
    }[trial.state]


def is_feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: feasible when every recorded constraint value is <= 0 (none recorded: feasible)."""
    return all(value <= 0.0 for value in trial.constraints.values())


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def objective_values(trial: FrozenTrial, objectives: Sequence[ObjectiveInfo]) -> list[float] | None:
    """The trial's objective values (COMPLETE trials), or None."""
    if trial.state != TrialState.COMPLETE or trial.values is None:
        return None
    if len(trial.values) != len(objectives):
        return None
    return list(trial.values)
