"""What a study stores, named in one place (``docs/study_schema.md``).

The search writes, and the ablation, the deployment picks and the reports read, an Optuna study
whose user attributes follow ``docs/study_schema.md``. This module is the only place that spells
those names: the objectives (name, metric key, direction, label, unit, quality or cost), the
metric keys and the cost / quality key lists, the metric labels and number formats (engineering
units: K, M, G, T as MACs and parameter counts are quoted), the measuring conventions text, the
ablation study name rule, and ``StudyInfo``, the typed reading of a study's attributes.
Everything else imports these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "BASELINE_ATTR",
    "BUDGET_ATTR",
    "CANARY_ATTR",
    "CONVENTIONS_ATTR",
    "COST_KEYS",
    "COST_METRICS",
    "COST_TABLE_ORDER",
    "DASH",
    "DEFAULT_OBJECTIVES",
    "DEVICE_LATENCY_PREFIX",
    "FIDELITY_CHECKS_ATTR",
    "LATENCY_MODELS_ATTR",
    "LATENCY_SOURCES_ATTR",
    "METRIC_KEYS",
    "OBJECTIVES",
    "PICK_MEASURED_KEYS",
    "PLAN_ATTR",
    "QUALITY_METRICS",
    "RECORD_VERSION_ATTR",
    "REUSED_COST_REQUIRES",
    "STEPS_SCALE_ATTR",
    "STUDY",
    "STUDY_ATTRS",
    "TRIAL",
    "TRIAL_ATTRS",
    "CostLimits",
    "DataRecord",
    "DeviceRecord",
    "EarlyStoppingRecord",
    "FidelityCheck",
    "Objective",
    "ProfileRecord",
    "RecordError",
    "SharesRecord",
    "SpaceRecord",
    "StudyInfo",
    "StudyRecord",
    "TrialKeys",
    "ablation_study_name",
    "baselines_off",
    "baselines_study_name",
    "conventions",
    "device_latency_profile",
    "fidelity_checks",
    "fidelity_study_name",
    "finite",
    "format_metric",
    "format_si",
    "is_count",
    "is_feasible",
    "load_ablation_study",
    "load_side_study",
    "metric_header",
    "metric_info",
    "metric_label",
    "objective_values",
    "parse_si",
    "resolve_objective",
    "rung_record_attr",
    "steps_scale",
    "study_storage",
    "train_command",
    "trial_status",
]

# ---------------------------------------------------------------------------------------------
# attribute names (docs/study_schema.md)


TRIAL_ATTRS: tuple[str, ...] = (
    "status", "reason", "config", "train", "metrics", "seconds", "steps_done", "weights", "device_name",
    "cost_from_trial", "heartbeat", "device_kind", "n_devices", "charged_seconds", "reference",
    # ablation runs only
    "variant", "kind", "module", "seed", "reference_trial",
    # per-device latency models (docs/latency_models.md)
    "latency_sources", "canary",
    # baseline runs (<study>-baselines) only
    "baseline", "label", "size_class", "bicubic_skip",
    # proxy-fidelity runs (<study>-fidelity) only
    "source_trial", "brief_values", "brief_steps", "factor",
)
"""Keys of ``trial.user_attrs`` (plus ``rung_<i>``, one per MO-ASHA rung reached)."""


# ---------------------------------------------------------------------------------------------
# the study record: everything a study is created with


class RecordError(ValueError):
    """A stored or given study record that does not fit its dataclass (unknown or missing keys,
    wrong types); the message names the field."""


def _strict(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from ``data``: unknown keys are an error, as in
    ``TrainSettings.from_dict``; missing keys take the field's default (an error without one)."""
    if not isinstance(data, dict):
        raise RecordError(f"study record {where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise RecordError(f"study record {where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; valid: {', '.join(names)}")
    missing = [f.name for f in fields(cls) if f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise RecordError(f"study record {where}: missing {', '.join(missing)}")
    return {k: data[k] for k in names if k in data}


@dataclass(frozen=True)
class CostLimits:
    """Caps on a configuration's cost: params and MACs are checked before training, latency and
    memory measured (``--max-params``, ``--max-macs``, ``--max-latency-ms``, ``--max-memory-mb``)."""

    max_params: float | None = None
    max_macs: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CostLimits:
        return cls(**_strict(cls, data or {}, "limits"))

    @property
    def measured(self) -> bool:
        """Whether a limit is measured after training (latency or memory: Optuna constraints)."""
        return self.max_latency_ms is not None or self.max_memory_mb is not None

    def refusal(self, params_deploy: int, macs: int) -> str | None:
        """Why a configuration is refused before training, or None."""
        if self.max_params is not None and params_deploy > self.max_params:
            return f"params {format_si(params_deploy)} > --max-params {format_si(self.max_params)}"
        if self.max_macs is not None and macs > self.max_macs:
            return f"MACs {format_si(macs)} > --max-macs {format_si(self.max_macs)}"
        return None

    def constraints(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Optuna constraint values (measured - limit; feasible when <= 0) for the measured limits."""
        out = {}
        if self.max_latency_ms is not None:
            out["latency_ms"] = float(metrics["latency_ms"]) - self.max_latency_ms
        if self.max_memory_mb is not None:
            out["peak_memory_mb"] = float(metrics["peak_memory_mb"]) - self.max_memory_mb
        return out


@dataclass(frozen=True)
class SpaceRecord:
    """The search space a study samples: its name, the file it came from and its full text (what
    is compared on resume)."""

    name: str
    path: str | None
    yaml: str


@dataclass(frozen=True)
class DataRecord:
    """The HR image folders (None: the built-in scikit-image sample images)."""

    train: str | None
    val: str | None

    @property
    def builtin(self) -> bool:
        return self.train is None and self.val is None


@dataclass(frozen=True)
class DeviceRecord:
    """Where the trials run: the device kind and the name of the machine's device (the name is
    shown, not compared: workers on several machines of one kind share a study)."""

    kind: str  # "cpu" or "cuda" (``cuda:N`` picks a GPU of that kind; the index may change)
    name: str


@dataclass(frozen=True)
class ProfileRecord:
    """How cost is measured: LR input shape, dtype, CPU threads (training and timing) and the
    seconds of timed passes per latency measurement."""

    input_shape: tuple[int, ...]
    dtype: str
    threads: int | None  # a number on the CPU (the search resolves the default); None on CUDA
    seconds: float


@dataclass(frozen=True)
class EarlyStoppingRecord:
    """MO-ASHA (docs/early_stopping.md): on or off, and the rungs of the space's fidelity."""

    enabled: bool
    rung_steps: tuple[int, ...]
    eta: int


@dataclass(frozen=True)
class SharesRecord:
    """What follows the search, and the share of a time budget each step is given."""

    ablation: float  # --ablation-share
    ablation_seeds: int | str  # --ablation-seeds: a number or "auto"
    baselines: str | None  # --baselines: None = the default set, "none" = off, else a comma list
    baselines_share: float
    fidelity: float  # --fidelity-share
    fidelity_configs: int
    fidelity_factor: float

    @property
    def baselines_off(self) -> bool:
        return baselines_off(self.baselines)

    @property
    def reserved(self) -> float:
        """Share of a time budget kept from the search for the steps after it."""
        return self.ablation + (0.0 if self.baselines_off else self.baselines_share) + self.fidelity


def baselines_off(text: str | None) -> bool:
    """Whether ``--baselines`` text turns the baselines off (``none``, any case): the one place that
    reads that word; ``ehrsr.ablation.baselines.parse_baselines`` reads the rest of the option."""
    return text is not None and text.strip().lower() == "none"


_NESTED: dict[str, type] = {
    "space": SpaceRecord, "data": DataRecord, "device": DeviceRecord, "profile": ProfileRecord,
    "limits": CostLimits, "early_stopping": EarlyStoppingRecord, "shares": SharesRecord,
}
_TUPLES = {"objectives", "device_latency", "input_shape", "rung_steps"}


@dataclass(frozen=True)
class StudyRecord:
    """Everything a study is created with (docs/study_schema.md, "The study record").

    Stored as the study's user attributes, one per field (``to_attrs``), with ``record_version``
    written last. Every later process (a resume, a joining worker, the ablation, baselines and
    fidelity steps, ``deploy`` and ``report``) reads it back with ``from_attrs`` and runs with it;
    a run may change only ``RUN_SETTINGS`` (budget, workers, verbosity, output and locations).
    """

    ehrsr_version: str
    objectives: tuple[str, ...]
    space: SpaceRecord
    task: dict[str, Any]  # ehrsr.data.TaskConfig.to_dict(), every default resolved
    data: DataRecord
    device: DeviceRecord
    profile: ProfileRecord
    limits: CostLimits
    device_latency: tuple[dict[str, Any], ...]  # ehrsr.search.device_latency.DeviceLatency.to_dict() each
    devices_file: str | None  # the device profiles file they came from (None: the shipped one)
    early_stopping: EarlyStoppingRecord
    shares: SharesRecord
    sampler: str
    seed: int
    allow_repeats: bool
    cache_dir: str | None
    train_settings_version: int
    record_version: int = 1

    @property
    def crop_border(self) -> int:
        scale = int(self.task.get("scale", 4))
        return scale if scale > 1 else 0

    def conventions(self) -> dict[str, str]:
        """The measuring conventions text of this study (``conventions`` attribute)."""
        return conventions(profile_shape=self.profile.input_shape, crop_border=self.crop_border,
                           profile_dtype=self.profile.dtype, device_name=self.device.name,
                           profile_seconds=self.profile.seconds)

    def latency_models(self) -> dict[str, dict[str, Any]]:
        """Per device profile: its latency model file, target, stored accuracy and limit
        (``LATENCY_MODELS_ATTR``, what the reports show)."""
        return {d["name"]: {"file": d["model_path"], "target": d["target"], "accuracy": d.get("accuracy"),
                            "max_latency_ms": d.get("max_latency_ms")} for d in self.device_latency}

    # -- storage ----------------------------------------------------------------------------------
    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able data, field by field (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_attrs(self) -> dict[str, Any]:
        """The study user attributes that store this record, ``record_version`` last (a joining
        worker waits for it), plus the derived ``conventions`` and ``latency_models`` texts."""
        plain = self.to_plain()
        version = plain.pop("record_version")
        return {**plain, CONVENTIONS_ATTR: self.conventions(), LATENCY_MODELS_ATTR: self.latency_models(),
                RECORD_VERSION_ATTR: version}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> StudyRecord:
        """The record from ``to_plain`` data; unknown or missing keys raise ``RecordError``."""
        values = _strict(cls, data, "")
        for name, nested in _NESTED.items():
            if name in values:
                inner = _strict(nested, values[name], name)
                for key in _TUPLES & set(inner):
                    inner[key] = tuple(inner[key])
                values[name] = nested(**inner)
        for key in _TUPLES & set(values):
            values[key] = tuple(values[key])
        if not isinstance(values.get("task"), dict):
            raise RecordError("study record task: expected a mapping")
        return cls(**values)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StudyRecord:
        """The record stored in a study's user attributes (``RecordError`` when it has none or a
        malformed one)."""
        if RECORD_VERSION_ATTR not in attrs:
            raise RecordError("the study has no stored study record (it was made by an earlier ehrsr)")
        return cls.from_plain({f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudyRecord:
        return cls.from_attrs(dict(study.user_attrs))

    def flat(self) -> dict[str, Any]:
        """``{"profile.threads": 2, ...}``: every leaf field by dotted name (for comparisons)."""
        out: dict[str, Any] = {}
        for key, value in self.to_plain().items():
            if isinstance(value, dict) and (key in _NESTED or key == "task"):
                for inner, item in value.items():
                    out[f"{key}.{inner}"] = item
            else:
                out[key] = value
        return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


LATENCY_MODELS_ATTR = "latency_models"
"""Study attribute: per device profile, the latency model file, its target and stored accuracy."""

RECORD_VERSION_ATTR = "record_version"
"""Study attribute written last when a study is created: its record is complete."""

CONVENTIONS_ATTR = "conventions"
"""Study attribute: the measuring conventions text (derived from the record when it is written)."""

BUDGET_ATTR = "budget"
"""Study attribute: the budget text of the latest run that trained (a run may extend it)."""

BASELINE_ATTR = "baseline"
"""Study attribute: the quality of the trivial baseline (bicubic, or the degraded input)."""


@dataclass(frozen=True)
class TrialKeys:
    """Keys of ``trial.user_attrs`` (docs/study_schema.md); ``TRIAL`` is the one instance, and
    code writes ``trial.user_attrs[TRIAL.metrics]`` instead of spelling a key again."""

    # every recorded run: search trials, ablation, baselines and fidelity runs
    status: str = "status"
    reason: str = "reason"
    config: str = "config"
    train: str = "train"
    metrics: str = "metrics"
    seconds: str = "seconds"
    steps_done: str = "steps_done"
    per_image: str = "per_image"
    weights: str = "weights"
    device_name: str = "device_name"
    device_kind: str = "device_kind"
    n_devices: str = "n_devices"
    charged_seconds: str = "charged_seconds"
    heartbeat: str = "heartbeat"
    worker: str = "worker"
    refused: str = "refused"
    latency_sources: str = "latency_sources"
    canary: str = "canary"
    loss_history: str = "loss_history"  # [[step, mean training loss since the previous entry], ...]
    # search trials
    reference: str = "reference"  # an enqueued reference configuration (conv-only, all-modules)
    repeat_of: str = "repeat_of"
    cost_from_trial: str = "cost_from_trial"
    # ablation runs (<study>-ablation)
    variant: str = "variant"
    kind: str = "kind"
    module: str = "module"
    seed: str = "seed"
    reference_trial: str = "reference_trial"
    train_seconds: str = "train_seconds"
    # baseline runs (<study>-baselines)
    baseline: str = "baseline"
    label: str = "label"
    size_class: str = "size_class"
    bicubic_skip: str = "bicubic_skip"
    # proxy-fidelity runs (<study>-fidelity)
    source_trial: str = "source_trial"
    factor: str = "factor"
    brief_steps: str = "brief_steps"
    brief_values: str = "brief_values"
    brief_metrics: str = "brief_metrics"
    brief_feasible: str = "brief_feasible"


TRIAL = TrialKeys()
TRIAL_ATTRS: tuple[str, ...] = tuple(getattr(TRIAL, f.name) for f in fields(TrialKeys))
"""Keys of ``trial.user_attrs``, plus one ``rung_<i>_values`` / ``rung_<i>_decision`` per MO-ASHA
rung reached (``ehrsr.search.asha``)."""

def rung_record_attr(index: int) -> str:
    """Trial attribute holding a run's evaluation at rung ``index`` (step, values, metrics)."""
    return f"rung_{index}"


PLAN_ATTR = "plan"
"""Study attribute of a side study (``<study>-ablation``, ``-baselines``, ``-fidelity``): what it
was asked to run."""


FIDELITY_CHECKS_ATTR = "fidelity_checks"
"""Study attribute: every proxy-fidelity verdict of the study, in order (``FidelityCheck.to_dict()``
each): at the start from the space's measured agreement, part-way through and at the end from the
study's own long retrains, with what the search did about each (docs/proxy_fidelity.md)."""

STEPS_SCALE_ATTR = "steps_scale"
"""Study attribute: the factor on the space's steps per rung that new trials train with (1 unless
a proxy-fidelity check raised it)."""


@dataclass(frozen=True)
class FidelityCheck:
    """One proxy-fidelity verdict: does the study's brief training rank like long training?"""

    when: Literal["start", "early", "end"]
    source: str  # "space" (the agreement measured by the benchmark) or "retrains" (this study's own)
    trial_steps: int  # the steps per trial the verdict is about
    kendall: float | None
    kendall_low: float | None
    kendall_high: float | None
    spearman: float | None
    configurations: int  # points behind the numbers
    factor: float | None  # long retrain = factor x trial_steps (None: the space's reference)
    trusted: bool | None  # None: too few points for a verdict
    action: str | None = None  # what the search did about it ("steps per rung raised from 108 to 324")
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FidelityCheck:
        return cls(**_strict(cls, data, FIDELITY_CHECKS_ATTR))


def fidelity_checks(study: optuna.Study) -> list[FidelityCheck]:
    """The study's stored proxy-fidelity verdicts, in order."""
    return [FidelityCheck.from_dict(d) for d in study.user_attrs.get(FIDELITY_CHECKS_ATTR) or []]


def steps_scale(study: optuna.Study | dict[str, Any]) -> int:
    """The factor on the space's steps that new trials of ``study`` train with (1 by default);
    ``study`` may also be its ``user_attrs`` as read already."""
    attrs = study if isinstance(study, dict) else study.user_attrs
    return int(attrs.get(STEPS_SCALE_ATTR, 1))


STUDY_ATTRS: tuple[str, ...] = (
    *(f.name for f in fields(StudyRecord)), CONVENTIONS_ATTR, LATENCY_MODELS_ATTR, BUDGET_ATTR, BASELINE_ATTR,
    FIDELITY_CHECKS_ATTR, STEPS_SCALE_ATTR,
)
"""Keys of a search study's ``user_attrs``: the record's fields, then what is derived from it or
written later."""


class _StudyKeys:
    """``STUDY.space`` is ``"space"``: each key of ``STUDY_ATTRS`` as an attribute, so code names a
    study attribute without spelling it (an unknown name is an ``AttributeError``)."""

    def __init__(self, names: Sequence[str]) -> None:
        for name in names:
            setattr(self, name, name)


STUDY: Any = _StudyKeys(STUDY_ATTRS)


# ---------------------------------------------------------------------------------------------
# objectives and metric keys


@dataclass(frozen=True)
class Objective:
    """One objective: what the user types, the metric it reads, and which way is better."""

    name: str  # what the user types: --objectives psnr,latency; stored in the study
    metric_key: str  # key in a trial's ``metrics`` user attribute
    direction: Literal["maximize", "minimize"]
    label: str  # axis / column label ("PSNR", "latency")
    unit: str  # "" when unitless
    kind: Literal["quality", "cost"]

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def is_better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b`` in this objective's direction."""
        return a > b if self.maximize else a < b


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("psnr", "psnr", "maximize", "PSNR", "dB", "quality"),
        Objective("ssim", "ssim", "maximize", "SSIM", "", "quality"),
        Objective("lpips", "lpips", "minimize", "LPIPS", "", "quality"),
        Objective("latency", "latency_ms", "minimize", "latency", "ms", "cost"),
        Objective("macs", "macs", "minimize", "MACs", "", "cost"),
        Objective("params", "params_deploy", "minimize", "parameters (deploy)", "", "cost"),
        Objective("memory", "peak_memory_mb", "minimize", "peak memory", "MiB", "cost"),
    )
}
DEFAULT_OBJECTIVES: tuple[str, ...] = ("psnr", "latency")

DEVICE_LATENCY_PREFIX = "latency_ms@"
"""Metric key prefix of a latency on a device profile, predicted by its latency model
(``latency_ms@edge-strict``; objective ``latency@edge-strict``; docs/latency_models.md)."""

LATENCY_SOURCES_ATTR = TRIAL.latency_sources
"""Trial attribute: per device profile (and ``"this machine"``), whether its latency was predicted
or measured, the model file and its stored accuracy, and the units the model lacked."""

CANARY_ATTR = TRIAL.canary
"""Trial attribute: the canary reading next to this machine's latency measurement (``ratio``,
``quiet_ms``, ``latency_ms``, ``contended``)."""



def device_latency_profile(key_or_name: str) -> str | None:
    """``latency_ms@NAME`` or ``latency@NAME`` -> ``NAME``; None for anything else."""
    for prefix in (DEVICE_LATENCY_PREFIX, "latency@"):
        if key_or_name.startswith(prefix) and len(key_or_name) > len(prefix):
            return key_or_name[len(prefix):]
    return None


def resolve_objective(name: str) -> Objective:
    """An ``OBJECTIVES`` entry, or ``latency@NAME`` (latency on device profile NAME, predicted by
    its latency model); ``ValueError`` for anything else."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    profile = device_latency_profile(name)
    if profile is not None and name.startswith("latency@"):
        return Objective(name, DEVICE_LATENCY_PREFIX + profile, "minimize", f"latency on {profile} (predicted)",
                         "ms", "cost")
    raise ValueError(f"unknown objective {name!r}; choose from: {', '.join(OBJECTIVES)}, latency@PROFILE")

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

PER_IMAGE_ATTR = TRIAL.per_image
"""Trial user attribute holding the final evaluation's per-image quality of a finished run,
``{image name: [psnr, ssim]}`` (``ehrsr.metrics.encode_per_image``; docs/study_schema.md). The
controlled ablation pairs it over (seed, image) for its intervals (docs/statistics.md)."""

COST_KEYS: tuple[str, ...] = (
    "latency_ms", "latency_ms_p10", "latency_ms_p90", "macs", "macs_ptflops", "params", "params_deploy",
    "peak_memory_mb", "profile_device", "latency_repeats",
)
"""Every metric the profiler writes (a configuration's cost, reusable across trials of one device);
a stored cost is reused when it has all of ``REUSED_COST_REQUIRES``."""

REUSED_COST_REQUIRES: tuple[str, ...] = tuple(k for k in COST_KEYS if k not in ("macs_ptflops", "latency_repeats"))
"""The cost metrics a stored cost must have to be reused: all but the ptflops cross-check (None
when the search counts MACs from cached unit counts, docs/profiling.md) and the repeat count."""


PICK_MEASURED_KEYS: tuple[str, ...] = (
    "latency_ms", "latency_ms_p10", "latency_ms_p90", "peak_memory_mb", "params", "params_deploy",
    "macs", "device", "dtype", "threads", "warmup", "repeats", "input_shape", "memory_method",
)
"""What a deployment pick records of its measurement on the device (``deploy/<profile>.json``
``measured``): the costs and where and how they were measured."""


def metric_info(metric_key: str) -> Objective:
    """The ``OBJECTIVES`` entry that reads ``metric_key`` (every metric we plot is an objective)."""
    for objective in OBJECTIVES.values():
        if objective.metric_key == metric_key:
            return objective
    profile = device_latency_profile(metric_key)
    if profile is not None:
        return resolve_objective(f"latency@{profile}")
    known = ", ".join(o.metric_key for o in OBJECTIVES.values())
    raise ValueError(f"no objective reads metric {metric_key!r}; known metric keys: {known}")


# ---------------------------------------------------------------------------------------------
# labels and number formats

# metric key -> (table header, decimals for fixed formats; None = engineering units)
_METRIC_FORMAT: dict[str, tuple[str, int | None]] = {
    "psnr": ("PSNR (dB)", 2),
    "ssim": ("SSIM", 4),
    "lpips": ("LPIPS", 4),
    "latency_ms": ("latency (ms)", 2),
    "macs": ("MACs", None),
    "params_deploy": ("params", None),
    "params": ("params (train)", None),
    "peak_memory_mb": ("memory (MiB)", 1),
}

DASH = "—"  # a missing number in a table

COST_TABLE_ORDER: tuple[str, ...] = ("macs", "params_deploy", "latency_ms", "peak_memory_mb")
"""``COST_METRICS`` in the column order of the ablation tables (counts first, then measurements)."""


def is_count(key: str) -> bool:
    """Whether a metric is a count quoted in engineering units (MACs, parameters)."""
    return key in _METRIC_FORMAT and _METRIC_FORMAT[key][1] is None

_SI_FACTORS: tuple[tuple[float, str], ...] = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
_SI_PARSE: dict[str, float] = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9,
                               "t": 1e12, "T": 1e12}


def format_si(value: float, *, signed: bool = False, spec: str = ".3g") -> str:
    """1234567 -> '1.23M' (K, M, G, T: powers of 1000, as MACs and parameter counts are quoted);
    ``signed``: a '+' before positive values; ``spec``: the format of the mantissa."""
    sign = "+" if signed and value > 0 else ("-" if value < 0 else "")
    magnitude = abs(float(value))
    for factor, suffix in _SI_FACTORS:
        if magnitude >= factor:
            return f"{sign}{magnitude / factor:{spec}}{suffix}"
    if magnitude == int(magnitude) and spec == ".3g":
        return f"{sign}{int(magnitude)}"
    return f"{sign}{magnitude:{spec}}"


def parse_si(text: str) -> float:
    """``1.5M`` -> 1.5e6, ``900k`` -> 9e5, ``2G`` -> 2e9, plain numbers as they are (the inverse of
    ``format_si``); ``ValueError`` for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not a number (examples: 500000, 1.5M, 2G)")
    return float(match[1]) * _SI_PARSE[match[2]]


def format_metric(key: str, value: Any, *, signed: bool = False, std: Any = None) -> str:
    """A metric value as text (``signed``: with a + for positive deltas; ``std``: '± std')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    value = float(value)
    _, decimals = _METRIC_FORMAT.get(key, (key, 3))
    if device_latency_profile(key) is not None:
        decimals = 2
    if decimals is not None and round(value, decimals) == 0:
        value = 0.0  # no "-0.00" for a tiny negative difference
    if decimals is None:
        text = format_si(value, signed=signed)
    else:
        text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        std_text = format_si(float(std)) if decimals is None else f"{float(std):.{decimals}f}"
        text = f"{text} ± {std_text}"
    return text


def metric_header(key: str) -> str:
    """Table column header of a metric, with its unit."""
    profile = device_latency_profile(key)
    if profile is not None:
        return f"latency on {profile}, predicted (ms)"
    return _METRIC_FORMAT.get(key, (key, 3))[0]


def metric_label(key: str) -> str:
    """Short label of a metric with its unit, e.g. 'PSNR (dB)', used in prose."""
    info = metric_info(key)
    return f"{info.label} ({info.unit})" if info.unit else info.label


# ---------------------------------------------------------------------------------------------
# conventions


def conventions(
    *, profile_shape: Sequence[int], crop_border: int, profile_dtype: str, device_name: str,
    profile_seconds: float | None,
) -> dict[str, str]:
    """The measuring conventions a study states (``user_attrs["conventions"]``), one line a metric."""
    shape = "x".join(str(s) for s in profile_shape)
    y = f"Y channel (ITU-R BT.601, MATLAB rgb2ycbcr), crop_border={crop_border}, uint8-rounded (BasicSR)"
    return {
        "psnr": f"PSNR on {y}",
        "ssim": f"SSIM (11x11 Gaussian, sigma 1.5) on {y}",
        "lpips": "LPIPS (AlexNet, v0.1) via pyiqa on RGB in [0, 1]",
        "macs": macs_convention(shape),
        "latency": f"median latency of the deploy form at {shape}, {profile_dtype}, on {device_name} "
        f"(at least 5 timed passes, about {profile_seconds or 1.0:g} s of them, after warm-up)",
        "memory": f"peak memory of one inference at {shape} on {device_name}",
        "lr": "LR made by MATLAB-compatible bicubic (antialiased, a=-0.5) after cropping HR to a multiple of the scale",
    }


def macs_convention(shape_text: str) -> str:
    return f"fvcore MACs (one multiply-add = 1) of the deploy form at {shape_text}"


PSNR_CONVENTION_FALLBACK = "PSNR on the Y channel (BT.601), crop_border = scale, uint8-rounded images"
"""What a report says of PSNR for a study that stored no conventions."""


# ---------------------------------------------------------------------------------------------
# studies

def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in (Optuna has no public accessor; the ablation study and the
    report need the same storage to find ``<study>-ablation``)."""
    return study._storage


def ablation_study_name(study_name: str) -> str:
    """Name of the controlled-ablation study kept beside a search study (docs/study_schema.md)."""
    return f"{study_name}-ablation"


def baselines_study_name(study_name: str) -> str:
    """Name of the study holding the hand-designed baselines trained with a study's protocol."""
    return f"{study_name}-baselines"


def fidelity_study_name(study_name: str) -> str:
    """Name of the study holding the proxy-fidelity retrains (configurations trained F times longer)."""
    return f"{study_name}-fidelity"


def load_ablation_study(study: optuna.Study) -> optuna.Study | None:
    """The ``<study>-ablation`` study in the same storage, or None when it was never created."""
    return load_side_study(study, ablation_study_name(study.study_name))


def load_side_study(study: optuna.Study, name: str) -> optuna.Study | None:
    """The study ``name`` kept beside ``study`` in the same storage (``<study>-ablation``,
    ``-baselines``, ``-fidelity``), or None when it was never created."""
    storage = study_storage(study)
    if name not in optuna.study.get_all_study_names(storage=storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


@dataclass(frozen=True)
class StudyInfo:
    """What a report needs to know about a study besides its trials."""

    name: str
    objectives: tuple[Objective, ...]
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
            try:
                objective = resolve_objective(name)
            except ValueError:
                raise ValueError(
                    f"study {study.study_name!r} has objective {name!r}; known objectives: {', '.join(OBJECTIVES)}"
                ) from None
            stored = "maximize" if direction == StudyDirection.MAXIMIZE else "minimize"
            objectives.append(replace(objective, direction=stored))
        return cls(study.study_name, tuple(objectives), attrs)

    # -- what the study says about itself ---------------------------------------------------------
    @property
    def record(self) -> StudyRecord | None:
        """The study record (None for a study an earlier ehrsr wrote, which reports still read)."""
        try:
            return StudyRecord.from_attrs(self.attrs)
        except RecordError:
            return None

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
    def quality_objective(self) -> Objective:
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
        profile = device_latency_profile(metric_key)
        if profile is not None:
            return f"latency on {profile}, predicted (ms)"
        return metric_label(metric_key)


# ---------------------------------------------------------------------------------------------
# per-trial helpers


def train_command(study_name: str, trial: int, reports_dir: str | Path = "reports") -> str:
    """The command that trains trial ``trial`` of ``study_name`` fully (docs/full_training.md);
    ``--reports-dir`` only when the study's folder is not under the default ``reports``."""
    where = "" if Path(reports_dir) == Path("reports") else f" --reports-dir {reports_dir}"
    return f"python run_search.py train --study-name {study_name} --trial {trial}{where}"


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


def objective_values(trial: FrozenTrial, objectives: Sequence[Objective]) -> list[float] | None:
    """The trial's objective values (COMPLETE trials), or None."""
    if trial.state != TrialState.COMPLETE or trial.values is None:
        return None
    if len(trial.values) != len(objectives):
        return None
    return list(trial.values)
