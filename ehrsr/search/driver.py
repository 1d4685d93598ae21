"""The study driver: budgeted, resumable, multi-worker multi-objective search over EHR-SR.

One worker loop (``run_worker``) repeats until the budget says stop: ask Optuna for a trial,
sample a configuration, run it (``run_configuration``) with MO-ASHA deciding at every rung,
record everything the reports need (docs/study_schema.md) and tell Optuna the outcome. Several
workers (``--workers``) run the same loop in separate processes on the same storage; the budget,
the rung values and the trials are shared through it, so any number of machines can join.

Robustness:

* every trial's outcome is written to the storage before the next one starts (a killed worker
  loses at most its running trial);
* a running trial refreshes a heartbeat user attribute; a worker finding a trial whose heartbeat
  is older than ``STALE_SECONDS`` marks it failed ("worker stopped"), so a dead worker's trial
  neither stays RUNNING forever nor keeps eating the budget;
* on CUDA (or with ``isolate=True``) each trial runs in a child process: a CUDA error or a crash
  in an extension ends that trial only, and the GPU memory is released with the process;
* Ctrl-C marks the running trial failed ("interrupted") and the search still writes its summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing as mp
import os
import platform
import queue
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import ehrsr
from ehrsr.config import EHRSRConfig
from ehrsr.search.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, Objective, parse_objectives
from ehrsr.search.runner import Limits, RunContext, RunResult, run_configuration
from ehrsr.search.storage import StorageError, default_storage_url, mask_url, open_storage

__all__ = [
    "ContextSpec",
    "SearchError",
    "SearchSettings",
    "SearchSummary",
    "build_context",
    "load_study",
    "prepare_study",
    "run_search",
    "run_worker",
]

STALE_SECONDS = 300.0  # a running trial silent this long belongs to a dead worker
HEARTBEAT_SECONDS = 30.0
MAX_CONSECUTIVE_REFUSALS = 50


class SearchError(RuntimeError):
    """A problem the user must fix (bad option, incompatible existing study...); one line."""


# ---------------------------------------------------------------------------------------------
# settings


@dataclass
class SearchSettings:
    """Everything ``run_search.py`` can set; the defaults are the newcomer's CPU demo."""

    space: str | None = None  # None: "full" with CUDA, else "tiny"
    budget: str | None = None  # None: gpu-hours=1 with CUDA, else minutes=10
    objectives: str = ",".join(DEFAULT_OBJECTIVES)
    device: str | None = None  # None: cuda when present, else cpu
    profile_size: tuple[int, int] = (256, 256)  # LR input of the latency profile (NTIRE: 256x256)
    profile_dtype: str = "float32"
    threads: int | None = None  # CPU threads for training and latency (None: torch's default)
    limits: Limits = field(default_factory=Limits)
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
    isolate: bool | None = None  # None: child process per trial on CUDA only
    ablation_share: float = 0.15
    ablation_seeds: int = 2
    write_reports: bool = True
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose

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
) -> RunContext:
    """Prepare data (from the on-disk cache after the first time), LPIPS and the run context."""
    from ehrsr.data import TaskConfig, prepare_data

    task = TaskConfig.from_dict(spec.task)
    train_set, val_set = prepare_data(
        task,
        spec.train_data,
        spec.val_data,
        cache_dir=spec.cache_dir,
        progress=progress,
    )
    train_set = train_set.to(device)
    lpips = _load_lpips(device, lpips_weights, required=need_lpips, log=log)
    return RunContext(
        train_set=train_set,
        val_set=val_set,
        objectives=[OBJECTIVES[n] for n in spec.objectives],
        device=device,
        crop_border=spec.crop_border,
        patch_size=spec.patch_size,
        batch_size=spec.batch_size,
        loss=spec.loss,
        profile_shape=tuple(spec.profile_shape),
        profile_dtype=spec.profile_dtype,
        threads=spec.threads,
        lpips=lpips,
        limits=Limits.from_dict(spec.limits),
    )


