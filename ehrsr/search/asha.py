"""MO-ASHA: asynchronous successive halving whose promotions rank trials by Pareto dominance.

Optuna's pruners only handle single-objective studies (``Trial.report`` raises for several
objectives), so multi-fidelity early stopping for the EHR-SR search lives here.

Successive halving trains each configuration for ``r`` steps, keeps the best ``1/eta`` of them for
``r*eta`` steps, and so on up to the full budget. ASHA (Li et al., "A System for Massively Parallel
Hyperparameter Tuning", MLSys 2020) makes this asynchronous: a decision is taken as soon as one
trial reaches a rung, against the trials that reached that rung before it, so workers never wait
for a full bracket. MO-ASHA (Schmucker et al., "Multi-objective Asynchronous Successive Halving",
arXiv:2106.12639, 2021) replaces "the best 1/eta by loss" with a ranking for several objectives:
non-dominated sorting first, NSGA-II crowding distance inside a front (their "NSGA-II" selection;
Deb et al. 2002).

The variant implemented here is the *stopping* form of ASHA (as in Optuna's
``SuccessiveHalvingPruner`` and Ray Tune's ``ASHAScheduler``): a trial cannot be paused and resumed
later, so at each rung it either continues now or stops for good. The rules, for a trial arriving
at rung ``k`` where ``n`` trials (itself included) have recorded values so far:

* ``n < eta``: too few trials to rank, the trial continues (the usual grace rule of stopping ASHA:
  with ``floor(n / eta) == 0`` nobody could ever be promoted, and the first trials must go on for
  the later ones to have something to be compared against).
* otherwise the ``n`` trials are ranked by (front, larger crowding distance first), and the trial
  continues iff fewer than ``floor(n / eta)`` trials rank strictly ahead of it. Ties therefore
  favour the arriving trial, as Optuna's ``SuccessiveHalvingPruner`` does (it promotes a value
  equal to the cut-off). This matters with two objectives: both ends of a front have infinite
  crowding distance, and breaking that tie against the newcomer would stop every new best-PSNR
  (or best-latency) trial whenever an older trial held the other end.
* a trial whose own values at the rung are not finite (a diverged run) never continues; other
  trials' non-finite values rank behind every finite one.

The top rung is ``max_steps``, the full fidelity: a trial that reaches it finishes normally.

Rung values live in the Optuna storage as trial user attributes (``rung_{k}_values``), so the
decision sees every worker's trials and survives resumes.

Cost: a trial's value at a rung is written once and never changes, so each process keeps the
values it has read, by trial number, with their non-dominated fronts (``pareto.ParetoLevels``,
updated per arriving trial); a decision reads only the trials it has not seen settled, inserts
the new values and places the candidate alone: O(n m) plus sorting its front, instead of sorting
the whole rung (O(n^2 m)) at every decision. The ranking is exactly the one described above
(``tests/test_asha_ranking.py`` compares it with a full sort of the rung on recorded histories).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ehrsr.search.pareto import ParetoLevels, to_minimization
from ehrsr.search.settled import FinishedScan, study_cache

__all__ = [
    "MOASHA",
    "Decision",
    "decision_attr",
    "record_rung",
    "rung_attr",
    "rung_steps",
    "rung_values",
    "rung_values_by_trial",
]


def rung_steps(min_steps: int, eta: int, max_steps: int) -> tuple[int, ...]:
    """Training steps at which decisions are taken: ``r, r*eta, r*eta^2, ... < max_steps``, then
    ``max_steps`` itself (the full fidelity, whether or not it is a power of ``eta`` times ``r``)."""
    for name, value in (("min_steps", min_steps), ("eta", eta), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    if max_steps < min_steps:
        raise ValueError(f"max_steps ({max_steps}) must be >= min_steps ({min_steps})")
    steps = []
    step = min_steps
    while step < max_steps:
        steps.append(step)
        step *= eta
    steps.append(max_steps)
    return tuple(steps)


def rung_attr(rung_index: int) -> str:
    """User attribute holding a trial's objective values at rung ``rung_index``."""
    return f"rung_{rung_index}_values"


def decision_attr(rung_index: int) -> str:
    """User attribute holding the promotion decision taken at rung ``rung_index`` (text)."""
    return f"rung_{rung_index}_decision"


@dataclass(frozen=True)
class Decision:
    """Whether a trial continues past a rung, and why.

    ``rank`` is 1 + the number of trials ranked strictly ahead of it among the ``n_at_rung``
    trials (itself included); ``n_continue`` is how many of them may continue (``floor(n / eta)``, or all of them under the grace rule);
    ``front`` is 1-based; ``crowding`` is the trial's crowding distance inside its front.
    """

    promote: bool
    reason: str
    rank: int
    n_at_rung: int
    n_continue: int
    front: int | None = None
    crowding: float | None = None


