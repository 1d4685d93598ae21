"""Opening a study: validated settings, the stored recipe (``ContextSpec``), samplers, resume checks.

``prepare_study`` turns the command line into an Optuna study whose user attributes say
everything the reports and later runs need (docs/study_schema.md): the space, task, data,
objectives, device, profile settings, limits, budget and the measuring conventions. Re-running
the same command finds the study again; asking a different question of an existing study
(other objectives, task, data or space) is refused, so its trials stay comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch

import ehrsr
from ehrsr.errors import UserError
from ehrsr.search.objectives import parse_objectives
from ehrsr.search.runner import (
    TRAIN_SETTINGS_VERSION,
    TRAIN_SETTINGS_VERSION_ATTR,
    CostLimits,
    RunContext,
    stale_train_settings,
)
from ehrsr.search.sampler_history import BoundedHistorySampler
from ehrsr.search.storage import StorageError, default_storage_url, mask_url, open_storage
from ehrsr.study_schema import (
    DEFAULT_OBJECTIVES,
    LATENCY_MODELS_ATTR,
    Objective,
    conventions,
    device_latency_profile,
    resolve_objective,
)

__all__ = [
    "ContextSpec",
    "PreparedStudy",
    "SearchError",
    "SearchSettings",
    "build_context",
    "build_sampler",
    "load_study",
    "prepare_study",
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
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose
    # per-device latency models (docs/latency_models.md): limits by profile name (--max-latency-ms
    # NAME=MS), and the loaded device profiles the objectives / limits name (deploy sits above
    # search, so the caller loads them: ehrsr.deploy.load_device_profiles)
    device_latency_limits: dict[str, float] = field(default_factory=dict)
    device_profiles: dict[str, Any] = field(default_factory=dict)
    devices_file: str | None = None  # named in messages only

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
        baselines = 0.0 if (self.baselines or "").strip().lower() == "none" else self.baselines_share
        return self.ablation_share + baselines + self.fidelity_share


@dataclass
class ContextSpec:
    """What rebuilds a ``RunContext`` anywhere (child processes, workers, ``ablate``, ``deploy``).

    Stored in the study (user attribute ``context``), so a study carries its own recipe.
    """

    task: dict[str, Any]
    train_data: str | None
    val_data: str | None
    objectives: list[str]
    profile_shape: list[int]
    profile_dtype: str
    threads: int | None
    limits: dict[str, float | None]
    patch_size: int
    batch_size: int
    loss: str
    crop_border: int
    cache_dir: str | None = None
    profile_seconds: float | None = None  # None (older studies): the profiler's default plan
    device_latency: list[dict[str, Any]] = field(default_factory=list)  # DeviceLatency.to_dict() each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
    name = f"ehrsr-{space_name}-{_task_slug(task)}"
    if train_data or val_data:
        digest = hashlib.sha1(f"{train_data}|{val_data}".encode()).hexdigest()[:6]
        name += f"-{digest}"
    return name


def _task_slug(task: Any) -> str:
    if task.task == "sr":
        return f"sr-x{task.scale}"
    return f"{task.task}-x{task.scale}" if task.scale > 1 else task.task


@dataclass
class PreparedStudy:
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


def build_sampler(name: str, seed: int, constrained: bool) -> optuna.samplers.BaseSampler:
    """The ``--sampler`` by name; ``constrained``: it honours the trials' constraints (latency and
    memory limits measured after training). The driver rebuilds it per worker with
    ``revisits.sampler_seed`` so a resume or a second worker does not replay the first proposals."""
    constraints_func = _constraints_of if constrained else None
    name = name.lower()
    if name == "tpe":
        # multivariate + group: TPE models the conditional parameters of each module jointly;
        # beyond TPE_HISTORY_LIMIT finished trials it reads a bounded view (docs/scaling_out.md)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return BoundedHistorySampler(optuna.samplers.TPESampler(
                seed=seed, constraints_func=constraints_func, multivariate=True, group=True
            ))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    if name == "nsga3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIIISampler(seed=seed, constraints_func=constraints_func)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints_func)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"--sampler {name!r} is not one of tpe, nsga2, nsga3, gp, random")


def _constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    constraints = trial.constraints
    return [constraints[k] for k in sorted(constraints)]


def prepare_study(settings: SearchSettings, log: Any = print) -> PreparedStudy:
    """Validate the settings, open or create the study, store its recipe, enqueue references."""
    from ehrsr.data import TaskConfig
    from ehrsr.search.budget import BudgetError, check_budget_device, parse_budget
    from ehrsr.search.space import SearchSpaceError, load_space

    device = settings.resolved_device()
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
    try:
        space = load_space(settings.space or ("full" if device.type == "cuda" else "tiny"))
    except SearchSpaceError as exc:
        raise SearchError(str(exc)) from None
    try:
        task = TaskConfig.from_dict(settings.task)
    except ValueError as exc:
        raise SearchError(f"task: {exc}") from None
    device_latency = _load_device_latency(settings, objectives, space)
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
    # everything that can fail inside trial 0 is checked before the study exists: a study created
    # by a run that could not work would keep a RUNNING trial and refuse the corrected rerun
    check_threads(settings.threads)
    check_data(task, settings.train_data, settings.val_data, patch_size=space.fidelity.patch_size)

    study_name = settings.study_name or _default_study_name(space.name, task, settings.train_data, settings.val_data)
    study_dir = Path(settings.out_dir) / study_name
    new_folder = not study_dir.exists()
    try:
        return _open_study(settings, device, objectives, budget, space, task, study_name, study_dir, log,
                           device_latency)
    except BaseException:
        # a run that failed before any trial leaves no empty reports/<name>/ behind
        if new_folder and study_dir.is_dir() and not any(study_dir.iterdir()):
            with contextlib.suppress(OSError):
                study_dir.rmdir()
        raise


def check_threads(threads: int | None) -> None:
    """``--threads`` must be 1 .. the cores this process may run on (``os.sched_getaffinity``)."""
    if threads is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise SearchError(f"--threads must be between 1 and {cores} (the cores available here), got {threads}")


def check_data(task: Any, train_data: str | None, val_data: str | None, *, patch_size: int) -> None:
    """The data folders are readable and their images large enough: every training image is
    sampled at ``patch_size`` LR pixels (``patch_size * scale`` HR), and a validation image must
    be larger than twice the crop border (``scale`` pixels on each side). Only image headers are
    read; the built-in images (None) are known to fit."""
    from PIL import Image, UnidentifiedImageError

    from ehrsr.data.io import list_images

    scale = task.scale
    crop_border = scale if scale > 1 else 0

    def sizes(folder: str, option: str) -> list[tuple[Path, int, int]]:
        try:
            files = list_images(folder)
        except ValueError as exc:
            raise SearchError(f"{option}: {exc}") from None
        out = []
        for path in files:
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise SearchError(f"{option}: cannot read image {path}: {exc}") from None
            out.append((path, width, height))
        return out

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
        need = max(2 * crop_border + 1, scale)
        for path, width, height in sizes(val_data, "--val-data"):
            if width < need or height < need:
                raise SearchError(
                    f"--val-data: image {path.name} ({width}x{height}) is too small for the crop border "
                    f"{crop_border} of x{scale}: it needs at least {need}x{need} px"
                )


def _open_study(settings: SearchSettings, device: torch.device, objectives: list[Objective], budget: Any,
                space: Any, task: Any, study_name: str, study_dir: Path, log: Any,
                device_latency: list[Any]) -> PreparedStudy:
    """Open or create the study of ``prepare_study`` once its settings are checked."""
    from ehrsr.profiling import device_name

    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / f".write-test-{os.getpid()}"  # per process: workers start together
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SearchError(f"output folder {study_dir} is not writable: {exc.strerror}") from None
    workers = _resolve_workers(settings.workers, device)
    storage_url = settings.storage or default_storage_url(study_dir, workers)
    if workers > 1 and storage_url.startswith("sqlite"):
        # Optuna's advice, and a race seen in this project's tests: two processes on one SQLite file
        # can both claim the same enqueued trial (SQLite has no row locks)
        raise SearchError(
            f"--workers {workers} cannot share the SQLite storage {mask_url(storage_url)}: use "
            "--storage journal:PATH (one machine) or a database server URL (several machines), "
            "or --workers 1 (a study begun in SQLite resumes with --workers 1)"
        )
    storage = open_storage(storage_url)

    fidelity = space.fidelity
    spec = ContextSpec(
        task=task.to_dict(),
        train_data=settings.train_data,
        val_data=settings.val_data,
        objectives=[o.name for o in objectives],
        profile_shape=[1, 3, *settings.profile_size],
        profile_dtype=settings.profile_dtype,
        threads=settings.threads,
        limits=settings.limits.to_dict(),
        patch_size=fidelity.patch_size,
        batch_size=fidelity.batch_size,
        loss=fidelity.loss,
        crop_border=task.scale if task.scale > 1 else 0,
        cache_dir=settings.cache_dir,
        profile_seconds=settings.profile_seconds,
        device_latency=[d.to_dict() for d in device_latency],
    )
    constrained = settings.limits.max_latency_ms is not None or settings.limits.max_memory_mb is not None
    sampler = build_sampler(settings.sampler, settings.seed, constrained)
    try:
        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as exc:
        raise StorageError(f"cannot read storage {mask_url(storage_url)}: {str(exc).splitlines()[0]}") from None
    # workers started together all find the study missing: only the one whose creation succeeds
    # writes its attributes and enqueues the reference trials (else they are enqueued twice)
    if study_name in existing and _replace_unfinished(storage, study_name, spec, space, settings, log):
        existing.discard(study_name)
    created = study_name not in existing and _claim_new_study(storage, study_name, objectives)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=[o.direction for o in objectives],
        sampler=sampler,
        load_if_exists=True,
    )
    if not created:
        _wait_for_context(study)
    dev_name = device_name(device, settings.threads)
    if created or "context" not in study.user_attrs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in objectives])
        attrs = {
            "ehrsr_version": ehrsr.__version__,
            "objectives": [o.name for o in objectives],
            "space": {"name": space.name, "path": str(space.path) if space.path else None, "yaml": space.source_text},
            "task": task.to_dict(),
            "data": {
                "train": settings.train_data or "built-in scikit-image sample images",
                "val": settings.val_data or "built-in scikit-image sample images",
                "builtin": settings.train_data is None and settings.val_data is None,
            },
            "device": {"kind": device.type, "name": dev_name, "n_devices": workers if device.type == "cuda" else 1},
            "profile": {"input_shape": spec.profile_shape, "dtype": settings.profile_dtype, "threads": settings.threads},
            "budget": budget.text,
            "limits": settings.limits.to_dict(),
            "conventions": conventions(
                profile_shape=spec.profile_shape, crop_border=spec.crop_border, profile_dtype=spec.profile_dtype,
                device_name=dev_name, profile_seconds=spec.profile_seconds,
            ),
            "early_stopping": {
                "enabled": settings.early_stopping,
                "rung_steps": list(fidelity.rung_steps),
                "eta": fidelity.eta,
            },
            "ablation_share": settings.ablation_share,
            "ablation_seeds": settings.ablation_seeds,
            "baselines_share": settings.baselines_share,
            "fidelity_share": settings.fidelity_share,
            "seed": settings.seed,
            "sampler": settings.sampler,
            LATENCY_MODELS_ATTR: {d.name: {"file": d.model_path, "target": d.target, "accuracy": d.accuracy,
                                           "max_latency_ms": d.max_latency_ms} for d in device_latency},
            "context": spec.to_dict(),
            TRAIN_SETTINGS_VERSION_ATTR: TRAIN_SETTINGS_VERSION,
        }
        for name, params in space.reference_params().items():
            study.enqueue_trial(params, user_attrs={"reference": name}, skip_if_exists=True)
        for key, value in attrs.items():  # "context" last: other workers wait for it
            study.set_user_attr(key, value)
    else:
        _check_compatible(study, spec, space, settings)
        stale = stale_train_settings(study)
        if stale is not None:
            raise SearchError(stale)
        study.set_user_attr(TRAIN_SETTINGS_VERSION_ATTR, TRAIN_SETTINGS_VERSION)
        study.set_user_attr("budget", budget.text)  # a resume may extend the budget
    return PreparedStudy(study, storage_url, study_dir, space, budget, spec, objectives, device, dev_name, created)


def _load_device_latency(settings: SearchSettings, objectives: list[Objective], space: Any) -> list[Any]:
    """Load the latency model of each device profile an objective or a limit names (before the
    study is created: a missing or refused model is one line, exit 2)."""
    from ehrsr.search.device_latency import DeviceLatencyError, load_device_latencies

    names = [p for p in (device_latency_profile(o.name) for o in objectives) if p is not None]
    try:
        return load_device_latencies(names, settings.device_latency_limits, space, settings.device_profiles,
                                     settings.devices_file)
    except DeviceLatencyError as exc:
        raise SearchError(str(exc)) from None


def _claim_new_study(storage: optuna.storages.BaseStorage, name: str, objectives: list[Objective]) -> bool:
    """Create the study; True only in the one process whose creation succeeded."""
    from optuna.study import StudyDirection

    directions = [StudyDirection.MAXIMIZE if o.direction == "maximize" else StudyDirection.MINIMIZE for o in objectives]
    try:
        storage.create_new_study(directions, name)
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False


CONTEXT_WAIT_SECONDS = 60.0


def _wait_for_context(study: optuna.Study) -> None:
    """A worker that just created the study may still be writing its attributes ("context" is
    written last); wait for them, then go on either way (an older run may have died before)."""
    import time

    deadline = time.monotonic() + CONTEXT_WAIT_SECONDS
    while "context" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)


def load_study(study_name: str, storage: str | None, out_dir: Path) -> tuple[optuna.Study, str, Path]:
    """Open an existing study for ``report`` / ``ablate`` / ``deploy``; clear error if missing."""
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


def _replace_unfinished(storage: optuna.storages.BaseStorage, name: str, spec: ContextSpec, space: Any,
                        settings: SearchSettings, log: Any) -> bool:
    """Delete the stored study ``name`` when it asks another question than these settings but has no
    finished (complete or pruned) trial: nothing would be lost, and a first run that failed must
    not lock its study to the settings that failed. Returns True when it was deleted."""
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    if "context" not in study.user_attrs:
        return False
    try:
        _check_compatible(study, spec, space, settings)
        return False
    except SearchError as exc:
        why = str(exc).split(";")[0]
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if finished:
        return False
    optuna.delete_study(study_name=name, storage=storage)
    log(f"note: {why}, but it has no finished trial: re-created with the new settings")
    return True


def _check_compatible(study: optuna.Study, spec: ContextSpec, space: Any, settings: SearchSettings) -> None:
    """A resume must ask the same question; otherwise the trials would not be comparable."""
    stored = ContextSpec.from_dict(study.user_attrs["context"])
    hint = "use another --study-name for a different search"
    if stored.objectives != spec.objectives:
        raise SearchError(
            f"study {study.study_name!r} optimises {','.join(stored.objectives)}, not {','.join(spec.objectives)}; {hint}"
        )
    for key, label in (("task", "task"), ("train_data", "--train-data"), ("val_data", "--val-data"),
                       ("profile_shape", "--profile-size"), ("profile_dtype", "--profile-dtype")):
        if getattr(stored, key) != getattr(spec, key):
            raise SearchError(
                f"study {study.study_name!r} was created with {label} {getattr(stored, key)}, "
                f"not {getattr(spec, key)}; {hint}"
            )
    stored_space = study.user_attrs.get("space", {})
    if stored_space.get("yaml") != space.source_text:
        raise SearchError(
            f"study {study.study_name!r} was created with a different search space "
            f"({stored_space.get('name')}); {hint}"
        )


def _resolve_workers(workers: int | str, device: torch.device) -> int:
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


def _task(spec: ContextSpec) -> Any:
    from ehrsr.data import TaskConfig

    return TaskConfig.from_dict(spec.task)