def _load_lpips(device: torch.device, weights: str | None, *, required: bool, log: Any) -> Any:
    from ehrsr.metrics import LPIPS, LPIPSUnavailable

    try:
        return LPIPS(device=device, weights_path=weights)
    except LPIPSUnavailable as exc:
        if required:
            raise SearchError(f"lpips is an objective but LPIPS is unavailable: {exc}") from None
        if log is not None:
            log(f"note: LPIPS unavailable, continuing without it ({exc})")
        return None


# ---------------------------------------------------------------------------------------------
# study creation / loading


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


def _sampler(name: str, seed: int, n_objectives: int, constrained: bool) -> optuna.samplers.BaseSampler:
    constraints_func = _constraints_of if constrained else None
    name = name.lower()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_func, multivariate=True, group=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    if name == "nsga3":
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
    from ehrsr.profiling import device_name
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
    if not 0 <= settings.ablation_share < 1:
        raise SearchError(f"--ablation-share must be in [0, 1), got {settings.ablation_share}")

    study_name = settings.study_name or _default_study_name(space.name, task, settings.train_data, settings.val_data)
    study_dir = Path(settings.out_dir) / study_name
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SearchError(f"output folder {study_dir} is not writable: {exc.strerror}") from None
    workers = _resolve_workers(settings.workers, device)
    storage_url = settings.storage or default_storage_url(study_dir, workers)
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
    )
    constrained = settings.limits.max_latency_ms is not None or settings.limits.max_memory_mb is not None
    sampler = _sampler(settings.sampler, settings.seed, len(objectives), constrained)
    try:
        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as exc:
        raise StorageError(f"cannot read storage {mask_url(storage_url)}: {str(exc).splitlines()[0]}") from None
    created = study_name not in existing
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=[o.direction for o in objectives],
        sampler=sampler,
        load_if_exists=True,
    )
    dev_name = device_name(device, settings.threads)
    if created or "context" not in study.user_attrs:
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
            "conventions": _conventions(spec, dev_name),
            "early_stopping": {
                "enabled": settings.early_stopping,
                "rung_steps": list(fidelity.rung_steps),
                "eta": fidelity.eta,
            },
            "ablation_share": settings.ablation_share,
            "ablation_seeds": settings.ablation_seeds,
            "seed": settings.seed,
            "sampler": settings.sampler,
            "context": spec.to_dict(),
        }
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        for name, params in space.reference_params().items():
            study.enqueue_trial(params, user_attrs={"reference": name}, skip_if_exists=True)
    else:
        _check_compatible(study, spec, space, settings)
        study.set_user_attr("budget", budget.text)  # a resume may extend the budget
    return PreparedStudy(study, storage_url, study_dir, space, budget, spec, objectives, device, dev_name, created)


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


def _conventions(spec: ContextSpec, dev_name: str) -> dict[str, str]:
    shape = "x".join(str(s) for s in spec.profile_shape)
    y = f"Y channel (ITU-R BT.601, MATLAB rgb2ycbcr), crop_border={spec.crop_border}, uint8-rounded (BasicSR)"
    return {
        "psnr": f"PSNR on {y}",
        "ssim": f"SSIM (11x11 Gaussian, sigma 1.5) on {y}",
        "lpips": "LPIPS (AlexNet, v0.1) via pyiqa on RGB in [0, 1]",
        "macs": f"fvcore MACs (one multiply-add = 1) of the deploy form at {shape}",
        "latency": f"median latency of the deploy form at {shape}, {spec.profile_dtype}, on {dev_name}",
        "memory": f"peak memory of one inference at {shape} on {dev_name}",
        "lr": "LR made by MATLAB-compatible bicubic (antialiased, a=-0.5) after cropping HR to a multiple of the scale",
    }


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


# ---------------------------------------------------------------------------------------------
# one trial


def config_summary(config: EHRSRConfig | None) -> str:
    """Short human summary: ``w16 naf L2 T2@2 +wab+moe``."""
    if config is None:
        return "-"
    modules = "+".join(config.enabled_modules()) or "conv-only"
    return (
        f"w{config.width} {config.block_type} L{config.msg.levels} "
        f"T{config.trunk_blocks}@{config.resolved_trunk_level} {modules}"
    )


