"""One trial of the search: the picklable job, its execution (in-process or in a child process),
MO-ASHA at the rungs, and the heartbeat that lets other workers detect a dead one.

A running trial refreshes a ``heartbeat`` user attribute (``ehrsr.search.record.Heartbeat``); a
worker finding a RUNNING trial whose heartbeat is stale marks it failed (``fail_stale_trials``),
so a dead worker's trial neither stays RUNNING forever nor keeps eating the budget. On CUDA (or with ``isolate=True``) each trial runs in a spawned child process: a CUDA
error or a crash in an extension ends that trial only, and its GPU memory goes with the process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import traceback
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from ehrsr import faults
from ehrsr.config import EHRSRConfig
from ehrsr.interrupts import interrupt_name, sigterm_as_interrupt
from ehrsr.search.record import HEARTBEAT_SECONDS, STALE_SECONDS, Heartbeat, TrialOutcome, fail_stale_trials
from ehrsr.search.runner import RunContext, RunResult, jsonable_metrics, run_configuration
from ehrsr.search.settled import FinishedIndex, json_key, study_cache
from ehrsr.search.storage import open_storage, set_user_attrs
from ehrsr.search.study import ContextSpec, build_context
from ehrsr.study_schema import COST_KEYS, REUSED_COST_REQUIRES, TRIAL, rung_record_attr
from ehrsr.training import TrainSettings

__all__ = [
    "COST_KEYS",
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "Heartbeat",
    "TrialJob",
    "cached_cost",
    "execute_isolated",
    "execute_trial",
    "fail_stale_trials",
]


NOT_LOOKED_UP = "not looked up"


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
    device_name: str | None = None  # readable device name; profiles are reused only on the same one
    # the cost measured before for this configuration on this device, as the worker looked it up
    # when the trial started (``cached_cost``: (trial number, metrics), or None); ``NOT_LOOKED_UP``:
    # ``execute_trial`` looks it up itself
    cost_before: tuple[int, dict[str, Any]] | str | None = "not looked up"


def execute_trial(job: TrialJob, ctx: RunContext | None = None, study: optuna.Study | None = None) -> TrialOutcome:
    """Run one trial and write its rung attributes; returns its picklable outcome for
    ``ehrsr.search.record.record_outcome``."""
    from ehrsr.search.asha import MOASHA

    faults.set_trial(job.trial_number)
    faults.inject("trial-exception")  # EHRSR_FAULT (tests only; nothing when unset)
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
        record = {rung_record_attr(rung_index): {"step": step, "values": values, "metrics": jsonable_metrics(metrics)}}
        constraints = ctx.limits.constraints(metrics)
        violated = {k: v for k, v in constraints.items() if v > 0}
        if not job.early_stopping or violated:
            set_user_attrs(trial, record)
        if violated and job.early_stopping:
            # cost does not change with training: an infeasible configuration stays infeasible
            stop_reason["reason"] = f"infeasible at rung {rung_index} ({step} steps): " + ", ".join(
                f"{k} exceeds its limit by {v:.3g}" for k, v in violated.items()
            )
            return False
        if not job.early_stopping:
            return True
        decision = asha.decide(trial, rung_index, values, also=record)  # the record and the values in one write
        if not decision.promote:
            stop_reason["reason"] = f"stopped by MO-ASHA at {decision.reason}"
        return decision.promote

    rung_steps = asha.rungs[:-1] if job.early_stopping else ()
    if job.cost_before == NOT_LOOKED_UP:
        cached = cached_cost(study, job.config, job.device_name, exclude=job.trial_number)
        if cached is not None:
            trial.set_user_attr(TRIAL.cost_from_trial, cached[0])
    else:  # the worker looked it up and stored ``cost_from_trial`` with the trial's start
        cached = job.cost_before
    result: RunResult = run_configuration(
        config, TrainSettings.from_dict(job.train, ignore=("seed",)), ctx, seed=job.seed, rung_steps=rung_steps, on_rung=on_rung,
        precomputed_cost=cached[1] if cached is not None else None,
    )
    _record_latency_attrs(trial, result)
    outcome = TrialOutcome(
        status=result.status,
        reason=stop_reason.get("reason", result.reason),
        values=result.values,
        metrics=jsonable_metrics(result.metrics),
        seconds=dict(result.seconds or {}),
        steps_done=int(result.steps_done),
        per_image=result.per_image,
        loss_history=result.loss_history,
    )
    if result.metrics and result.metrics.get("latency_ms") is not None:
        outcome.constraints = ctx.limits.constraints(result.metrics)
    if result.status == "complete" and result.model is not None and job.weights_path:
        from safetensors.torch import save_model

        from ehrsr.files import write_atomically

        model = result.model.cpu()
        write_atomically(job.weights_path, lambda temporary: save_model(model, str(temporary)))
        outcome.weights = job.weights_path
    return outcome


def _record_latency_attrs(trial: optuna.trial.Trial, result: RunResult) -> None:
    """Where each latency came from and the canary reading (docs/latency_models.md)."""
    from ehrsr.study_schema import CANARY_ATTR, LATENCY_SOURCES_ATTR

    if result.latency_sources is not None:
        trial.set_user_attr(LATENCY_SOURCES_ATTR, result.latency_sources)
    if result.canary is not None:
        trial.set_user_attr(CANARY_ATTR, result.canary)


def cached_cost(study: optuna.Study, config: dict[str, Any], device_name: str | None,
                exclude: int | None = None) -> tuple[int, dict[str, Any]] | None:
    """Cost metrics already measured in this study for the same configuration on the same device.

    Cost does not depend on training (the deploy form's MACs, parameters, latency and memory are
    properties of the architecture and the device), and samplers often revisit a configuration, so
    re-profiling it would only add timing noise and spend budget. Returns (trial number, metrics).
    MoE routing, hence its MACs, varies slightly with the weights; the first measurement is kept.
    Each process indexes the finished trials once (``ehrsr.search.settled``).
    """
    if device_name is None:
        return None
    index = study_cache(study, "profiled configurations", lambda: FinishedIndex(_profiled_key))
    found = index.lookup(study, (device_name, json_key(config)))
    if found is not None and (found.number == exclude or found.user_attrs.get(TRIAL.config) != config):
        # the asking trial itself, or equal only as JSON: look through them all
        found = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                      if t.number != exclude and _profiled_key(t) is not None
                      and t.user_attrs.get(TRIAL.device_name) == device_name and t.user_attrs.get(TRIAL.config) == config),
                     None)
    if found is None:
        return None
    metrics = found.user_attrs[TRIAL.metrics]
    return found.number, {k: metrics[k] for k in COST_KEYS if k in metrics}


def _profiled_key(frozen: optuna.trial.FrozenTrial) -> tuple[Any, str] | None:
    """``cached_cost``'s index key of a finished trial: (device name, configuration), or None when
    its cost was not measured in full."""
    metrics = frozen.user_attrs.get(TRIAL.metrics) or {}
    if frozen.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not all(
        metrics.get(k) is not None for k in REUSED_COST_REQUIRES
    ):
        return None
    return frozen.user_attrs.get(TRIAL.device_name), json_key(frozen.user_attrs.get(TRIAL.config))


def _child_main(job: TrialJob, results: Any) -> None:
    try:
        with sigterm_as_interrupt():
            results.put(("ok", execute_trial(job)))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM reached this process (a scheduler signals all)
        results.put(("interrupted", interrupt_name(exc)))
        raise SystemExit(1) from None
    except BaseException as exc:  # report every failure to the parent, then exit non-zero
        results.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def execute_isolated(job: TrialJob, poll_seconds: float = 1.0, target: Any = None) -> TrialOutcome:
    """Run ``execute_trial`` in a spawned child process; a crash becomes an outcome, not an exception.

    ``target(job, results)`` is the child's entry point (``_child_main``; tests pass crashing ones).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=target or _child_main, args=(job, results), daemon=True)
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
        return TrialOutcome.failed("crashed", f"trial process died ({what})", started=True)
    if message[0] == "error":
        return TrialOutcome.failed("error", message[1], traceback=message[2], started=True)
    if message[0] == "interrupted":
        return TrialOutcome.failed("interrupted", f"interrupted ({message[1]})", started=True)
    return message[1]
