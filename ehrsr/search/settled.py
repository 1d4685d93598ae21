"""Finished trials never change: each process reads each of them once.

A worker reads its study several times around every trial: the budget (spent so far, may one
more trial start, the expected charge), the dead workers' trials, a finished repeat of the
proposal, a configuration profiled before. Each of those went through every trial of the study,
so the search's own cost per trial grew with the study (``benchmarks/study_overhead.py``). But
Optuna refuses to change a finished trial (its attributes, values and state are final), so what
was derived from it once stays true: these helpers keep it per process, per study.

* ``study_cache(study, name, factory)``: one object per storage object, study name and ``name``.
* ``FinishedScan``: the trials finished since the last look. Every trial numbered below its
  ``settled`` mark is finished and was handed out, so a look reads the trials from there on.
* ``FinishedIndex``: the earliest finished trial under a key (same configuration, ...), updated
  from a ``FinishedScan``.

A study deleted and created again under the same name is noticed (its first trial changed) and
read anew.

* ``one_read(study)``: inside the block, this thread's ``read_trials(study)`` calls share one read
  of the study (taken at the first call). A worker's checks at the start of a loop step (dead
  workers' trials, the budget, the expected charge, progress) then cost one read, not four: on a
  database server a read is seven statements while a trial runs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

from optuna.trial import FrozenTrial

from ehrsr.study_schema import study_storage

__all__ = ["FinishedIndex", "FinishedScan", "forget_read", "json_key", "one_read", "read_trials", "study_cache"]

T = TypeVar("T")

_CACHES: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def study_cache(study: Any, name: str, factory: Callable[[], T]) -> T:
    """This process's object ``name`` for ``study`` (one per storage object and study name), made
    by ``factory()`` on first use. It lives as long as the storage object does."""
    with _CACHES_LOCK:
        caches = _CACHES.setdefault(study_storage(study), {})
        key = (study.study_name, name)
        if key not in caches:
            caches[key] = factory()
        return caches[key]


_SHARED = threading.local()  # per thread: {(storage id, study name): the block's read, or None}


def _shared_reads() -> dict[tuple[int, str], list[FrozenTrial] | None]:
    reads = getattr(_SHARED, "reads", None)
    if reads is None:
        reads = _SHARED.reads = {}
    return reads


@contextlib.contextmanager
def one_read(study: Any) -> Iterator[None]:
    """Inside the block, ``read_trials(study)`` in this thread returns one read of the study's
    trials, taken at its first call (a nested block shares the outer one's). Only for steps
    that need no newer state than the block's start: writes made inside the block are not seen
    (``forget_read`` after one that matters)."""
    reads, key = _shared_reads(), (id(study_storage(study)), study.study_name)
    if key in reads:
        yield
        return
    reads[key] = None
    try:
        yield
    finally:
        reads.pop(key, None)


def read_trials(study: Any) -> list[FrozenTrial]:
    """The study's trials in number order (``study.get_trials(deepcopy=False)``), or the read of
    the enclosing ``one_read`` block."""
    reads, key = _shared_reads(), (id(study_storage(study)), study.study_name)
    if key not in reads:
        return study.get_trials(deepcopy=False)
    if reads[key] is None:
        reads[key] = study.get_trials(deepcopy=False)
    return reads[key]


def forget_read(study: Any) -> None:
    """The next ``read_trials(study)`` in this thread's ``one_read`` block reads the study again."""
    reads, key = _shared_reads(), (id(study_storage(study)), study.study_name)
    if key in reads:
        reads[key] = None


def json_key(value: Any) -> str:
    """A hashable key for a stored JSON value (a configuration, training settings): equal values
    as stored give equal keys."""
    return json.dumps(value, sort_keys=True)


class FinishedScan:
    """The trials of one study that finished since the last ``update`` (see the module docstring)."""

    def __init__(self) -> None:
        self.settled = 0  # every trial numbered below is finished and was returned
        self._returned: set[int] = set()  # finished trials at or above ``settled`` already returned
        self._first_trial_id: int | None = None
        self.lock = threading.Lock()  # for callers that update derived state with the scan

    def update(self, trials: Sequence[FrozenTrial]) -> tuple[list[FrozenTrial], bool]:
        """``trials``: the study's trials in number order (``study.get_trials(deepcopy=False)``).
        Returns the trials finished since the last call, each once, and whether the scan started
        over (another study under the same name, or trials not numbered 0..n-1): the caller then
        forgets what it derived before and takes the returned trials as all there is."""
        first = trials[0]._trial_id if trials else None
        start = self.settled
        reset = (
            (first != self._first_trial_id and self._first_trial_id is not None)
            or start > len(trials)
            or (start > 0 and trials[start - 1].number != start - 1)
        )
        if reset:
            self.settled, self._returned, start = 0, set(), 0
        self._first_trial_id = first
        new: list[FrozenTrial] = []
        advancing = True
        for trial in trials[start:]:
            if not trial.state.is_finished():
                advancing = False
                continue
            if trial.number not in self._returned:
                new.append(trial)
                self._returned.add(trial.number)
            if advancing and trial.number == self.settled:
                self.settled += 1
        self._returned = {n for n in self._returned if n >= self.settled}
        return new, reset

    def unfinished(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The trials of ``trials`` (as given to the last ``update``) that are not finished."""
        return [t for t in trials[self.settled:] if not t.state.is_finished()]


class FinishedIndex:
    """The earliest finished trial under each key. ``key(trial)`` gives a finished trial's key, or
    None to leave it out."""

    def __init__(self, key: Callable[[FrozenTrial], Hashable | None]) -> None:
        self._key = key
        self._scan = FinishedScan()
        self._earliest: dict[Hashable, FrozenTrial] = {}

    def lookup(self, study: Any, key: Hashable) -> FrozenTrial | None:
        """The lowest-numbered finished trial of ``study`` whose key is ``key``, or None."""
        with self._scan.lock:
            new, reset = self._scan.update(read_trials(study))
            if reset:
                self._earliest = {}
            for trial in new:
                found = self._key(trial)
                if found is not None:
                    held = self._earliest.get(found)
                    if held is None or trial.number < held.number:
                        self._earliest[found] = trial
            return self._earliest.get(key)
