"""Opening a study: validated settings, the study record, samplers, resume checks.

``prepare_study`` turns the command line into an Optuna study created with one typed
``StudyRecord`` (``ehrsr.study_schema``, docs/study_schema.md): objectives, space, task, data,
device, profiling, limits, device latency models, early stopping, shares, sampler and seed.
Re-running the command finds the study again, and from then on the stored record is what runs:
a setting the user does not give again is taken from it, and a setting given with another value
is refused in one line naming each field (exit 2, nothing written), so every trial and every
step after the search measures the same thing. Only ``RUN_SETTINGS`` (budget, workers,
verbosity, output and locations) may change between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch

import ehrsr
from ehrsr.errors import UserError
from ehrsr.search.objectives import parse_objectives
from ehrsr.search.ranking import add_check, check_line, start_check
from ehrsr.search.runner import TRAIN_SETTINGS_VERSION, RunContext
from ehrsr.search.sampler_history import BoundedHistorySampler
from ehrsr.search.storage import StorageError, default_storage_url, mask_url, open_storage
from ehrsr.study_schema import (
    DEFAULT_OBJECTIVES,
    RECORD_VERSION_ATTR,
    STEPS_SCALE_ATTR,
    TRIAL,
    CostLimits,
    DataRecord,
    DeviceRecord,
    EarlyStoppingRecord,
    Objective,
    ProfileRecord,
    RecordError,
    SharesRecord,
    SpaceRecord,
    StudyRecord,
    device_latency_profile,
    resolve_objective,
)

__all__ = [
    "RUN_SETTINGS",
    "ContextSpec",
    "PreparedStudy",
    "SearchError",
    "SearchSettings",
    "build_context",
    "build_sampler",
    "check_study_name",
    "context_spec",
    "load_study",
    "prepare_study",
    "resolve_workers",
    "space_of",
    "stored_record",
]

# Seconds of timed passes per latency measurement in a search. A CPU trial of the tiny space
# trains for a few seconds, and the default 1 s plan (plus calibration and warm-up) made profiling
# a third of it; 0.25 s keeps the median of at least 5 passes. ``deploy`` uses the full plan.
SEARCH_LATENCY_BUDGET_S = 0.25


class SearchError(UserError, RuntimeError):
    """A problem the user must fix (bad option, incompatible existing study...); one line."""


@dataclass
class SearchSettings:
    """Everything ``run_search.py`` can set; the defaults are the newcomer's CPU demo."""

    space: str | None = None  # None: "full" with CUDA, else "tiny"
    budget: str | None = None  # None: gpu-hours=1 with CUDA, else minutes=10
    objectives: str = ",".join(DEFAULT_OBJECTIVES)
    device: str | None = None  # None: cuda when present, else cpu
    profile_size: tuple[int, int] = (256, 256)  # LR input of the latency profile (NTIRE: 256x256)
    profile_dtype: str = "float32"
    # seconds of timed passes per latency measurement (at least 5 passes, after warm-up): a
    # ranking signal in the search; `deploy` re-measures its candidates with the full 1 s plan
    profile_seconds: float = SEARCH_LATENCY_BUDGET_S
    threads: int | None = None  # CPU threads for training and latency (None: torch's default)
    limits: CostLimits = field(default_factory=CostLimits)
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None  # None: reports/<study>/study.db (or .journal for several workers)
    study_name: str | None = None
    out_dir: Path = Path("reports")
    workers: int | str = 1  # int or "auto" (one per visible GPU)
    train_data: str | None = None
    val_data: str | None = None
    task: dict[str, Any] = field(default_factory=dict)  # TaskConfig fields (task, scale, noise_sigma...)
    cache_dir: str | None = None
    lpips_weights: str | None = None
    early_stopping: bool = True
    # train a proposal that repeats a finished configuration (default: record the earlier result,
    # docs/search_spaces.md "Repeated configurations")
    allow_repeats: bool = False
    isolate: bool | None = None  # None: child process per trial on CUDA only
    ablation_share: float = 0.15
    ablation_seeds: int | Literal["auto"] = "auto"  # seeds per ablation variant (docs/reports.md)
    # hand-designed baselines trained after the search with its trial protocol (docs/baselines.md):
    # None = every available one with the bicubic skip, "none" = off, else a comma list
    baselines: str | None = None
    baselines_share: float = 0.10  # share of a time budget kept for them
    fidelity_share: float = 0.10  # share kept for the proxy-fidelity retrains (docs/reports.md)
    fidelity_configs: int = 8
    fidelity_factor: float = 4.0
    write_reports: bool = True
    write_html: bool = True  # report.html beside report.md (docs/reports.md)
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose
    # per-device latency models (docs/latency_models.md): limits by profile name (--max-latency-ms
    # NAME=MS), the device profiles file, and how to load it (deploy sits above search, so the
    # caller passes the loader: ehrsr.deploy.load_device_profiles)
    device_latency_limits: dict[str, float] = field(default_factory=dict)
    devices_file: str | None = None  # None: the shipped devices.yaml
    load_device_profiles: Callable[[str | None], dict[str, Any]] | None = None
    # the settings the user gave (field names; "limits.max_params", "task.scale", ... for parts of
    # limits and task); on a resume the others come from the stored record. None: all were given.
    given: frozenset[str] | None = None

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise SearchError(f"--device {self.device!r} is not a device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SearchError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise SearchError(f"--device {self.device}: only cpu and cuda are supported")
        return device

    @property
    def reserved_share(self) -> float:
        """Share of a time budget kept from the search for the steps after it (controlled
        ablation, baselines, proxy-fidelity check)."""
        return self.shares().reserved

    def shares(self) -> SharesRecord:
        return SharesRecord(
            ablation=self.ablation_share, ablation_seeds=self.ablation_seeds, baselines=self.baselines,
            baselines_share=self.baselines_share, fidelity=self.fidelity_share,
            fidelity_configs=self.fidelity_configs, fidelity_factor=self.fidelity_factor,
        )

    def is_given(self, name: str) -> bool:
        """Whether the user gave setting ``name`` (or a part of it: ``limits`` for ``limits.max_macs``)."""
        return self.given is None or name in self.given or any(g.startswith(name + ".") for g in self.given)


RUN_SETTINGS: tuple[str, ...] = (
    "budget", "workers", "verbosity", "out_dir", "write_reports", "write_html", "storage", "study_name", "isolate",
    "lpips_weights", "load_device_profiles", "given",
)
"""``SearchSettings`` fields a later run may change: how much to run, where and how visibly, and
where local files are. Every other field is part of the study record (docs/study_schema.md)."""


@dataclass
class ContextSpec:
    """What rebuilds a ``RunContext`` anywhere (child processes, workers, ``ablate``, ``deploy``):
    the part of the study record that the runs need, made by ``context_spec(record)``."""

    task: dict[str, Any]
    train_data: str | None
    val_data: str | None
    objectives: list[str]
    profile_shape: list[int]
    profile_dtype: str
    threads: int | None
    limits: dict[str, float | None]
    crop_border: int
    cache_dir: str | None = None
    profile_seconds: float | None = None  # None: the profiler's default plan (1 s)
    device_latency: list[dict[str, Any]] = field(default_factory=list)  # DeviceLatency.to_dict() each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown run-context keys {', '.join(unknown)}; valid: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


def context_spec(record: StudyRecord, cache_dir: str | None = None) -> ContextSpec:
    """The run context a study's record describes (the one every process of the study uses).
    ``cache_dir``: this machine's cache folder where it is not the creator's (a location, not a
    setting: each machine of a study keeps its own)."""
    return ContextSpec(
        task=dict(record.task),
        train_data=record.data.train,
        val_data=record.data.val,
        objectives=list(record.objectives),
        profile_shape=list(record.profile.input_shape),
        profile_dtype=record.profile.dtype,
        threads=record.profile.threads,
        limits=record.limits.to_dict(),
        crop_border=record.crop_border,
        cache_dir=cache_dir if cache_dir is not None else record.cache_dir,
        profile_seconds=record.profile.seconds,
        device_latency=[dict(d) for d in record.device_latency],
    )


def stored_record(study: optuna.Study) -> StudyRecord:
    """The study's record; ``SearchError`` (one line) when it has none or cannot be read."""
    try:
        return StudyRecord.from_study(study)
    except RecordError as exc:
        raise SearchError(f"study {study.study_name!r}: {exc}") from None


def build_context(
    spec: ContextSpec,
    device: torch.device,
    *,
    lpips_weights: str | None = None,
    need_lpips: bool = False,
    progress: bool = False,
    log: Any = None,
    load_lpips: bool = True,
) -> RunContext:
    """Prepare data (from the on-disk cache after the first time), LPIPS and the run context.
    ``load_lpips=False``: no LPIPS (the data cache and the baseline need none)."""
    from ehrsr.data import ImageReadError, TaskConfig, prepare_data

    task = TaskConfig.from_dict(spec.task)
    try:
        train_set, val_set = prepare_data(
            task,
            spec.train_data,
            spec.val_data,
            cache_dir=spec.cache_dir,
            progress=progress,
        )
    except ImageReadError:
        raise
    except ValueError as exc:
        # ehrsr.data reports a missing or empty image folder, unpaired LR/HR files, ... as
        # ValueError: here they are the user's --train-data / --val-data, so one line, exit 2
        raise SearchError(f"data: {exc}") from exc
    train_set = train_set.to(device)
    lpips = _load_lpips(device, lpips_weights, required=need_lpips, log=log) if load_lpips else None
    return RunContext(
        train_set=train_set,
        val_set=val_set,
        objectives=[resolve_objective(n) for n in spec.objectives],
        device=device,
        crop_border=spec.crop_border,
        profile_shape=tuple(spec.profile_shape),
        profile_dtype=spec.profile_dtype,
        profile_seconds=spec.profile_seconds,
        threads=spec.threads,
        lpips=lpips,
        limits=CostLimits.from_dict(spec.limits),
        canary_checked=True,
        **_device_latency_context(spec),
    )


def _device_latency_context(spec: ContextSpec) -> dict[str, Any]:
    """The RunContext fields of per-device latency: the loaded models, whether this machine's
    latency is timed at all (only when an objective or a limit needs it, once devices are
    predicted), and the canary that checks that timing (docs/latency_models.md)."""
    if not spec.device_latency:
        return {}
    from ehrsr.profiling.latency_model import LatencyModelError
    from ehrsr.search.device_latency import DeviceLatency

    try:
        devices = [DeviceLatency.from_dict(d) for d in spec.device_latency]
        loaded = [(d, *d.load()) for d in devices]
    except LatencyModelError as exc:  # the file changed since the study started
        raise SearchError(str(exc)) from None
    local = "latency" in spec.objectives or spec.limits.get("max_latency_ms") is not None
    return {"device_latencies": loaded, "time_locally": local}


_LPIPS_FAILURES: dict[str | None, str] = {}  # weights path -> why it failed (tried once per process)


def _load_lpips(device: torch.device, weights: str | None, *, required: bool, log: Any) -> Any:
    """LPIPS on ``device``, or None (said once, by the process given a ``log``) when its weights
    cannot be had. Weights are downloaded only when LPIPS is an objective (``required``); otherwise
    only local weights are used, so a search without LPIPS never waits on a failing download."""
    from ehrsr.metrics import LPIPS, LPIPSUnavailable

    if weights not in _LPIPS_FAILURES:
        try:
            return LPIPS(device=device, weights_path=weights, allow_download=required)
        except LPIPSUnavailable as exc:
            _LPIPS_FAILURES[weights] = str(exc)
            if log is not None and not required:
                log(f"note: LPIPS unavailable, continuing without it ({exc})")
    if required:
        raise SearchError(f"lpips is an objective but LPIPS is unavailable: {_LPIPS_FAILURES[weights]}")
    return None


def _default_study_name(space_name: str, task: Any, train_data: str | None, val_data: str | None) -> str:
    name = f"ehrsr-{space_name}-{task.slug}"
    if train_data or val_data:
        digest = hashlib.sha1(f"{train_data}|{val_data}".encode()).hexdigest()[:6]
        name += f"-{digest}"
    return name


@dataclass
class PreparedStudy:
    """An opened study and what runs it: ``record`` (stored, or just written), ``settings`` (the
    given settings with every recorded field taken from the record) and ``spec`` (the run context)."""

    study: optuna.Study
    storage_url: str
    study_dir: Path
    space: Any
    budget: Any
    spec: ContextSpec
    objectives: list[Objective]
    device: torch.device
    device_name: str
    created: bool
    record: StudyRecord
    settings: SearchSettings


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The ``--sampler`` by name. Trials' latency and memory limits reach it as Optuna constraints
    (``trial.set_constraint``, written by ``ehrsr.search.record``), which Optuna 5's samplers read
    from the trials themselves. The driver rebuilds it per worker with ``revisits.sampler_seed``
    so a resume or a second worker does not replay the first proposals."""
    name = name.lower()
    if name == "tpe":
        # multivariate + group: TPE models the conditional parameters of each module jointly;
        # beyond TPE_HISTORY_LIMIT finished trials it reads a bounded view (docs/scaling_out.md)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return BoundedHistorySampler(optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "nsga3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"--sampler {name!r} is not one of {', '.join(SAMPLERS)}")


SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "nsga3", "gp", "random")


def prepare_study(settings: SearchSettings, log: Any = print) -> PreparedStudy:
    """Validate the settings, open or create the study (its record written once, at creation),
    enqueue the reference configurations. On a resume the stored record runs: settings not
    given are taken from it, and given ones that differ are refused in one line (nothing written)."""
    from ehrsr.search.budget import BudgetError, check_budget_device, parse_budget

    check_study_name(settings.study_name)
    device = settings.resolved_device()
    space = _space(settings.space or ("full" if device.type == "cuda" else "tiny"))
    task = _task_config(settings.task)
    study_name = settings.study_name or _default_study_name(space.name, task, settings.train_data, settings.val_data)
    study_dir = Path(settings.out_dir) / study_name
    workers = resolve_workers(settings.workers, device)
    storage_url = settings.storage or default_storage_url(study_dir, workers)
    stored = find_record(storage_url, study_name)
    if stored is not None:
        settings = merged_settings(settings, stored)
        device = _stored_device(settings, stored, study_name)
        if not settings.is_given("space"):
            space = space_of(stored)
        task = _task_config(settings.task)
    try:
        objectives = parse_objectives(settings.objectives)
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    budget_text = settings.budget or ("gpu-hours=1" if device.type == "cuda" else "minutes=10")
    try:
        budget = parse_budget(budget_text)
        check_budget_device(budget, torch.cuda.is_available(), device.type)
    except BudgetError as exc:
        raise SearchError(f"--budget {budget_text}: {exc}") from None
    _check_shares(settings)
    # everything that can fail inside trial 0 is checked before the study exists: a study created
    # by a run that could not work would keep a RUNNING trial and refuse the corrected rerun
    check_threads(settings.threads)
    check_data(task, settings.train_data, settings.val_data, patch_size=space.fidelity.patch_size)
    if stored is not None and not (settings.is_given("objectives") or settings.is_given("device_latency_limits")
                                   or settings.is_given("devices_file")):
        device_latency = [_device_latency_of(d) for d in stored.device_latency]
    else:
        device_latency = _load_device_latency(settings, objectives, space)
    threads = _resolved_threads(settings.threads, device, workers)
    settings = dataclasses.replace(settings, threads=threads)
    from ehrsr.profiling import device_name

    dev_name = device_name(device, threads)
    record = record_of(settings, device=device, device_name=dev_name, objectives=objectives, space=space, task=task,
                       device_latency=device_latency)
    new_folder = not study_dir.exists()
    try:
        return _open_study(settings, record, stored, device, objectives, budget, space, study_name, study_dir,
                           storage_url, workers, log)
    except BaseException:
        # a run that failed before any trial leaves no empty reports/<name>/ behind
        if new_folder and study_dir.is_dir() and not any(study_dir.iterdir()):
            with contextlib.suppress(OSError):
                study_dir.rmdir()
        raise


def check_study_name(name: str | None) -> None:
    """A study name is also the folder of its reports: refuse one that is empty, names a path (a
    separator, ``..``), or is too long for a file name, so no name can write outside ``--out-dir``."""
    if name is None:
        return
    if not name.strip():
        raise SearchError("--study-name is empty; give a name (or leave the flag out for the default)")
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise SearchError(f"--study-name {name!r} must be a plain name, not a path (no '/', '\\' or '..')")
    if len(name.encode()) > MAX_STUDY_NAME_BYTES:
        raise SearchError(f"--study-name is {len(name.encode())} bytes long; at most {MAX_STUDY_NAME_BYTES} "
                          "(it names a folder, and side studies add '-baselines')")


MAX_STUDY_NAME_BYTES = 200  # a file name may have 255 bytes; "-baselines" and "-ablation" are added


def _space(name: str) -> Any:
    from ehrsr.search.space import SearchSpaceError, load_space

    try:
        return load_space(name)
    except SearchSpaceError as exc:
        raise SearchError(str(exc)) from None


def space_of(record: StudyRecord) -> Any:
    """The space a study was created with, from its stored text (the file may have changed since)."""
    from ehrsr.search.space import SearchSpaceError, space_from_text

    try:
        return space_from_text(record.space.yaml, name=record.space.name,
                                     path=Path(record.space.path) if record.space.path else None)
    except SearchSpaceError as exc:
        raise SearchError(f"the study's stored search space no longer loads: {exc}") from None


def _task_config(task: dict[str, Any]) -> Any:
    from ehrsr.data import TaskConfig

    try:
        return TaskConfig.from_dict(task)
    except ValueError as exc:
        raise SearchError(f"task: {exc}") from None


def _check_shares(settings: SearchSettings) -> None:
    if not 0 <= settings.ablation_share < 1:
        raise SearchError(f"--ablation-share must be in [0, 1), got {settings.ablation_share}")
    seeds = settings.ablation_seeds
    if seeds != "auto" and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise SearchError(f"--ablation-seeds must be 'auto' or a positive integer, got {seeds!r}")
    for name in ("baselines_share", "fidelity_share"):
        if not 0 <= getattr(settings, name) < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(settings, name)}")
    if settings.reserved_share >= 1:
        raise SearchError(
            f"--ablation-share + --baselines-share + --fidelity-share = {settings.reserved_share:.2f} leaves "
            "nothing for the search; their sum must be below 1"
        )


def _resolved_threads(threads: int | None, device: torch.device, workers: int) -> int | None:
    """The CPU threads the study trains and times with: the given number, else (on the CPU) torch's
    default shared among this machine's workers. Recorded, so a resume with another ``--workers``
    still times every trial with the same threads."""
    if threads is not None or device.type != "cpu":
        return threads
    return max(1, torch.get_num_threads() // workers)


def _stored_device(settings: SearchSettings, stored: StudyRecord, study_name: str) -> torch.device:
    if settings.is_given("device"):
        return settings.resolved_device()
    if stored.device.kind == "cuda" and not torch.cuda.is_available():
        raise SearchError(f"study {study_name!r} runs on cuda (its record) but this machine has no CUDA")
    return settings.resolved_device()


def record_of(settings: SearchSettings, *, device: torch.device, device_name: str, objectives: list[Objective],
              space: Any, task: Any, device_latency: list[Any]) -> StudyRecord:
    """The study record these (validated) settings describe."""
    fidelity = space.fidelity
    return StudyRecord(
        ehrsr_version=ehrsr.__version__,
        objectives=tuple(o.name for o in objectives),
        space=SpaceRecord(space.name, str(space.path) if space.path else None, space.source_text),
        task=task.to_dict(),
        data=DataRecord(settings.train_data, settings.val_data),
        device=DeviceRecord(device.type, device_name),
        profile=ProfileRecord((1, 3, *settings.profile_size), settings.profile_dtype, settings.threads,
                              float(settings.profile_seconds)),
        limits=settings.limits,
        device_latency=tuple(d.to_dict() for d in device_latency),
        devices_file=settings.devices_file,
        early_stopping=EarlyStoppingRecord(settings.early_stopping, tuple(fidelity.rung_steps), fidelity.eta),
        shares=settings.shares(),
        sampler=settings.sampler.lower(),
        seed=settings.seed,
        allow_repeats=settings.allow_repeats,
        cache_dir=settings.cache_dir,
        train_settings_version=TRAIN_SETTINGS_VERSION,
    )


def merged_settings(settings: SearchSettings, stored: StudyRecord) -> SearchSettings:
    """``settings`` with every recorded setting the user did not give taken from ``stored``."""
    if settings.given is None:
        return settings
    keep = settings.is_given
    changes: dict[str, Any] = {}

    def take(name: str, value: Any) -> None:
        if not keep(name):
            changes[name] = value

    take("objectives", ",".join(stored.objectives))
    take("device", stored.device.kind)
    take("profile_size", tuple(stored.profile.input_shape[2:]))
    take("profile_dtype", stored.profile.dtype)
    take("profile_seconds", stored.profile.seconds)
    take("threads", stored.profile.threads)
    changes["limits"] = CostLimits(**{
        k: getattr(settings.limits, k) if keep(f"limits.{k}") else getattr(stored.limits, k)
        for k in CostLimits.__dataclass_fields__
    })
    take("device_latency_limits", {d["name"]: d["max_latency_ms"] for d in stored.device_latency
                                   if d.get("max_latency_ms") is not None})
    take("devices_file", stored.devices_file)
    take("train_data", stored.data.train)
    take("val_data", stored.data.val)
    changes["task"] = {**stored.task, **{k: v for k, v in settings.task.items() if keep(f"task.{k}")}}
    take("cache_dir", stored.cache_dir)
    take("early_stopping", stored.early_stopping.enabled)
    take("allow_repeats", stored.allow_repeats)
    take("sampler", stored.sampler)
    take("seed", stored.seed)
    shares = stored.shares
    for name, value in (("ablation_share", shares.ablation), ("ablation_seeds", shares.ablation_seeds),
                        ("baselines", shares.baselines), ("baselines_share", shares.baselines_share),
                        ("fidelity_share", shares.fidelity), ("fidelity_configs", shares.fidelity_configs),
                        ("fidelity_factor", shares.fidelity_factor)):
        take(name, value)
    return dataclasses.replace(settings, **changes)


# record fields a run does not compare: who wrote it, where things are (each machine of a study has
# its own cache folder), and what follows from the rest
_NOT_COMPARED = ("ehrsr_version", "record_version", "device.name", "space.name", "space.path", "cache_dir")

# the flag that sets each compared record field, for the refusal message
_FLAG_OF: dict[str, str] = {
    "objectives": "--objectives", "space.yaml": "--space", "task.task": "--task", "task.scale": "--scale",
    "task.noise_sigma": "--noise-sigma", "task.blur_sigma": "--blur-sigma", "task.jpeg_quality": "--jpeg-quality",
    "data.train": "--train-data", "data.val": "--val-data", "device.kind": "--device",
    "profile.input_shape": "--profile-size", "profile.dtype": "--profile-dtype", "profile.threads": "--threads",
    "profile.seconds": "--profile-seconds", "limits.max_params": "--max-params", "limits.max_macs": "--max-macs",
    "limits.max_latency_ms": "--max-latency-ms", "limits.max_memory_mb": "--max-memory-mb",
    "device_latency": "--objectives latency@/--max-latency-ms NAME=", "devices_file": "--devices-file",
    "early_stopping.enabled": "--no-early-stopping", "shares.ablation": "--ablation-share",
    "shares.ablation_seeds": "--ablation-seeds", "shares.baselines": "--baselines",
    "shares.baselines_share": "--baselines-share", "shares.fidelity": "--fidelity-share",
    "shares.fidelity_configs": "--fidelity-configs", "shares.fidelity_factor": "--fidelity-factor",
    "sampler": "--sampler", "seed": "--seed", "allow_repeats": "--allow-repeats", "cache_dir": "--cache-dir",
}


def record_differences(stored: StudyRecord, given: StudyRecord) -> list[str]:
    """One phrase per compared field where ``given`` differs from ``stored``."""
    a, b = stored.flat(), given.flat()
    out = []
    for key in a:
        if key in _NOT_COMPARED or a[key] == b.get(key):
            continue
        if key == "space.yaml":
            out.append(f"the search space (--space): stored {stored.space.name!r}, given a different one")
        elif key == "device_latency":
            out.append(f"device latency models ({_FLAG_OF[key]}): stored {_latency_models_text(a[key])}, "
                       f"given {_latency_models_text(b.get(key) or [])}")
        else:
            out.append(f"{key} ({_FLAG_OF.get(key, key)}): stored {_shown(a[key])}, given {_shown(b.get(key))}")
    return out


def _latency_models_text(items: list[dict[str, Any]]) -> str:
    limit = lambda d: f" <= {d['max_latency_ms']:g} ms" if d.get("max_latency_ms") else ""  # noqa: E731
    return ", ".join(f"{d['name']}{limit(d)}" for d in items) or "none"


def _shown(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def find_record(storage_url: str, study_name: str) -> StudyRecord | None:
    """The record of study ``study_name`` in ``storage_url``, or None when there is no such study
    (or its creator died before writing the record). A file storage that does not exist yet is not
    created. A study whose creator is still writing waits for it; a study made by an earlier ehrsr
    (no record, trials stored) is refused in one line."""
    if _missing_file_storage(storage_url):
        return None
    storage = open_storage(storage_url)
    try:
        names = set(optuna.study.get_all_study_names(storage=storage))
    except Exception as exc:
        raise StorageError(f"cannot read storage {mask_url(storage_url)}: {str(exc).splitlines()[0]}") from None
    if study_name not in names:
        return None
    study = optuna.load_study(study_name=study_name, storage=storage)
    _wait_for_record(study)
    attrs = dict(study.user_attrs)
    if RECORD_VERSION_ATTR not in attrs:
        if attrs or study.get_trials(deepcopy=False):
            raise SearchError(
                f"study {study_name!r} was made by an earlier ehrsr (it has no study record): `report` can still "
                "read it; continue it with that version, or start a new --study-name"
            )
        return None
    return stored_record(study)


def _missing_file_storage(url: str) -> bool:
    """Whether ``url`` is a SQLite or journal file that does not exist (so no study is in it)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return path not in ("", ":memory:") and not Path(path).exists()
    if url.startswith("journal:"):
        return not Path(url[len("journal:"):]).exists()
    return False


def check_threads(threads: int | None) -> None:
    """``--threads`` must be 1 .. the cores this process may run on (``os.sched_getaffinity``)."""
    if threads is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise SearchError(f"--threads must be between 1 and {cores} (the cores available here), got {threads}")


def check_data(task: Any, train_data: str | None, val_data: str | None, *, patch_size: int) -> None:
    """The data folders are readable and their images large enough: every training image is
    sampled at ``patch_size`` LR pixels (``patch_size * scale`` HR), and every validation image
    must be measurable at the scale (``ehrsr.metrics.check_measurable``). Only image headers are
    read; the built-in images (None) are known to fit."""
    from ehrsr.data.io import image_size, list_images
    from ehrsr.metrics import ImageTooSmall, check_measurable

    scale = task.scale

    def sizes(folder: str, option: str) -> list[tuple[Path, int, int]]:
        try:
            return [(path, *image_size(path)) for path in list_images(folder)]
        except ValueError as exc:  # a missing or empty folder, an unreadable image (ImageReadError)
            raise SearchError(f"{option}: {exc}") from None

    if train_data is not None:
        hr_patch = patch_size * scale
        found = sizes(train_data, "--train-data")
        if not any(w >= hr_patch and h >= hr_patch for _, w, h in found):
            largest = max(found, key=lambda item: min(item[1], item[2]))
            raise SearchError(
                f"--train-data {train_data}: no image is large enough for the space's patch size {patch_size} "
                f"(x{scale} = {hr_patch} px HR); the largest is {largest[0].name} ({largest[1]}x{largest[2]})"
            )
    if val_data is not None:
        try:
            check_measurable(sizes(val_data, "--val-data"), scale)
        except ImageTooSmall as exc:
            raise SearchError(f"--val-data: {exc}") from None


def _open_study(settings: SearchSettings, record: StudyRecord, stored: StudyRecord | None, device: torch.device,
                objectives: list[Objective], budget: Any, space: Any, study_name: str, study_dir: Path,
                storage_url: str, workers: int, log: Any) -> PreparedStudy:
    """Open or create the study of ``prepare_study`` once its settings are checked."""
    if stored is not None:
        differences = record_differences(stored, record)
        if differences:
            _refuse_or_replace(storage_url, study_name, differences, log)
            stored = None
    from ehrsr.files import check_writable

    check_writable(study_dir)
    if workers > 1 and storage_url.startswith("sqlite"):
        # Optuna's advice, and a race seen in this project's tests: two processes on one SQLite file
        # can both claim the same enqueued trial (SQLite has no row locks)
        raise SearchError(
            f"--workers {workers} cannot share the SQLite storage {mask_url(storage_url)}: use "
            "--storage journal:PATH (one machine) or a database server URL (several machines), "
            "or --workers 1 (a study begun in SQLite resumes with --workers 1)"
        )
    storage = open_storage(storage_url)
    # workers started together all find the study missing: only the one whose creation succeeds
    # writes the record and enqueues the reference trials (else they are enqueued twice)
    created = stored is None and _claim_new_study(storage, study_name, objectives)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=[o.direction for o in objectives],
        load_if_exists=True,
    )
    if not created:
        _wait_for_record(study)
    if RECORD_VERSION_ATTR not in study.user_attrs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in objectives])
        for name, params in space.reference_params().items():
            study.enqueue_trial(params, user_attrs={TRIAL.reference: name}, skip_if_exists=True)
        check, scale = start_check(space, record)  # the space's measured proxy agreement, if it applies
        if check is not None:
            add_check(study, check)
            log(f"proxy fidelity at the start: {check_line(check)}")
        study.set_user_attr(STEPS_SCALE_ATTR, scale)
        for key, value in record.to_attrs().items():  # record_version last: other workers wait for it
            study.set_user_attr(key, value)
    else:
        stored = stored_record(study)
        differences = record_differences(stored, record)
        if differences:  # a process that started with this one created the study with other settings
            raise SearchError(_refusal(study_name, differences))
        record = stored
    return PreparedStudy(study, storage_url, study_dir, space, budget, context_spec(record, settings.cache_dir),
                         objectives, device,
                         record.device.name, created, record, settings)