@dataclass
class TrialJob:
    """What a trial needs, picklable so it can cross into a child process."""

    storage_url: str
    study_name: str
    trial_id: int
    trial_number: int
    config: dict[str, Any]
    train: dict[str, Any]
    steps: int
    seed: int
    rung_steps: list[int]
    eta: int
    early_stopping: bool
    spec: dict[str, Any]
    device: str
    lpips_weights: str | None
    weights_path: str | None
    threads: int | None


def execute_trial(job: TrialJob, ctx: RunContext | None = None, study: optuna.Study | None = None) -> dict[str, Any]:
    """Run one trial and write its attributes; returns a small picklable outcome for ``tell``."""
    from ehrsr.search.asha import MOASHA

    if study is None:
        study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage_url))
    trial = optuna.trial.Trial(study, job.trial_id)
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    spec = ContextSpec.from_dict(job.spec)
    if ctx is None:
        ctx = build_context(spec, device, lpips_weights=job.lpips_weights)
    config = EHRSRConfig.from_dict(job.config)
    asha = MOASHA(job.rung_steps[0], job.eta, job.steps, [o.direction for o in ctx.objectives])
    stop_reason: dict[str, str] = {}

    def on_rung(rung_index: int, step: int, values: list[float], metrics: dict[str, Any]) -> bool:
        trial.set_user_attr(f"rung_{rung_index}", {"step": step, "values": values, "metrics": _jsonable(metrics)})
        constraints = ctx.limits.constraints(metrics)
        violated = {k: v for k, v in constraints.items() if v > 0}
        if violated and job.early_stopping:
            # cost does not change with training: an infeasible configuration stays infeasible
            stop_reason["reason"] = f"infeasible at rung {rung_index} ({step} steps): " + ", ".join(
                f"{k} exceeds its limit by {v:.3g}" for k, v in violated.items()
            )
            return False
        if not job.early_stopping:
            return True
        decision = asha.decide(trial, rung_index, values)
        if not decision.promote:
            stop_reason["reason"] = f"stopped by MO-ASHA at {decision.reason}"
        return decision.promote

    rung_steps = asha.rungs[:-1] if job.early_stopping else ()
    result: RunResult = run_configuration(
        config, job.train, ctx, steps=job.steps, seed=job.seed, rung_steps=rung_steps, on_rung=on_rung
    )
    outcome: dict[str, Any] = {
        "status": result.status,
        "reason": stop_reason.get("reason", result.reason),
        "values": result.values,
        "metrics": _jsonable(result.metrics),
        "seconds": result.seconds,
        "steps_done": result.steps_done,
        "constraints": {},
    }
    if result.metrics and "latency_ms" in result.metrics:
        outcome["constraints"] = ctx.limits.constraints(result.metrics)
    if result.status == "complete" and result.model is not None and job.weights_path:
        from safetensors.torch import save_model

        Path(job.weights_path).parent.mkdir(parents=True, exist_ok=True)
        save_model(result.model.cpu(), job.weights_path)
        outcome["weights"] = job.weights_path
    return outcome


