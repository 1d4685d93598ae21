"""The study driver: budgeted, resumable, multi-worker multi-objective search over EHR-SR.

One worker loop (``run_worker``) repeats until the budget says stop: ask Optuna for a trial,
sample a configuration, run it (``execute_trial``) with MO-ASHA deciding at every rung, record
everything the reports need (docs/study_schema.md) and tell Optuna the outcome. Several workers
(``--workers``) run the same loop in separate processes on the same storage; the budget, the rung
values and the trials are shared through it, so any number of machines can join.

Every trial's outcome is written to the storage before the next one starts (a killed worker
loses at most its running trial, which another worker later marks failed); Ctrl-C or SIGTERM
marks the running trial failed ("interrupted", ``ehrsr.interrupts``). Every outcome goes through ``ehrsr.search.record``, the one
recording path. What follows a search (the controlled ablation, deployment picks, the report)
is ``ehrsr.pipeline``'s business: this package imports none of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from ehrsr.errors import UserError
from ehrsr.interrupts import SIGTERM, interrupt_name, sigterm_as_interrupt
from ehrsr.search.pareto import front_trials
from ehrsr.search.record import Heartbeat, TrialOutcome, fail_stale_trials, record_outcome
from ehrsr.search.revisits import RepeatPolicy, record_repeat, sampler_seed
from ehrsr.search.settled import one_read
from ehrsr.search.storage import (
    StorageError,
    StorageFull,
    mask_url,
    open_storage,
    retry_storage,
    retrying,
    storage_full,
    storage_unreachable,
)
from ehrsr.search.study import (
    ContextSpec,
    PreparedStudy,
    SearchSettings,
    build_context,
    build_sampler,
    prepare_study,
    resolve_workers,
)
from ehrsr.search.trial import TrialJob, cached_cost, execute_isolated, execute_trial
from ehrsr.study_schema import (
    BASELINE_ATTR,
    BUDGET_ATTR,
    TRIAL,
    Objective,
    fidelity_checks,
    format_si,
    is_count,
    steps_scale,
    study_storage,
)

__all__ = [
    "AfterTrial",
    "SearchLog",
    "SearchSummary",
    "WorkerSummary",
    "baseline_quality",
    "print_summary",
    "run_search",
    "run_worker",
    "search_share",
]

# called after every recorded trial with the study and its folder (the pipeline writes trials.csv);
# a module-level function, so it can cross into worker processes
AfterTrial = Callable[[optuna.Study, Path], None]

MAX_CONSECUTIVE_REFUSALS = 50


@dataclass
class WorkerSummary:
    paused: bool = False  # stopped at ``pause_at``, not at the end of the budget
    finished: int = 0
    repeats: int = 0  # proposals recorded as repeats of finished trials, not trained
    stopped_reason: str = ""
    interrupted_by: str | None = None  # "Ctrl-C" or "SIGTERM" (ehrsr.interrupts) when stopped by one

    @property
    def interrupted(self) -> bool:
        return self.interrupted_by is not None


class SearchLog:
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


def run_worker(prepared: PreparedStudy, settings: SearchSettings | None = None, *, log: SearchLog | None = None,
               worker_index: int = 0, after_trial: AfterTrial | None = None,
               pause_at: float | None = None) -> WorkerSummary:
    """The search loop of one worker (see the module docstring). It runs ``prepared.settings``
    (the study record's values); ``settings`` is accepted for its verbosity only. ``pause_at``:
    stop starting trials once this share of the search's budget is used (the pipeline checks the
    proxy fidelity there, then resumes)."""
    settings = prepared.settings
    log = log or SearchLog(settings.verbosity)
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
    search_budget = search_share(budget, 1.0 - settings.reserved_share)
    retry = retrying(log, prepared.storage_url)
    study.sampler = retry("start the sampler", worker_sampler, prepared, settings, worker_index)
    policy = RepeatPolicy(allow_repeats=settings.allow_repeats)
    summary = WorkerSummary()
    refusals = 0
    repeats = 0  # proposals in a row that repeated a finished configuration
    running_trial: optuna.Trial | None = None

    try:
        while True:
            with one_read(study):  # the checks of a loop step share one read of the trials
                retry("fail orphaned trials", fail_stale_trials, study)
                study_attrs = retry("read the study's settings", lambda: study.user_attrs)
                fidelity = space.fidelity.scaled(steps_scale(study_attrs))
                estimate, (ok, why) = retry("check the budget", _budget_check, study, search_budget, fidelity, device)
                used = search_budget.used_fraction(retry("read the budget", search_budget.spent, study))
            log.progress(used)
            if not ok:
                summary.stopped_reason = why
                if settings.reserved_share > 0 and any(limit.seconds for limit in budget.limits):
                    summary.stopped_reason += (
                        f" (the search's {1 - settings.reserved_share:.0%} of --budget {budget.text}; "
                        "the rest is kept for the controlled ablation, baselines and proxy-fidelity check)"
                    )
                break
            if pause_at is not None and used >= pause_at:
                summary.stopped_reason = f"paused at {pause_at:.0%} of the search budget for the proxy-fidelity check"
                summary.paused = True
                break
            trial = retry("ask for a trial", study.ask)
            running_trial = trial
            sampled = earlier = None
            with one_read(study):  # the budget's check after the ask and the repeat lookup share one read
                ok, why = retry("check the budget", search_budget.allows_new_trial, study, estimate,
                                device_kind=device.type, trial_number=trial.number)
                if ok:
                    if study_attrs.get(BUDGET_ATTR) != budget.text:  # the budget of the latest run that trains
                        retry("store the budget", study.set_user_attr, BUDGET_ATTR, budget.text)
                        study_attrs = {**study_attrs, BUDGET_ATTR: budget.text}
                    sampled, train, cost_before = retry("start a trial", _start_trial, trial, prepared, settings,
                                                        fidelity)
                    if sampled.refused is None:  # a finished repeat of the proposal? (finished trials only)
                        earlier = retry("look for a finished repeat", policy.check, study, trial.number,
                                        sampled.config.to_dict(), train)
            if not ok:  # another worker took the last slot
                retry("record a trial", record_outcome, study, trial, TrialOutcome.failed("refused", f"budget: {why}"))
                running_trial = None
                summary.stopped_reason = why
                break
            if sampled.refused is not None:
                retry("record a trial", record_outcome, study, trial,
                      TrialOutcome.failed("refused", f"refused before training: {sampled.refused}"))
                log(f"#{trial.number:<4} {sampled.summary():<40} refused: {sampled.refused}", 2)
                running_trial = None
                refusals += 1
                if refusals >= MAX_CONSECUTIVE_REFUSALS:
                    summary.stopped_reason = (
                        f"{refusals} configurations in a row were refused; relax the limits or change the space"
                    )
                    break
                continue
            if earlier is not None:
                retry("record a trial", _record_repeat, prepared, trial, earlier, sampled.summary(), log)
                running_trial = None
                summary.repeats += 1
                repeats += 1
                if after_trial is not None:
                    retry("write the trials table", after_trial, study, prepared.study_dir)
                converged = policy.converged(repeats)
                if converged is not None:
                    summary.stopped_reason = converged
                    break
                continue
            repeats = 0
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
                weights_path=str(_weights_path(prepared, trial.number)),
                threads=settings.threads,
                device_name=prepared.device_name,
                cost_before=cost_before,
            )
            start = time.perf_counter()
            heartbeat = Heartbeat(study, trial._trial_id, first_beat_written=True)  # with the start
            retry("start the heartbeat", heartbeat.__enter__)
            try:
                outcome = execute_isolated(job) if isolate else _execute_guarded(job, ctx, study)
            except UserError as exc:
                # a user error inside a trial (bad data, loss, ...) would hit every trial: fail
                # this one now, so it neither stays RUNNING nor costs a slot later, and stop
                failed = TrialOutcome.failed("error", str(exc), started=True)
                wall = time.perf_counter() - start
                retry("record a trial", record_outcome, study, trial, failed, wall_seconds=wall)
                running_trial = None
                raise
            finally:
                heartbeat.__exit__(None, None, None)
            wall = time.perf_counter() - start
            refusals = refusals + 1 if outcome.status == "refused" else 0
            outcome = retry("record a trial", record_outcome, study, trial, outcome, wall_seconds=wall,
                            weights_root=prepared.study_dir)
            running_trial = None
            summary.finished += 1
            log(_trial_line(trial.number, sampled.summary(), outcome, prepared.objectives, wall))
            if outcome.traceback:
                log(outcome.traceback, 2)
            if after_trial is not None:
                retry("write the trials table", after_trial, study, prepared.study_dir)
            if refusals >= MAX_CONSECUTIVE_REFUSALS:
                summary.stopped_reason = f"{refusals} configurations in a row were refused; relax the limits"
                break
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (ehrsr.interrupts.Terminated)
        summary.interrupted_by = interrupt_name(exc)
        summary.stopped_reason = f"interrupted ({summary.interrupted_by})"
        if running_trial is not None:
            with contextlib.suppress(Exception):
                record_outcome(study, running_trial,
                               TrialOutcome.failed("interrupted", f"interrupted ({summary.interrupted_by})"))
    except StorageFull as exc:
        if running_trial is not None:
            _fail_on_full_storage(prepared, running_trial, str(exc))
        raise
    return summary


def _weights_path(prepared: PreparedStudy, number: int) -> Path:
    return prepared.study_dir / "weights" / f"trial_{number:05d}.safetensors"


def _fail_on_full_storage(prepared: PreparedStudy, trial: optuna.Trial, reason: str) -> None:
    """With no space left: delete the running trial's own weights file (never referenced once the
    trial fails, and the room it frees lets the storage take the last write), then mark the trial
    failed. When even that write is refused, the next process on this host fails the trial at once
    (its worker is gone: ``liveness.orphan_of``)."""
    _weights_path(prepared, trial.number).unlink(missing_ok=True)
    storage = study_storage(prepared.study)
    # why, if it still fits (a finished trial takes no attributes), then the state on its own:
    # an update in place, the write most likely to fit
    with contextlib.suppress(Exception):
        storage.set_trial_user_attr(trial._trial_id, TRIAL.status, "error")
        storage.set_trial_user_attr(trial._trial_id, TRIAL.reason, reason)
    with contextlib.suppress(Exception):
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def _budget_check(study: optuna.Study, budget: Any, fidelity: Any, device: torch.device) -> tuple[float, tuple[bool, str]]:
    """(the next trial's estimated seconds, whether the budget allows it and why not)."""
    from ehrsr.search.budget import estimate_trial_seconds

    estimate = estimate_trial_seconds(study, fidelity.seconds_per_trial_estimate, device.type)
    return estimate, budget.allows_new_trial(study, estimate, device_kind=device.type)


def _start_trial(trial: optuna.Trial, prepared: PreparedStudy, settings: SearchSettings,
                 fidelity: Any) -> tuple[Any, dict[str, Any], tuple[int, dict[str, Any]] | None]:
    """Sample the trial's configuration and record its start: device, training settings, the first
    heartbeat and any cost measured before for the configuration (``cached_cost``), written with
    the parameters. Returns (sampled, training settings, cost measured before). Repeatable: the
    storage may be retried."""
    from ehrsr.search.budget import start_attrs
    from ehrsr.search.storage import suggest_and_set

    found: list[Any] = [None]  # the cost measured before, looked up while the start is written

    def attrs_of(sampled: Any) -> dict[str, Any]:
        attrs = {**start_attrs(prepared.device.type, 1), TRIAL.device_name: prepared.device_name,
                 TRIAL.train: train_of(sampled), **Heartbeat.first_beat()}
        if sampled.config is not None:
            attrs[TRIAL.config] = config = sampled.config.to_dict()
            found[0] = cached_cost(prepared.study, config, prepared.device_name, exclude=trial.number)
            if found[0] is not None:
                attrs[TRIAL.cost_from_trial] = found[0][0]
        return attrs

    def train_of(sampled: Any) -> dict[str, Any]:
        # the space's training settings at the study's current length (a fidelity check may raise it)
        return {**asdict(dataclasses.replace(sampled.train, steps=fidelity.max_steps)), "seed": settings.seed}

    # the parameters and the start attributes in one write on a database server
    sampled = suggest_and_set(trial, lambda: prepared.space.suggest(trial, scale=prepared.spec.task.get("scale", 4)),
                              attrs_of)
    return sampled, train_of(sampled), found[0]


def _execute_guarded(job: TrialJob, ctx: Any, study: optuna.Study) -> TrialOutcome:
    """``execute_trial`` in this process; an unexpected exception ends this trial only ("error",
    with its traceback), as it does in a child process. User errors pass (the caller stops), and so
    does a full disk, as ``StorageFull``."""
    try:
        return execute_trial(job, ctx=ctx, study=study)
    except UserError:
        raise
    except Exception as exc:
        if storage_full(exc):  # every later trial would fail the same way: stop, as on a full storage
            where = str(Path(job.weights_path).parent) if job.weights_path else "the study folder"
            raise StorageFull.on(where, f"run trial #{job.trial_number}") from exc
        return TrialOutcome.failed("error", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                                   started=True)


def worker_sampler(prepared: PreparedStudy, settings: SearchSettings, worker_index: int) -> Any:
    """This worker's sampler: ``--sampler`` seeded by ``revisits.sampler_seed``, so a resumed study
    and each extra worker continue the search with a new random stream instead of replaying the
    first proposals (a fresh single-worker study keeps ``--seed``: reproducible as before). A worker
    that opened a study another process created draws a stream of its own host and process."""
    seed = sampler_seed(settings.seed, prepared.study, worker_index, joined=not prepared.created)
    return build_sampler(settings.sampler, seed)


def _record_repeat(prepared: PreparedStudy, trial: optuna.Trial, earlier: Any, summary: str,
                   log: SearchLog) -> TrialOutcome:
    """Record ``trial`` as a repeat of the finished ``earlier`` (docs/search_spaces.md, "Repeated
    configurations"): its result copied, ``repeat_of`` set, nothing trained, 0 s charged."""
    outcome = record_repeat(trial, earlier)
    outcome = record_outcome(prepared.study, trial, outcome, wall_seconds=0.0, weights_root=prepared.study_dir)
    log(f"#{trial.number:<4} {summary:<42} repeat of #{earlier.number}: not trained")
    return outcome


def search_share(budget: Any, fraction: float) -> Any:
    """The part of a budget the search itself may use: time limits scaled by ``fraction`` (the rest is
    kept for the controlled ablation); a ``trials`` limit counts search trials and is kept as is."""
    from ehrsr.search.budget import Budget, BudgetLimit

    limits = tuple(
        limit if limit.unit == "trials" else BudgetLimit(limit.unit, limit.amount * fraction) for limit in budget.limits
    )
    return Budget(limits, text=budget.text)


def _fmt_value(objective: Objective, value: float | None) -> str:
    if value is None:
        return f"{objective.name} -"
    if is_count(objective.metric_key):
        return f"{objective.name} {format_si(value, spec='.2f') if value >= 1e3 else f'{value:.0f}'}"
    unit = f" {objective.unit}" if objective.unit else ""
    digits = 2 if objective.name == "psnr" or objective.unit == "ms" else 4
    return f"{objective.name} {value:.{digits}f}{unit}"


def _trial_line(number: int, summary: str, outcome: TrialOutcome, objectives: list[Objective],
                wall: float) -> str:
    metrics = outcome.metrics or {}
    parts = [_fmt_value(o, metrics.get(o.metric_key)) for o in objectives]
    cost = []
    if metrics.get("params_deploy") is not None:
        cost.append(f"{metrics['params_deploy'] / 1e6:.3f}M params")
    if metrics.get("macs") is not None:
        cost.append(f"{metrics['macs'] / 1e9:.2f}G MACs")
    status = outcome.status
    reason = f" ({outcome.reason})" if outcome.reason and status != "complete" else ""
    return (
        f"#{number:<4} {summary:<42} {'  '.join(parts):<34} "
        f"{', '.join(cost):<28} {wall:6.1f}s  {status}{reason}"
    )


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
    interrupted_by: str | None  # "Ctrl-C" or "SIGTERM" when the search was stopped by one
    paused: bool = False  # stopped at pause_at (the pipeline's proxy-fidelity check), to be resumed
    n_orphaned: int = 0  # trials whose worker died (failed as "crashed", or still RUNNING and dead)
    report: Path | None = None  # set by ehrsr.pipeline
    ablation: str | None = None  # what the controlled ablation at the end did (ehrsr.pipeline)
    fidelity: str | None = None  # the study's latest proxy-fidelity verdict, in one line (ehrsr.pipeline)
    prepared: PreparedStudy | None = field(default=None, repr=False)  # the study as the search opened it

    @property
    def interrupted(self) -> bool:
        return self.interrupted_by is not None


def open_prepared(settings: SearchSettings, log: Callable[..., None],
                  retry_log: Callable[[str], None] | None = None) -> PreparedStudy:
    """``prepare_study`` under the worker loop's storage retry once the storage has answered: a
    restart while a study is being created or joined (workers of a job array start together) is
    waited for; a storage that cannot be reached at all is reported at once, as it is most often
    a wrong URL or a server not started. ``retry_log`` (default ``log``) hears of the retries."""
    answered = [False]

    def retryable(exc: BaseException) -> bool:
        first_contact = isinstance(exc, StorageError)  # open_storage failed: it never answered here
        answered[0] = answered[0] or not first_contact
        return answered[0] and storage_unreachable(exc)

    return retry_storage(lambda: prepare_study(settings, log=log), what="open the study", log=retry_log or log,
                         storage_url=settings.storage, retryable=retryable)


def _worker_process(settings: SearchSettings, worker_index: int, gpu: int | None,
                    after_trial: AfterTrial | None = None, pause_at: float | None = None) -> None:
    # a spawned process starts with Optuna's default INFO logging ("Using an existing study ...")
    optuna.logging.set_verbosity(optuna.logging.INFO if settings.verbosity >= 2 else optuna.logging.WARNING)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        settings.device = "cuda:0"
    with sigterm_as_interrupt():  # a scheduler's SIGTERM reaches every process: end like Ctrl-C
        log = SearchLog(settings.verbosity, prefix=f"[w{worker_index}] ", show_bar=False)
        prepared = open_prepared(settings, log=lambda *_: None, retry_log=log)
        run_worker(prepared, settings, log=log, worker_index=worker_index, after_trial=after_trial, pause_at=pause_at)


def run_search(settings: SearchSettings, *, log: SearchLog | None = None,
               after_trial: AfterTrial | None = None, pause_at: float | None = None) -> SearchSummary:
    """Prepare data and the study, run the workers and return the summary (``ehrsr.pipeline``
    runs what follows and prints it). ``after_trial`` runs after every recorded trial."""
    from ehrsr.data import TaskConfig

    log = log or SearchLog(settings.verbosity)
    prepared = open_prepared(settings, log=log)
    settings = prepared.settings  # the study record's values from here on
    study = prepared.study
    if pause_at is not None and (settings.fidelity_share <= 0 or fidelity_checks(study)):
        pause_at = None  # the study has its verdict already (or no share to check one with)
    log(f"study {study.study_name} ({'new' if prepared.created else 'resumed'}) in {mask_url(prepared.storage_url)}")
    log(f"space {prepared.space.name}, task {TaskConfig.from_dict(prepared.spec.task).slug}, device {prepared.device_name}, "
        f"objectives {','.join(o.name for o in prepared.objectives)}, budget {prepared.budget.describe_short()}"
        f" ({settings.reserved_share:.0%} kept for the ablation, baselines and proxy-fidelity check)")
    if prepared.spec.train_data is None:
        log("warning: training and validating on the built-in scikit-image sample images: the numbers "
            "only demonstrate the suite; pass --train-data/--val-data for real results")
    # prepare the data cache once here, so workers and child processes only read it
    ctx = build_context(prepared.spec, torch.device("cpu"), progress=settings.verbosity >= 1, load_lpips=False)
    if BASELINE_ATTR not in study.user_attrs:
        study.set_user_attr(BASELINE_ATTR, baseline_quality(ctx, prepared.spec))
    workers = resolve_workers(settings.workers, prepared.device)
    summary = WorkerSummary()
    try:
        if workers == 1:
            summary = run_worker(prepared, settings, log=log, after_trial=after_trial, pause_at=pause_at)
        else:
            summary = _run_worker_processes(settings, prepared, workers, log, after_trial, pause_at)
    finally:
        log.close()
    return _summarise(prepared, summary)


def baseline_quality(ctx: Any, spec: ContextSpec) -> dict[str, Any]:
    """Quality of the trivial answer on the validation set, with the study's conventions:
    MATLAB-bicubic upsampling of the LR input for SR, the degraded input itself for restoration."""
    from ehrsr.metrics import bicubic_baseline

    result = bicubic_baseline(ctx.val_set, crop_border=spec.crop_border)
    name = "bicubic (MATLAB)" if spec.task.get("scale", 4) > 1 else "degraded input"
    return {"name": name, "psnr": result.psnr, "ssim": result.ssim, "lpips": None}


def _run_worker_processes(settings: SearchSettings, prepared: PreparedStudy, workers: int, log: SearchLog,
                          after_trial: AfterTrial | None, pause_at: float | None = None) -> WorkerSummary:
    ctx = mp.get_context("spawn")
    # the workers join the study and run its stored record (threads included: recorded per study)
    worker_settings = dataclasses.replace(settings, study_name=prepared.study.study_name, storage=prepared.storage_url,
                                          given=frozenset())
    gpus = list(range(workers)) if prepared.device.type == "cuda" else [None] * workers
    procs = [ctx.Process(target=_worker_process, args=(worker_settings, i, gpus[i], after_trial, pause_at)) for i in range(workers)]
    log(f"starting {workers} workers on {mask_url(prepared.storage_url)}")
    for proc in procs:
        proc.start()
    summary = WorkerSummary()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt as exc:
        summary.interrupted_by = interrupt_name(exc)
        if summary.interrupted_by == SIGTERM:
            # Ctrl-C in a terminal reaches every process of the group; a SIGTERM sent to this
            # process alone (kill PID) is passed on, so each worker records its running trial
            for proc in procs:
                if proc.is_alive() and proc.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.join(timeout=60)
    summary.stopped_reason = (f"interrupted ({summary.interrupted_by})" if summary.interrupted
                              else "workers finished")
    # a worker stops at pause_at or at the end of the budget; a resume after the end stops at once
    summary.paused = pause_at is not None and not summary.interrupted
    return summary


def _summarise(prepared: PreparedStudy, worker: WorkerSummary) -> SearchSummary:
    study = optuna.load_study(study_name=prepared.study.study_name, storage=open_storage(prepared.storage_url))
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    best: dict[str, tuple[int, float]] = {}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for i, objective in enumerate(prepared.objectives):
        if complete:
            pick = (max if objective.direction == "maximize" else min)(complete, key=lambda t: t.values[i])
            best[objective.name] = (pick.number, pick.values[i])
    pareto = front_trials(study) if complete else []
    spent_now = prepared.budget.spent(study)
    spent = spent_now.describe()
    orphaned = sum(t.state == TrialState.FAIL and t.user_attrs.get(TRIAL.status) == "crashed" for t in trials)
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
        interrupted_by=worker.interrupted_by,
        paused=worker.paused,
        n_orphaned=orphaned + spent_now.orphaned,
        prepared=prepared,
    )
    return summary