class MOASHA:
    """Rungs and promotion rule of MO-ASHA (see the module docstring for the exact rules).

    ``directions`` are the study's (``"minimize"``/``"maximize"`` or ``StudyDirection``), in the
    order of the values given to ``should_promote``.
    """

    def __init__(self, min_steps: int, eta: int, max_steps: int, directions: Sequence[Any]) -> None:
        if not directions:
            raise ValueError("MOASHA needs at least one objective direction")
        self.min_steps = min_steps
        self.eta = eta
        self.max_steps = max_steps
        self.directions = list(directions)
        to_minimization(np.zeros((0, len(self.directions))), self.directions)  # checks the names
        self.rungs: tuple[int, ...] = rung_steps(min_steps, eta, max_steps)

    @classmethod
    def from_fidelity(cls, fidelity: Any, directions: Sequence[Any]) -> MOASHA:
        """From a search space's ``Fidelity`` (``min_steps``, ``eta``, ``max_steps``)."""
        return cls(fidelity.min_steps, fidelity.eta, fidelity.max_steps, directions)

    def __repr__(self) -> str:
        return f"MOASHA(rungs={list(self.rungs)}, eta={self.eta}, objectives={len(self.directions)})"

    @property
    def top_rung(self) -> int:
        """Index of the full-fidelity rung (``max_steps``)."""
        return len(self.rungs) - 1

    def rung_index(self, step: int) -> int | None:
        """Index of the rung at exactly ``step`` training steps, or None between rungs."""
        try:
            return self.rungs.index(step)
        except ValueError:
            return None

    def should_promote(
        self,
        trial_values_at_rung: Sequence[float],
        others_values_at_rung: Sequence[Sequence[float]],
        rung_index: int | None = None,
    ) -> Decision:
        """Decide for a trial that just reached a rung.

        ``others_values_at_rung`` are the values of every *other* trial that reached the same rung
        so far (any worker, any state). ``rung_index`` only makes the reason more readable.
        """
        own = self._own_values(trial_values_at_rung)
        others = np.asarray(others_values_at_rung, dtype=float).reshape(-1, len(self.directions))
        finite = others[np.all(np.isfinite(others), axis=1)]
        levels = ParetoLevels(self.directions)
        levels.extend(finite, keys=range(finite.shape[0]))  # keys: the order the others were given in
        return self._rank(own, levels, others.shape[0] + 1, rung_index)

    def _own_values(self, values: Sequence[float]) -> np.ndarray:
        m = len(self.directions)
        own = np.asarray(values, dtype=float)
        if own.shape != (m,):
            raise ValueError(f"trial values must have {m} objectives, got {list(own)}")
        return own

    def _rank(self, own: np.ndarray, levels: ParetoLevels, n: int, rung_index: int | None) -> Decision:
        """The decision for a trial with values ``own`` among ``n - 1`` others, whose finite values
        are sorted in ``levels`` (non-finite others rank behind everyone: they only count in ``n``)."""
        where = self._where(rung_index)
        if not np.all(np.isfinite(own)):
            return Decision(False, f"{where}: non-finite objective values {own.tolist()}", n, n, 0)
        if n < self.eta:
            return Decision(
                True,
                f"{where}: {n} of eta={self.eta} trials have reached it, too few to rank; continue",
                rank=1,
                n_at_rung=n,
                n_continue=n,
            )

        n_continue = n // self.eta
        placed = levels.crowded_rank(own)
        rank = placed.ahead + 1
        promote = placed.ahead < n_continue
        front = placed.front + 1
        crowding = placed.crowding
        crowd_text = "inf" if math.isinf(crowding) else f"{crowding:.3g}"
        verdict = "continue" if promote else "stop"
        reason = (
            f"{where}: rank {rank} of {n} (front {front}, crowding {crowd_text}); "
            f"top {n_continue} = floor({n}/{self.eta}) continue; {verdict}"
        )
        return Decision(promote, reason, rank, n, n_continue, front, crowding)

    def decide(self, trial: Any, rung_index: int, values: Sequence[float],
               also: dict[str, Any] | None = None) -> Decision:
        """Record ``values`` for ``trial`` at ``rung_index`` in the storage, then decide against
        every other trial of the study at that rung; the decision text is stored too.

        ``trial`` is a running ``optuna.Trial`` (it has ``.study`` and ``.set_user_attr``).
        ``also``: more attributes of the trial to write with its rung values (one write).
        """
        from ehrsr.search.storage import set_user_attrs

        if not 0 <= rung_index < len(self.rungs):
            raise ValueError(f"rung_index must be in 0..{len(self.rungs) - 1}, got {rung_index}")
        own = self._own_values(values)
        set_user_attrs(trial, {**(also or {}), rung_attr(rung_index): [float(v) for v in values]})
        table = _rung_table(trial.study, rung_index, self.directions)
        with table.lock:
            n_others = table.refresh(trial.study, rung_index, exclude=trial.number)
            if n_others is None:  # the trial's own value was read before (a repeated decision)
                others = rung_values(trial.study, rung_index, exclude_trial=trial.number)
                decision = self.should_promote(values, others, rung_index)
            else:
                decision = self._rank(own, table.levels, n_others + 1, rung_index)
        trial.set_user_attr(decision_attr(rung_index), decision.reason)
        return decision

    def _where(self, rung_index: int | None) -> str:
        if rung_index is None:
            return "rung"
        steps = self.rungs[rung_index] if 0 <= rung_index < len(self.rungs) else "?"
        return f"rung {rung_index} ({steps} steps)"