def _child_main(job: TrialJob, results: Any) -> None:
    try:
        results.put(("ok", execute_trial(job)))
    except BaseException as exc:  # report every failure to the parent, then exit non-zero
        results.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def execute_isolated(job: TrialJob, poll_seconds: float = 1.0) -> dict[str, Any]:
    """Run ``execute_trial`` in a spawned child process; a crash becomes an outcome, not an exception."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child_main, args=(job, results), daemon=True)
    child.start()
    message = None
    try:
        while message is None:
            try:
                message = results.get(timeout=poll_seconds)
            except queue.Empty:
                if not child.is_alive():
                    with contextlib.suppress(queue.Empty):
                        message = results.get(timeout=1.0)
                    break
    except KeyboardInterrupt:
        child.terminate()
        raise
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    if message is None:
        code = child.exitcode
        what = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "crashed", "reason": f"trial process died ({what})", "values": None, "metrics": {},
                "seconds": {}, "steps_done": 0, "constraints": {}}
    if message[0] == "error":
        return {"status": "error", "reason": message[1], "traceback": message[2], "values": None, "metrics": {},
                "seconds": {}, "steps_done": 0, "constraints": {}}
    return message[1]


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


class _Heartbeat:
    """Refreshes the trial's ``heartbeat`` user attribute while it runs (see module docstring)."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.study, self.trial_id = study, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                self.study._storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())

    def __enter__(self) -> _Heartbeat:
        self.study._storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale_trials(study: optuna.Study, now: float | None = None) -> list[int]:
    """Mark RUNNING trials whose heartbeat is older than ``STALE_SECONDS`` failed; return their numbers."""
    now = time.time() if now is None else now
    failed = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = frozen.user_attrs.get("heartbeat")
        if beat is None or now - float(beat) < STALE_SECONDS:
            continue
        storage = study._storage
        start = frozen.datetime_start.timestamp() if frozen.datetime_start else float(beat)
        with contextlib.suppress(Exception):
            storage.set_trial_user_attr(frozen._trial_id, "status", "crashed")
            storage.set_trial_user_attr(frozen._trial_id, "reason", "its worker stopped (no heartbeat)")
            n_dev = int(frozen.user_attrs.get("n_devices", 1))
            storage.set_trial_user_attr(frozen._trial_id, "charged_seconds", max(0.0, float(beat) - start) * n_dev)
            storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL)
            failed.append(frozen.number)
    return failed


# ---------------------------------------------------------------------------------------------
# the worker loop


@dataclass
class WorkerSummary:
    finished: int = 0
    stopped_reason: str = ""
    interrupted: bool = False


