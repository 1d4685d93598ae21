"""Retraining runs kept in a study beside the search (``<study>-baselines``, ``<study>-fidelity``).

Each run is one trial of the side study, recorded through the search's one recording path
(``ehrsr.search.record``): heartbeat while it runs, charged its wall time, told COMPLETE / PRUNED /
FAIL, so a side study resumes where it stopped and a dead process's run is closed by the same
stale-trial rule as a dead search worker's. Every storage operation goes through the search's
storage retry (``storage_retry``): a database restart costs a wait, not the runs. ``SideBudget``
stops starting runs once the estimate of the next one would overrun the device-seconds granted to
the side study.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ehrsr.interrupts import interrupt_name
from ehrsr.search.budget import start_attrs, trial_charge
from ehrsr.search.record import Heartbeat, TrialOutcome, fail_stale_trials, record_outcome
from ehrsr.search.runner import RunResult, jsonable_metrics
from ehrsr.search.storage import retrying, set_user_attrs
from ehrsr.study_schema import rung_record_attr, study_storage

__all__ = ["SideBudget", "finished_runs", "open_side_study", "run_recorded", "storage_retry"]

_clock = time.perf_counter  # wall clock of a run's charge (module attribute: tests can drive it)

# the worker loop's storage retry, for the ablation, baselines and fidelity runs: retry(what, f, *args)
storage_retry = retrying(log=lambda text: print(text, file=sys.stderr, flush=True))


def finished_runs(study: optuna.Study) -> list[FrozenTrial]:
    """The finished trials of ``study``, read under the storage retry."""
    return storage_retry("read the runs", lambda: [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])


def open_side_study(study: optuna.Study, name: str) -> optuna.Study:
    """Create or load the study ``name`` in ``study``'s storage, with its directions and metric
    names, and close runs of dead processes (``fail_stale_trials``)."""
    side = storage_retry(
        "open the study", optuna.create_study,
        study_name=name,
        storage=study_storage(study),
        directions=list(study.directions),
        sampler=optuna.samplers.RandomSampler(seed=0),  # nothing is sampled: runs are told by hand
        load_if_exists=True,
    )
    if list(side.directions) != list(study.directions):
        from ehrsr.ablation.variants import AblationError

        raise AblationError(
            f"study {name!r} exists with directions {[d.name for d in side.directions]} but "
            f"{study.study_name!r} has {[d.name for d in study.directions]}; delete it or rename the study"
        )
    names, side_names = storage_retry("read the metric names", lambda: (study.metric_names, side.metric_names))
    if names and not side_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage_retry("name the metrics", side.set_metric_names, list(names))
    storage_retry("fail orphaned runs", fail_stale_trials, side)
    return side


@dataclass
class SideBudget:
    """Device-seconds a side study may spend in all (its stored runs included, so a resumed side
    study continues the same budget); None: unlimited."""

    seconds: float | None

    def spent(self, side: optuna.Study) -> float:
        return sum(trial_charge(t).seconds for t in finished_runs(side))

    def refusal(self, side: optuna.Study, estimate_seconds: float, left: int) -> str | None:
        """Why the next run (estimated ``estimate_seconds``) must not start, or None."""
        if self.seconds is None:
            return None
        spent = self.spent(side)
        if spent + estimate_seconds <= self.seconds:
            return None
        return (
            f"budget of {self.seconds:.0f} s reached: {spent:.0f} s spent, the next run needs about "
            f"{estimate_seconds:.0f} s; {left} run{'s' if left != 1 else ''} left out"
        )


def median_charge(done: Sequence[FrozenTrial], fallback_seconds: float) -> float:
    """Median charge of the finished runs so far, else ``fallback_seconds``."""
    charges = [trial_charge(t).seconds for t in done if trial_charge(t).seconds > 0]
    return float(statistics.median(charges)) if charges else float(fallback_seconds)


def run_recorded(
    side: optuna.Study,
    attrs: dict[str, Any],
    run: Callable[[Callable[[int, dict[str, Any]], None]], RunResult],
    *,
    device_kind: str,
    constraints: Callable[[dict[str, Any]], dict[str, float]] | None = None,
) -> TrialOutcome:
    """Ask ``side`` for a trial, write ``attrs``, call ``run(on_rung)`` under a heartbeat and
    record its outcome (``record_outcome``); returns the outcome as stored. ``on_rung(i, rung)``
    stores ``rung_<i>`` like a search trial. An exception inside ``run`` is recorded as ``error``
    (a crash of one run must not lose the others); Ctrl-C is recorded and re-raised."""
    retry = storage_retry
    trial = retry("ask for a run", side.ask)
    retry("start a run", start_run, trial, attrs, device_kind)

    def on_rung(index: int, rung: dict[str, Any]) -> None:
        retry("record a rung", trial.set_user_attr, rung_record_attr(index), rung)

    start = _clock()
    heartbeat = Heartbeat(side, trial._trial_id)
    retry("start the heartbeat", heartbeat.__enter__)
    try:
        try:
            result = run(on_rung)
        finally:
            heartbeat.__exit__(None, None, None)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (ehrsr.interrupts)
        retry("record a run", record_outcome, side, trial,
              TrialOutcome.failed("interrupted", f"interrupted ({interrupt_name(exc)})"), wall_seconds=_clock() - start)
        raise
    except Exception as exc:
        failed = TrialOutcome.failed("error", f"{type(exc).__name__}: {exc}"[:500])
        return retry("record a run", record_outcome, side, trial, failed, wall_seconds=_clock() - start)
    metrics = jsonable_metrics(dict(result.metrics or {}))
    outcome = TrialOutcome(
        status=result.status,
        reason=str(result.reason) if result.reason else None,
        values=list(result.values or []),
        metrics=metrics,
        seconds=dict(result.seconds or {}),
        steps_done=int(result.steps_done),
        per_image=getattr(result, "per_image", None) if result.status == "complete" else None,
        loss_history=getattr(result, "loss_history", None) if result.status == "complete" else None,
    )
    if constraints is not None and "latency_ms" in metrics:
        outcome.constraints = constraints(metrics)
    return retry("record a run", record_outcome, side, trial, outcome, wall_seconds=_clock() - start)


def start_run(trial: optuna.Trial, attrs: dict[str, Any], device_kind: str) -> None:
    """Write a run's attributes and its device, in one write on a database server (repeatable: the
    storage may be retried)."""
    set_user_attrs(trial, {**attrs, **start_attrs(device_kind, 1)})