def print_summary(summary: SearchSummary, objectives: list[Objective], log: SearchLog) -> None:
    log("")
    log(f"Search {summary.study_name}: {summary.stopped_reason or 'done'}", 0)
    rows = [
        ("trials", f"{summary.n_complete} complete, {summary.n_pruned} stopped early, {summary.n_failed} failed/refused"
                   + (f" ({summary.n_orphaned} orphaned: their worker died)" if summary.n_orphaned else "")),
        ("Pareto set", f"{summary.pareto_size} trials"),
    ]
    for objective in objectives:
        if objective.name in summary.best:
            number, value = summary.best[objective.name]
            rows.append((f"best {objective.name}", f"{_fmt_value(objective, value).split(' ', 1)[1]} (trial #{number})"))
    rows.append(("budget used", summary.spent + (" by the search" if summary.ablation else "")))
    if summary.ablation:
        rows.append(("ablation", summary.ablation))
    if summary.fidelity:
        rows.append(("proxy fidelity", summary.fidelity))
    rows.append(("storage", summary.storage_url))
    rows.append(("results", str(summary.study_dir) + (f" (report: {summary.report})" if summary.report else "")))
    width = max(len(r[0]) for r in rows)
    for key, value in rows:
        log(f"  {key.ljust(width)}  {value}", 0)