class _Log:
    """Trial lines, notes and the budget progress bar, honouring --quiet / --verbose."""

    def __init__(self, verbosity: int, prefix: str = "", show_bar: bool = True) -> None:
        self.verbosity = verbosity
        self.prefix = prefix
        self.bar = None
        if show_bar and verbosity >= 1 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", desc="budget", leave=False, bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}]")

    def __call__(self, text: str, level: int = 1) -> None:
        if self.verbosity < level:
            return
        line = f"{self.prefix}{text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, fraction: float) -> None:
        if self.bar is not None:
            self.bar.n = min(100.0, 100.0 * fraction)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_worker(prepared: PreparedStudy, settings: SearchSettings, *, log: _Log | None = None,
               worker_index: int = 0) -> WorkerSummary:
    """The search loop of one worker (see the module docstring)."""
    from ehrsr.search.budget import (
        estimate_trial_seconds,
        record_charge,
        record_refused,
        record_start,
    )

    log = log or _Log(settings.verbosity)
    study, space, budget = prepared.study, prepared.space, prepared.budget
    device = prepared.device
    isolate = settings.isolate if settings.isolate is not None else device.type == "cuda"
    fidelity = space.fidelity
    ctx = None
    if not isolate:
        ctx = build_context(
            prepared.spec, device, lpips_weights=settings.lpips_weights,
            need_lpips="lpips" in prepared.spec.objectives, log=log if worker_index == 0 else None,
        )
    search_budget = search_share(budget, 1.0 - settings.ablation_share)
    summary = WorkerSummary()
    refusals = 0
    running_trial: optuna.Trial | None = None
    try:
        while True:
            fail_stale_trials(study)
            estimate = estimate_trial_seconds(study, fidelity.seconds_per_trial_estimate, device.type)
            ok, why = search_budget.allows_new_trial(study, estimate, device_kind=device.type)
            if not ok:
                summary.stopped_reason = why
                break
            trial = study.ask()
            running_trial = trial
            ok, why = search_budget.allows_new_trial(study, estimate, device_kind=device.type, trial_number=trial.number)
            if not ok:  # another worker took the last slot
                record_refused(trial, why)
                _tell(study, trial, "refused", f"budget: {why}")
                running_trial = None
                summary.stopped_reason = why
                break
            record_start(trial, device.type, 1)
            trial.set_user_attr("device_name", prepared.device_name)
            sampled = space.suggest(trial, scale=prepared.spec.task.get("scale", 4))
            if sampled.config is not None:
                trial.set_user_attr("config", sampled.config.to_dict())
            train = {**sampled.train, "steps": fidelity.max_steps, "batch_size": fidelity.batch_size,
                     "patch_size": fidelity.patch_size, "loss": fidelity.loss, "seed": settings.seed}
            trial.set_user_attr("train", train)
            if sampled.refused is not None:
                record_refused(trial, sampled.refused)
                _tell(study, trial, "refused", f"refused before training: {sampled.refused}")
                log(f"#{trial.number:<4} {config_summary(sampled.config):<40} refused: {sampled.refused}", 2)
                running_trial = None
                refusals += 1
                if refusals >= MAX_CONSECUTIVE_REFUSALS:
                    summary.stopped_reason = (
                        f"{refusals} configurations in a row were refused; relax the limits or change the space"
                    )
                    break
                continue
            job = TrialJob(
                storage_url=prepared.storage_url,
                study_name=study.study_name,
                trial_id=trial._trial_id,
                trial_number=trial.number,
                config=sampled.config.to_dict(),
                train=train,
                steps=fidelity.max_steps,
                seed=settings.seed + trial.number,
                rung_steps=list(fidelity.rung_steps),
                eta=fidelity.eta,
                early_stopping=settings.early_stopping,
                spec=prepared.spec.to_dict(),
                device=str(device),
                lpips_weights=settings.lpips_weights,
                weights_path=str(prepared.study_dir / "weights" / f"trial_{trial.number:05d}.safetensors"),
                threads=settings.threads,
            )
            start = time.perf_counter()
            with _Heartbeat(study, trial._trial_id):
                outcome = execute_isolated(job) if isolate else execute_trial(job, ctx=ctx, study=study)
            wall = time.perf_counter() - start
            if outcome["status"] == "refused":
                record_refused(trial, outcome["reason"])
                refusals += 1
            else:
                record_charge(trial, wall)
                refusals = 0
            _finish(study, trial, outcome, prepared.study_dir)
            running_trial = None
            summary.finished += 1
            log(_trial_line(study, trial.number, sampled.config, outcome, prepared.objectives, wall))
            if outcome.get("traceback"):
                log(outcome["traceback"], 2)
            log.progress(search_budget.used_fraction(search_budget.spent(study)))
            _write_trials_csv(study, prepared.study_dir)
            if refusals >= MAX_CONSECUTIVE_REFUSALS:
                summary.stopped_reason = f"{refusals} configurations in a row were refused; relax the limits"
                break
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.stopped_reason = "interrupted (Ctrl-C)"
        if running_trial is not None:
            with contextlib.suppress(Exception):
                _tell(study, running_trial, "interrupted", "interrupted by the user (Ctrl-C)")
    return summary


def search_share(budget: Any, fraction: float) -> Any:
    """The part of a budget the search itself may use: time limits scaled by ``fraction`` (the rest is
    kept for the controlled ablation); a ``trials`` limit counts search trials and is kept as is."""
    from ehrsr.search.budget import Budget, Limit

    limits = tuple(
        limit if limit.unit == "trials" else Limit(limit.unit, limit.amount * fraction) for limit in budget.limits
    )
    return Budget(limits, text=budget.text)


def _tell(study: optuna.Study, trial: optuna.Trial, status: str, reason: str) -> None:
    trial.set_user_attr("status", status)
    trial.set_user_attr("reason", reason)
    study.tell(trial, state=TrialState.FAIL)