def _refusal(study_name: str, differences: list[str]) -> str:
    return (f"study {study_name!r} was created with other settings: {'; '.join(differences)}. Leave those flags "
            "out to continue with the stored ones, or use another --study-name")


def _refuse_or_replace(storage_url: str, study_name: str, differences: list[str], log: Any) -> None:
    """A resume with other settings is refused, except for a study with no finished (complete or
    pruned) trial: nothing would be lost, and a first run that failed must not lock its study to
    the settings that failed, so it is deleted and created again with the new ones."""
    from optuna.trial import TrialState

    storage = open_storage(storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        raise SearchError(_refusal(study_name, differences))
    optuna.delete_study(study_name=study_name, storage=storage)
    log(f"note: study {study_name!r} was created with other settings ({'; '.join(differences)}), but it has no "
        "finished trial: re-created with the new settings")


def _load_device_latency(settings: SearchSettings, objectives: list[Objective], space: Any) -> list[Any]:
    """Load the latency model of each device profile an objective or a limit names (before the
    study is created: a missing or refused model is one line, exit 2)."""
    from ehrsr.search.device_latency import DeviceLatencyError, load_device_latencies

    names = [p for p in (device_latency_profile(o.name) for o in objectives) if p is not None]
    if not names and not settings.device_latency_limits:
        return []
    if settings.load_device_profiles is None:
        raise SearchError(f"{', '.join(names or settings.device_latency_limits)}: device profiles are not "
                          "available here (the caller passes load_device_profiles)")
    try:
        profiles = settings.load_device_profiles(settings.devices_file)
        return load_device_latencies(names, settings.device_latency_limits, space, profiles, settings.devices_file)
    except DeviceLatencyError as exc:
        raise SearchError(str(exc)) from None


def _device_latency_of(data: dict[str, Any]) -> Any:
    from ehrsr.search.device_latency import DeviceLatency

    return DeviceLatency.from_dict(data)


def _claim_new_study(storage: optuna.storages.BaseStorage, name: str, objectives: list[Objective]) -> bool:
    """Create the study; True only in the one process whose creation succeeded."""
    from optuna.study import StudyDirection

    directions = [StudyDirection.MAXIMIZE if o.direction == "maximize" else StudyDirection.MINIMIZE for o in objectives]
    try:
        storage.create_new_study(directions, name)
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False


RECORD_WAIT_SECONDS = 60.0


def _wait_for_record(study: optuna.Study) -> None:
    """A worker that just created the study may still be writing its record (``record_version`` is
    written last); wait for it, then go on either way (the creator may have died before). A study
    that already has attributes but no record (made by an earlier ehrsr) is not waited for."""
    import time

    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while time.monotonic() < deadline:
        attrs = study.user_attrs
        if RECORD_VERSION_ATTR in attrs or "context" in attrs:
            return
        time.sleep(0.5)


def load_study(study_name: str, storage: str | None, out_dir: Path) -> tuple[optuna.Study, str, Path]:
    """Open an existing study for ``report`` / ``ablate`` / ``deploy``; clear error if missing."""
    check_study_name(study_name)
    study_dir = Path(out_dir) / study_name
    url = storage or default_storage_url(study_dir)
    if storage is None and not (study_dir / "study.db").exists() and not (study_dir / "study.journal").exists():
        raise SearchError(f"no study {study_name!r}: {study_dir}/study.db does not exist (give --storage URL?)")
    backend = open_storage(url)
    try:
        names = {s.study_name for s in optuna.get_all_study_summaries(backend)}
    except Exception as exc:
        raise StorageError(f"cannot read storage {mask_url(url)}: {str(exc).splitlines()[0]}") from None
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise SearchError(f"no study {study_name!r} in storage {mask_url(url)} (studies there: {known})")
    return optuna.load_study(study_name=study_name, storage=backend), url, study_dir


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """The number of worker processes ``--workers`` asks for (``auto``: one per GPU, one on the CPU)."""
    if workers == "auto":
        return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    try:
        n = int(workers)
    except (TypeError, ValueError):
        raise SearchError(f"--workers must be a positive integer or 'auto', got {workers!r}") from None
    if n < 1:
        raise SearchError(f"--workers must be >= 1, got {n}")
    if device.type == "cuda" and n > max(1, torch.cuda.device_count()):
        raise SearchError(f"--workers {n}: only {torch.cuda.device_count()} GPU(s) visible; use --workers auto")
    return n
