"""Revisits: a resumed search continues its random stream, and a repeated configuration is not
trained twice.

Two ways a search can spend budget on what it already knows:

* **Replayed streams.** A sampler built with the same seed on every start proposes, after an
  interruption and a rerun (or in each of several workers started together), the same first
  configurations again. ``sampler_seed`` derives the seed from the user's seed, the number of
  trials already in the study and the worker's index, so a fresh single-worker study keeps the
  user's seed (reproducible as before) while a resume or a second worker draws a new stream; a
  worker that joins a study another process created (another machine) also mixes in its host and
  process id, since machines started together see the same number of trials.
* **Repeated configurations.** Samplers, TPE's in particular once it concentrates, propose a
  configuration (architecture and training settings) that already finished in the study at the
  same fidelity. Training it again only measures the training seed's noise. The policy (see
  ``docs/search_spaces.md``, "Repeated configurations") is to *record* the earlier result as this
  trial's, with ``repeat_of = N``, without training: the sampler still sees the point where it
  asked for it, no budget time is spent, and a run of ``max_consecutive`` repeats in a row means
  the sampler has converged, which stops the search. ``allow_repeats=True`` restores training every
  proposal.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ehrsr.search.record import TrialOutcome
from ehrsr.search.settled import FinishedIndex, json_key, study_cache
from ehrsr.study_schema import TRIAL

__all__ = [
    "RepeatPolicy",
    "find_finished_repeat",
    "record_repeat",
    "repeat_outcome",
    "sampler_seed",
]

# results copied from the earlier trial that ``record_outcome`` does not write itself (metrics and
# status travel in the outcome; ``weights`` is copied as stored, already relative to the study folder)
_COPIED_ATTRS = ("weights", "cost_from_trial")


def sampler_seed(base_seed: int, study: optuna.Study, worker_index: int = 0, *, joined: bool = False) -> int:
    """The seed of the sampler for this start of the search: ``base_seed`` itself for the first
    worker of a study without trials that this process created (so fresh runs stay
    reproducible), otherwise a 32-bit hash of (``base_seed``, trials already in the study,
    ``worker_index``), a new stream for each resume and each worker. WAITING trials (enqueued
    reference configurations) do not count: they are there before the first start too.

    ``joined``: this process opened a study another process created. Workers on several
    machines, each started as worker 0 with the same ``--seed``, may open the study in the same
    second and see the same number of trials; the hash then also takes this host's name and
    process id, so each machine draws its own stream (otherwise they propose the same
    configurations, and all but the first are recorded as repeats)."""
    if worker_index < 0:
        raise ValueError(f"worker_index must be >= 0, got {worker_index}")
    started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    n_trials = len(study.get_trials(deepcopy=False, states=started))
    if n_trials == 0 and worker_index == 0 and not joined:
        return int(base_seed)
    process = f":{socket.gethostname()}:{os.getpid()}" if joined else ""
    digest = hashlib.sha256(f"ehrsr-sampler:{base_seed}:{n_trials}:{worker_index}{process}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def find_finished_repeat(
    study: optuna.Study, config: dict[str, Any], train: dict[str, Any], exclude: int | None = None
) -> FrozenTrial | None:
    """The earliest COMPLETE or PRUNED trial with the same architecture (``config`` user attribute)
    and the same training settings and fidelity (``train``: steps, batch, patch, loss, optimiser
    ...), or None. ``exclude`` is the asking trial's own number. Earlier repeats are skipped in
    favour of the trial that actually trained. Each process indexes the finished trials once
    (``ehrsr.search.settled``), so the lookup does not grow with the study."""
    index = study_cache(study, "finished configurations", lambda: FinishedIndex(_repeat_key))
    found = index.lookup(study, (json_key(config), json_key(train)))
    if found is not None and found.number != exclude and _same_run(found, config, train):
        return found
    if found is None:
        return None
    # the earliest match is the asking trial itself, or equal only as JSON: look through them all
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if frozen.number != exclude and TRIAL.repeat_of not in frozen.user_attrs and _same_run(frozen, config, train):
            return frozen
    return None


def _same_run(frozen: FrozenTrial, config: dict[str, Any], train: dict[str, Any]) -> bool:
    return frozen.user_attrs.get(TRIAL.config) == config and frozen.user_attrs.get(TRIAL.train) == train


def _repeat_key(frozen: FrozenTrial) -> tuple[str, str] | None:
    """``find_finished_repeat``'s index key of a finished trial (None: it cannot be repeated)."""
    if frozen.state not in (TrialState.COMPLETE, TrialState.PRUNED) or TRIAL.repeat_of in frozen.user_attrs:
        return None
    return json_key(frozen.user_attrs.get(TRIAL.config)), json_key(frozen.user_attrs.get(TRIAL.train))


def repeat_outcome(earlier: FrozenTrial) -> TrialOutcome:
    """The outcome that repeats ``earlier``'s result without training: a COMPLETE earlier trial
    gives its objective values, a PRUNED one a stop at the same point. No step was trained and no
    time spent (``seconds`` is empty, ``steps_done`` 0)."""
    attrs = earlier.user_attrs
    complete = earlier.state == TrialState.COMPLETE
    return TrialOutcome(
        status="complete" if complete else "pruned",
        reason=f"repeat of trial #{earlier.number} (same configuration and fidelity); not trained again",
        values=list(earlier.values) if complete else None,
        metrics=dict(attrs.get(TRIAL.metrics) or {}),
        seconds={},
        steps_done=0,
        constraints=dict(earlier.constraints or {}),
    )


def record_repeat(trial: optuna.Trial, earlier: FrozenTrial) -> TrialOutcome:
    """Mark ``trial`` as a repeat of ``earlier`` and return the outcome to finish it with.

    Writes ``repeat_of`` (which also keeps it out of a ``trials=N`` budget, see
    ``ehrsr.search.budget``) and the earlier trial's stored weights path onto ``trial``; the caller
    finishes it through the one recording path, ``record_outcome(study, trial, outcome,
    wall_seconds=0.0)``. Rung attributes are not copied: MO-ASHA must not count one training run
    twice at a rung.
    """
    from ehrsr.search.storage import set_user_attrs

    set_user_attrs(trial, {TRIAL.repeat_of: earlier.number,
                           **{key: earlier.user_attrs[key] for key in _COPIED_ATTRS if key in earlier.user_attrs}})
    return repeat_outcome(earlier)


@dataclass(frozen=True)
class RepeatPolicy:
    """What the trial loop does with a proposal that repeats a finished configuration.

    ``allow_repeats=False`` (the default): record the earlier result (``record_repeat``) instead of
    training, and stop the search after ``max_consecutive`` repeats in a row (the sampler keeps
    proposing what it knows: it has converged). ``allow_repeats=True``: train every proposal, as
    before this policy existed.
    """

    allow_repeats: bool = False
    max_consecutive: int = 20

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")

    def check(
        self, study: optuna.Study, trial_number: int, config: dict[str, Any], train: dict[str, Any]
    ) -> FrozenTrial | None:
        """The earlier trial this proposal repeats, or None (always None with ``allow_repeats``)."""
        if self.allow_repeats:
            return None
        return find_finished_repeat(study, config, train, exclude=trial_number)

    def converged(self, consecutive_repeats: int) -> str | None:
        """The stop reason once ``consecutive_repeats`` reaches the limit, else None."""
        if consecutive_repeats >= self.max_consecutive:
            return (
                f"{consecutive_repeats} proposals in a row repeated finished configurations: the sampler "
                "has converged (pass --allow-repeats to train repeats anyway)"
            )
        return None
