"""The one path that records a run's outcome in a study: search trials and ablation runs alike.

A run (a search trial or a controlled-ablation run) ends in a ``TrialOutcome``; ``record_outcome``
writes it to the trial's user attributes (docs/study_schema.md), charges the budget (a refused
run costs nothing; any other is charged its wall time times its devices) and tells Optuna
(COMPLETE with its values, PRUNED, or FAIL with ``status`` / ``reason``).

A running trial refreshes a ``heartbeat`` user attribute every ``HEARTBEAT_SECONDS``
(``Heartbeat``); ``fail_stale_trials`` marks a RUNNING trial that ``liveness.orphan_of`` calls
orphaned (heartbeat, or start when it never beat, older than ``STALE_SECONDS``, or its worker
provably dead on this host) failed ("crashed"), charged from its start to its last sign of life:
the one rule for a worker or an ablation process that died.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ehrsr.search.budget import charge_of
from ehrsr.search.liveness import STALE_SECONDS, current_worker, orphan_of
from ehrsr.search.settled import FinishedScan, forget_read, read_trials, study_cache
from ehrsr.search.storage import set_user_attrs, write_user_attrs
from ehrsr.study_schema import PER_IMAGE_ATTR, TRIAL, study_storage

__all__ = [
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "Heartbeat",
    "TrialOutcome",
    "fail_stale_trials",
    "record_outcome",
]

HEARTBEAT_SECONDS = 30.0  # well inside STALE_SECONDS (``ehrsr.search.liveness``), which marks a silent trial dead

# runner statuses as the study stores them: the runner's "stopped" (stopped early) is Optuna's "pruned"
_STORED_STATUS = {"stopped": "pruned"}


@dataclass
class TrialOutcome:
    """How a run ended, picklable so it can come back from a child process.

    ``status``: complete, pruned, refused (before training: costs nothing), diverged, oom, error,
    crashed, interrupted or cut_short (training hit its deadline: an ablation run at the end of
    its budget share). ``values``: the objective values (complete runs).
    """

    status: str
    reason: str | None = None
    values: list[float] | None = None
    # None: not recorded (the run never started: refused before training, interrupted, ...)
    metrics: dict[str, Any] | None = None
    seconds: dict[str, Any] | None = None
    steps_done: int | None = None
    constraints: dict[str, float] = field(default_factory=dict)
    weights: str | None = None  # path of the saved weights (complete search trials)
    # final evaluation per image, {name: [psnr, ssim]} (``ehrsr.metrics.encode_per_image``); None: not evaluated
    per_image: dict[str, list[float | None]] | None = None
    traceback: str | None = None  # a child process's traceback (``error``)
    loss_history: list[list[float]] | None = None  # the run's training-loss curve (complete runs)

    def __post_init__(self) -> None:
        self.status = _STORED_STATUS.get(self.status, self.status)

    @classmethod
    def failed(cls, status: str, reason: str, traceback: str | None = None, *, started: bool = False) -> TrialOutcome:
        """A run that produced nothing; ``started``: it was launched (empty metrics are recorded)."""
        if started:
            return cls(status=status, reason=reason, traceback=traceback, metrics={}, seconds={}, steps_done=0)
        return cls(status=status, reason=reason, traceback=traceback)


def record_outcome(
    study: optuna.Study,
    trial: optuna.Trial,
    outcome: TrialOutcome,
    *,
    wall_seconds: float | None = None,
    weights_root: Path | None = None,
) -> TrialOutcome:
    """Write ``outcome`` to ``trial``, charge it and tell Optuna; returns the outcome as stored.

    ``wall_seconds``: the run's wall time, charged times its devices (None: Optuna's start-to-end
    time is charged); a ``refused`` outcome is never charged. ``weights_root``: stored weight
    paths are made relative to it (the study folder). A ``complete`` outcome whose values do not
    match the study's objectives (count or finiteness) is stored as an ``error``.
    """
    attrs: dict[str, Any] = {}
    if outcome.status == "refused":
        attrs[TRIAL.refused] = str(outcome.reason or "refused")
    elif wall_seconds is not None:
        attrs[TRIAL.charged_seconds] = charge_of(trial, wall_seconds)
    values = list(outcome.values or [])
    if outcome.status == "complete" and not (
        len(values) == len(study.directions) and all(map(math.isfinite, values))
    ):
        outcome = TrialOutcome(
            **{**outcome.__dict__, "status": "error",
               "reason": f"the run returned {len(values)} finite objective values for "
                         f"{len(study.directions)} objectives"}
        )
    if outcome.metrics is not None:
        attrs[TRIAL.metrics] = dict(outcome.metrics)
    if outcome.seconds is not None:
        attrs[TRIAL.seconds] = dict(outcome.seconds)
    if outcome.steps_done is not None:
        attrs[TRIAL.steps_done] = int(outcome.steps_done)
    if outcome.per_image:
        attrs[PER_IMAGE_ATTR] = dict(outcome.per_image)
    if outcome.loss_history:
        attrs[TRIAL.loss_history] = [list(point) for point in outcome.loss_history]
    if outcome.weights:
        attrs[TRIAL.weights] = (os.path.relpath(outcome.weights, weights_root) if weights_root is not None
                                else outcome.weights)
    attrs[TRIAL.status] = outcome.status
    if outcome.reason:
        attrs[TRIAL.reason] = str(outcome.reason)[:2000]
    set_user_attrs(trial, attrs)  # one write on a database server
    for key, value in outcome.constraints.items():
        trial.set_constraint(key, value)
    if outcome.status == "complete":
        study.tell(trial, values)
    elif outcome.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    return outcome


class Heartbeat:
    """Refreshes the trial's ``heartbeat`` user attribute while it runs (see module docstring)."""

    def __init__(self, study: optuna.Study, trial_id: int, first_beat_written: bool = False) -> None:
        """``first_beat_written``: the trial's start wrote ``first_beat()`` already."""
        self.study, self.trial_id = study, trial_id
        self.first_beat_written = first_beat_written
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def first_beat() -> dict[str, Any]:
        """The attributes a heartbeat starts with: who runs the trial (a worker on the same host
        fails the trial at once if this process dies) and the time."""
        return {TRIAL.worker: current_worker().to_dict(), TRIAL.heartbeat: time.time()}

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                study_storage(self.study).set_trial_user_attr(self.trial_id, TRIAL.heartbeat, time.time())

    def __enter__(self) -> Heartbeat:
        if not self.first_beat_written:
            write_user_attrs(study_storage(self.study), self.trial_id, self.first_beat())
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale_trials(study: optuna.Study, now: float | None = None) -> list[int]:
    """Mark the orphaned RUNNING trials (``liveness.orphan_of``: heartbeat older than
    ``STALE_SECONDS``, or worker provably dead on this host) failed ("crashed"), charged from
    their start to their last sign of life; return their numbers."""
    now = time.time() if now is None else now
    failed = []
    storage = study_storage(study)
    scan = study_cache(study, "running trials", FinishedScan)  # only unfinished trials are looked at
    trials = read_trials(study)
    with scan.lock:
        scan.update(trials)
        running = [t for t in scan.unfinished(trials) if t.state == TrialState.RUNNING]
    for frozen in running:
        orphan = orphan_of(frozen, now)
        if orphan is None:
            continue
        with contextlib.suppress(Exception):
            n_dev = int(frozen.user_attrs.get(TRIAL.n_devices, 1))
            write_user_attrs(storage, frozen._trial_id, {
                TRIAL.status: "crashed",
                TRIAL.reason: "its worker process ended (gone from this host)" if orphan.worker_gone
                else "its process stopped (no heartbeat)",
                TRIAL.charged_seconds: orphan.seconds * n_dev,
            })
            storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL)
            failed.append(frozen.number)
    if failed:
        forget_read(study)  # the budget reads them as finished now
    return failed