def _finish(study: optuna.Study, trial: optuna.Trial, outcome: dict[str, Any], study_dir: Path) -> None:
    """Write the outcome to the storage and tell Optuna (COMPLETE, PRUNED or FAIL)."""
    status = outcome["status"]
    for key in ("metrics", "seconds", "steps_done"):
        if outcome.get(key) is not None:
            trial.set_user_attr(key, outcome[key])
    if outcome.get("weights"):
        trial.set_user_attr("weights", os.path.relpath(outcome["weights"], study_dir))
    for key, value in (outcome.get("constraints") or {}).items():
        trial.set_constraint(key, value)
    trial.set_user_attr("status", {"stopped": "pruned"}.get(status, status))
    if outcome.get("reason"):
        trial.set_user_attr("reason", outcome["reason"])
    if status == "complete":
        study.tell(trial, outcome["values"])
    elif status == "stopped":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def _fmt_value(objective: Objective, value: float | None) -> str:
    if value is None:
        return f"{objective.name} -"
    if objective.name in ("macs", "params"):
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if value >= factor:
                return f"{objective.name} {value / factor:.2f}{suffix}"
        return f"{objective.name} {value:.0f}"
    unit = f" {objective.unit}" if objective.unit else ""
    digits = 2 if objective.name in ("psnr", "latency") else 4
    return f"{objective.name} {value:.{digits}f}{unit}"


def _trial_line(study: optuna.Study, number: int, config: EHRSRConfig | None, outcome: dict[str, Any],
                objectives: list[Objective], wall: float) -> str:
    metrics = outcome.get("metrics") or {}
    parts = [_fmt_value(o, metrics.get(o.metric_key)) for o in objectives]
    cost = []
    if metrics.get("params_deploy") is not None:
        cost.append(f"{metrics['params_deploy'] / 1e6:.3f}M params")
    if metrics.get("macs") is not None:
        cost.append(f"{metrics['macs'] / 1e9:.2f}G MACs")
    status = {"stopped": "pruned"}.get(outcome["status"], outcome["status"])
    reason = f" ({outcome['reason']})" if outcome.get("reason") and status != "complete" else ""
    return (
        f"#{number:<4} {config_summary(config):<42} {'  '.join(parts):<34} "
        f"{', '.join(cost):<28} {wall:6.1f}s  {status}{reason}"
    )


def _write_trials_csv(study: optuna.Study, study_dir: Path) -> None:
    from ehrsr.reports import write_trials_csv

    with contextlib.suppress(OSError):
        write_trials_csv(study, study_dir / "trials.csv")


# ---------------------------------------------------------------------------------------------
# the whole search


@dataclass
class SearchSummary:
    study_name: str
    storage_url: str
    study_dir: Path
    n_complete: int
    n_pruned: int
    n_failed: int
    pareto_size: int
    best: dict[str, tuple[int, float]]
    spent: str
    stopped_reason: str
    interrupted: bool
    report: Path | None = None


def _worker_process(settings: SearchSettings, worker_index: int, gpu: int | None) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        settings.device = "cuda:0"
    prepared = prepare_study(settings, log=lambda *_: None)
    log = _Log(settings.verbosity, prefix=f"[w{worker_index}] ", show_bar=False)
    run_worker(prepared, settings, log=log, worker_index=worker_index)


def run_search(settings: SearchSettings) -> SearchSummary:
    """Prepare data and the study, run the workers, write reports and return the summary."""
    log = _Log(settings.verbosity)
    prepared = prepare_study(settings, log=log)
    study = prepared.study
    log(f"study {study.study_name} ({'new' if prepared.created else 'resumed'}) in {mask_url(prepared.storage_url)}")
    log(f"space {prepared.space.name}, task {_task_slug(_task(prepared.spec))}, device {prepared.device_name}, "
        f"objectives {','.join(o.name for o in prepared.objectives)}, budget {prepared.budget.describe_short()}"
        f" ({settings.ablation_share:.0%} kept for the controlled ablation)")
    if prepared.spec.train_data is None:
        log("warning: training and validating on the built-in scikit-image sample images: the numbers "
            "only demonstrate the suite; pass --train-data/--val-data for real results")
    # prepare the data cache once here, so workers and child processes only read it
    build_context(prepared.spec, torch.device("cpu"), lpips_weights=None, progress=settings.verbosity >= 1)
    workers = _resolve_workers(settings.workers, prepared.device)
    summary = WorkerSummary()
    try:
        if workers == 1:
            summary = run_worker(prepared, settings, log=log)
        else:
            summary = _run_worker_processes(settings, prepared, workers, log)
    finally:
        log.close()
    return _summarise(prepared, settings, summary, log)