def record_rung(trial: Any, rung_index: int, values: Sequence[float]) -> None:
    """Store a trial's objective values at a rung as the user attribute ``rung_{k}_values``."""
    trial.set_user_attr(rung_attr(rung_index), [float(v) for v in values])


def rung_values_by_trial(study: Any, rung_index: int, exclude_trial: Any = None) -> dict[int, list[float]]:
    """``{trial number: values}`` of every trial (any state, any worker) that reached the rung."""
    excluded = getattr(exclude_trial, "number", exclude_trial)
    key = rung_attr(rung_index)
    table = {}
    for frozen in study.get_trials(deepcopy=False):
        if frozen.number == excluded:
            continue
        values = frozen.user_attrs.get(key)
        if values is not None:
            table[frozen.number] = [float(v) for v in values]
    return dict(sorted(table.items()))


def rung_values(study: Any, rung_index: int, exclude_trial: Any = None) -> list[list[float]]:
    """Values of every trial at a rung, in trial-number (arrival) order, optionally minus one
    trial (its number or the trial itself)."""
    return list(rung_values_by_trial(study, rung_index, exclude_trial).values())


# ---------------------------------------------------------------------------------------------
# rung values read so far, per process


@dataclass
class _RungTable:
    """The values one process has read at one rung of one study, sorted into fronts.

    A trial's rung value never changes once written, and a finished trial without one never gets
    one: a refresh reads the trials finished since the last one (``settled.FinishedScan``) and the
    running ones, skipping those already read.
    """

    directions: list[Any]
    levels: ParetoLevels = field(init=False)
    known: set[int] = field(default_factory=set)  # trial numbers read (finite or not)
    n_nonfinite: int = 0
    scan: FinishedScan = field(default_factory=FinishedScan)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.levels = ParetoLevels(self.directions)

    def refresh(self, study: Any, rung_index: int, exclude: int) -> int | None:
        """Read the rung values not read yet (every trial but ``exclude``); return how many
        trials other than ``exclude`` have a value at the rung, or None when ``exclude``'s own
        value was read earlier (the caller then ranks from the storage)."""
        key = rung_attr(rung_index)
        trials = study.get_trials(deepcopy=False)
        finished, reset = self.scan.update(trials)
        if reset:  # another study under the same name: start over
            self.levels, self.known, self.n_nonfinite = ParetoLevels(self.directions), set(), 0
        new_values: list[list[float]] = []
        new_numbers: list[int] = []
        for frozen in (*finished, *self.scan.unfinished(trials)):
            number = frozen.number
            values = frozen.user_attrs.get(key)
            if values is None or number in self.known or number == exclude:
                continue
            self.known.add(number)
            row = [float(v) for v in values]
            if all(map(math.isfinite, row)):
                new_values.append(row)
                new_numbers.append(number)
            else:
                self.n_nonfinite += 1
        if len(self.levels) == 0:
            self.levels.extend(new_values, new_numbers)
        else:
            for row, number in zip(new_values, new_numbers):
                self.levels.add(row, number)
        if exclude in self.known:
            return None
        return len(self.levels) + self.n_nonfinite


def _rung_table(study: Any, rung_index: int, directions: Sequence[Any]) -> _RungTable:
    """This process's table of ``study``'s rung (``settled.study_cache``)."""
    names = ",".join(str(getattr(d, "name", d)).lower() for d in directions)
    return study_cache(study, f"rung {rung_index} values ({names})", lambda: _RungTable(list(directions)))