def _run_worker_processes(settings: SearchSettings, prepared: PreparedStudy, workers: int, log: _Log) -> WorkerSummary:
    ctx = mp.get_context("spawn")
    worker_settings = SearchSettings(**{**asdict(settings), "study_name": prepared.study.study_name,
                                        "storage": prepared.storage_url})
    worker_settings.limits = settings.limits
    gpus = list(range(workers)) if prepared.device.type == "cuda" else [None] * workers
    procs = [ctx.Process(target=_worker_process, args=(worker_settings, i, gpus[i])) for i in range(workers)]
    log(f"starting {workers} workers on {mask_url(prepared.storage_url)}")
    for proc in procs:
        proc.start()
    summary = WorkerSummary()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        summary.interrupted = True
        for proc in procs:
            proc.join(timeout=60)
    summary.stopped_reason = "workers finished" if not summary.interrupted else "interrupted (Ctrl-C)"
    return summary


def _task(spec: ContextSpec) -> Any:
    from ehrsr.data import TaskConfig

    return TaskConfig.from_dict(spec.task)


def _summarise(prepared: PreparedStudy, settings: SearchSettings, worker: WorkerSummary, log: _Log) -> SearchSummary:
    study = optuna.load_study(study_name=prepared.study.study_name, storage=open_storage(prepared.storage_url))
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    best: dict[str, tuple[int, float]] = {}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for i, objective in enumerate(prepared.objectives):
        if complete:
            pick = (max if objective.direction == "maximize" else min)(complete, key=lambda t: t.values[i])
            best[objective.name] = (pick.number, pick.values[i])
    pareto = study.best_trials if complete else []
    spent = prepared.budget.spent(study).describe()
    summary = SearchSummary(
        study_name=study.study_name,
        storage_url=mask_url(prepared.storage_url),
        study_dir=prepared.study_dir,
        n_complete=by_state[TrialState.COMPLETE],
        n_pruned=by_state[TrialState.PRUNED],
        n_failed=by_state[TrialState.FAIL],
        pareto_size=len(pareto),
        best=best,
        spent=spent,
        stopped_reason=worker.stopped_reason,
        interrupted=worker.interrupted,
    )
    _write_trials_csv(study, prepared.study_dir)
    if settings.write_reports:
        try:
            summary.report = _write_reports(study, prepared, settings, log)
        except Exception as exc:  # a report problem must not hide the search results
            log(f"warning: could not write the report: {type(exc).__name__}: {exc}")
    _print_summary(summary, prepared.objectives, log)
    return summary


def _write_reports(study: optuna.Study, prepared: PreparedStudy, settings: SearchSettings, log: _Log) -> Path | None:
    from ehrsr.reports import write_report

    return write_report(study, prepared.study_dir, quiet=settings.verbosity == 0)


def _print_summary(summary: SearchSummary, objectives: list[Objective], log: _Log) -> None:
    log("")
    log(f"Search {summary.study_name}: {summary.stopped_reason or 'done'}", 0)
    rows = [
        ("trials", f"{summary.n_complete} complete, {summary.n_pruned} stopped early, {summary.n_failed} failed/refused"),
        ("Pareto set", f"{summary.pareto_size} trials"),
    ]
    for objective in objectives:
        if objective.name in summary.best:
            number, value = summary.best[objective.name]
            rows.append((f"best {objective.name}", f"{_fmt_value(objective, value).split(' ', 1)[1]} (trial #{number})"))
    rows.append(("budget used", summary.spent))
    rows.append(("storage", summary.storage_url))
    rows.append(("results", str(summary.study_dir) + (f" (report: {summary.report})" if summary.report else "")))
    width = max(len(r[0]) for r in rows)
    for key, value in rows:
        log(f"  {key.ljust(width)}  {value}", 0)


def machine_description() -> str:
    return f"{platform.node()} ({platform.system()} {platform.machine()}), {datetime.now():%Y-%m-%d %H:%M}"
