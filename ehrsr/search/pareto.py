"""Pareto maths shared by early stopping, the study driver, the ablation and the reports.

* ``non_dominated_sort``: the fast non-dominated sort of NSGA-II (Deb, Pratap, Agarwal, Meyarivan,
  "A fast and elitist multiobjective genetic algorithm: NSGA-II", IEEE TEVC 2002, section III-A).
* ``crowding_distance``: NSGA-II's crowding distance (same paper, section III-B), computed inside
  one front.
* ``ParetoLevels``: the same fronts for a set of points that only grows, updated one point at a
  time, and the crowded rank a new point would take among them without recomputing the sort
  (MO-ASHA ranks every arriving trial against every trial at its rung; see that class).
* ``hypervolume``: the volume dominated by a set of points and bounded by a reference point
  (Zitzler & Thiele 1998). Two objectives use the exact sweep line; more use the hypervolume by
  slicing objectives (HSO, While et al. 2006), which is exact and fast enough for the few hundred
  points a study holds. Optuna 5 computes hypervolumes only in a private module
  (``optuna._hypervolume``), so the project keeps its own and tests it against that one.

Every function takes values as a sequence of points (one row per point, one column per objective)
and ``directions`` as ``"minimize"``/``"maximize"`` strings or ``optuna.study.StudyDirection``
members. Internally everything is turned into minimisation by negating maximised columns.

* ``knee_point`` / ``knee_trial``: the knee of a front (closest to the utopia point after min-max
  normalisation), the reference of the controlled ablation and the report's highlighted trial.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ehrsr.study_schema import TRIAL

__all__ = [
    "CrowdedRank",
    "ParetoLevels",
    "comparable_trials",
    "crowding_distance",
    "dominates",
    "front_trials",
    "hypervolume",
    "hypervolume_2d",
    "knee_point",
    "knee_trial",
    "non_dominated_sort",
    "pareto_front",
    "to_minimization",
    "trial_steps",
]


def _direction_sign(direction: Any) -> float:
    """+1 for a minimised objective, -1 for a maximised one (Optuna enum or string)."""
    name = getattr(direction, "name", direction)
    name = str(name).lower()
    if name == "minimize":
        return 1.0
    if name == "maximize":
        return -1.0
    raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")


def to_minimization(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]) -> np.ndarray:
    """``(n, m)`` float array in which smaller is better for every column."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, len(directions))
    if array.ndim != 2:
        raise ValueError(f"values must be a 2-D table (points x objectives), got shape {array.shape}")
    if array.shape[1] != len(directions):
        raise ValueError(
            f"values have {array.shape[1]} objectives but {len(directions)} directions were given"
        )
    signs = np.array([_direction_sign(d) for d in directions])
    return array * signs


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` Pareto-dominates ``b`` (minimisation): no worse in all objectives, better in one."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(
    values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]
) -> list[list[int]]:
    """Fronts of point indices: front 0 is the non-dominated set, front 1 is non-dominated once
    front 0 is removed, and so on (Deb et al. 2002). Indices inside a front are ascending.

    Equal points do not dominate each other, so duplicates share a front.
    """
    loss = to_minimization(values, directions)
    n = loss.shape[0]
    if n == 0:
        return []
    if not np.all(np.isfinite(loss)):
        raise ValueError("non_dominated_sort needs finite values (NaN or inf found)")
    # better[i, j]: i dominates j. Broadcasting is O(n^2 m) memory, fine for study-sized n.
    no_worse = np.all(loss[:, None, :] <= loss[None, :, :], axis=2)
    strictly = np.any(loss[:, None, :] < loss[None, :, :], axis=2)
    better = no_worse & strictly
    dominated_by_count = better.sum(axis=0)  # how many points dominate j
    assigned = np.zeros(n, dtype=bool)
    fronts: list[list[int]] = []
    current = np.flatnonzero(dominated_by_count == 0)
    while current.size:
        # one vectorised step per front, not a Python loop per dominated pair: MO-ASHA sorts
        # every rung at every decision, and a rung of 1,000 trials took seconds that way
        fronts.append([int(i) for i in current])
        assigned[current] = True
        dominated_by_count = dominated_by_count - better[current].sum(axis=0)
        current = np.flatnonzero((dominated_by_count == 0) & ~assigned)
    return fronts


def crowding_distance(values: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point of one front (Deb et al. 2002, section III-B).

    For each objective the points are sorted; the two boundary points get ``inf`` and an interior
    point adds the gap between its neighbours divided by the objective's range. An objective on
    which all points are equal adds nothing (its range is zero, so it separates no one), and a
    front of one or two points is all boundary (``inf``). Directions do not matter: the distance
    is symmetric in the sign of each objective.
    """
    points = np.asarray(values, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"values must be a 2-D table (points x objectives), got shape {points.shape}")
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        distance[:] = np.inf
        return distance
    if not np.all(np.isfinite(points)):
        raise ValueError("crowding_distance needs finite values (NaN or inf found)")
    for k in range(m):
        # stable sort: equal values keep index order, so the result is deterministic
        order = np.argsort(points[:, k], kind="stable")
        column = points[order, k]
        value_range = column[-1] - column[0]
        if value_range == 0:
            continue
        distance[order[0]] = np.inf
        distance[order[-1]] = np.inf
        distance[order[1:-1]] += (column[2:] - column[:-2]) / value_range
    return distance


@dataclass(frozen=True)
class CrowdedRank:
    """Where a new point would stand among a set (``ParetoLevels.crowded_rank``).

    ``front`` is 0-based; ``crowding`` is its crowding distance inside that front; ``ahead`` is how
    many points of the set rank strictly ahead of it by (front, larger crowding first).
    """

    front: int
    crowding: float
    ahead: int


class ParetoLevels:
    """The non-dominated sorting of a set of points that only grows, kept up to date per insertion.

    ``non_dominated_sort`` compares every pair of points: O(n^2) per call. A study's rung grows by
    one trial at a time and MO-ASHA ranks each arrival against all the others, so sorting the rung
    anew at every decision made the decision quadratic. Here each point keeps its front (level)
    and an insertion moves only the points it pushes back, the ENLU update of Li, Deb, Zhang and
    Kwong ("Efficient non-domination level update approach for steady-state evolutionary
    multiobjective optimization", IEEE TEVC 19(2), 2015): adding ``p`` to the front ``f`` after
    the deepest front holding a point that dominates it pushes the points of front ``f`` that
    ``p`` dominates to ``f + 1``, the points of ``f + 1`` that those dominate to ``f + 2``, and so
    on. A point moves at most one front per insertion (a dominance chain holds ``p`` at most
    once), and it moves exactly when a point entering its front dominates it. The fronts are
    those of ``non_dominated_sort`` on the same points (tested).

    ``crowded_rank`` places a point without inserting it: O(n m) to find its front, plus sorting
    that front for the crowding distance. Points that the new one would push back all lie on
    deeper fronts, so the fronts ahead of it are the set's own.

    Every point carries a ``key`` (an int, e.g. a trial number) that orders the points of a front
    exactly as ``non_dominated_sort`` orders indices, so crowding distances (whose ties depend on
    the order) come out bit for bit as in a sort of the points listed by key.
    """

    def __init__(self, directions: Sequence[Any]) -> None:
        if not directions:
            raise ValueError("ParetoLevels needs at least one objective direction")
        self.directions = list(directions)
        self._signs = np.array([_direction_sign(d) for d in self.directions])
        m = len(self.directions)
        self._loss = np.empty((m, 64))  # one row per objective: column slices are contiguous
        self._keys = np.empty(64, dtype=np.int64)
        self._level = np.empty(64, dtype=np.int64)
        self._n = 0
        self._fronts: list[np.ndarray] = []  # point indices per level, in insertion order

    def __len__(self) -> int:
        return self._n

    def _as_loss(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        point = np.asarray(values, dtype=float).reshape(-1)
        if point.shape != self._signs.shape:
            raise ValueError(f"a point must have {len(self._signs)} objectives, got {point.tolist()}")
        if not np.all(np.isfinite(point)):
            raise ValueError(f"ParetoLevels needs finite values, got {point.tolist()}")
        return point * self._signs

    def _dominators(self, loss: np.ndarray) -> np.ndarray:
        """Mask of the stored points that dominate ``loss`` (minimisation): one pass per objective."""
        stored = self._loss[:, : self._n]
        no_worse = stored[0] <= loss[0]
        better = stored[0] < loss[0]
        for k in range(1, loss.size):
            no_worse &= stored[k] <= loss[k]
            better |= stored[k] < loss[k]
        return no_worse & better

    def _front_of(self, loss: np.ndarray) -> int:
        return int(np.max(self._level[: self._n], where=self._dominators(loss), initial=-1)) + 1

    def add(self, values: Sequence[float] | np.ndarray, key: int) -> None:
        """Insert one point (the study's directions; finite) and move the points it pushes back."""
        self._insert(self._as_loss(values), key)

    def _insert(self, loss: np.ndarray, key: int, *, may_push: bool = True) -> None:
        level = self._front_of(loss)
        if self._n == self._keys.size:
            grown = 2 * self._n
            self._loss = np.concatenate([self._loss, np.empty_like(self._loss)], axis=1)
            self._keys = np.resize(self._keys, grown)
            self._level = np.resize(self._level, grown)
        index = self._n
        self._loss[:, index] = loss
        self._keys[index] = key
        self._n += 1
        moving = np.array([index])
        while moving.size:
            if level == len(self._fronts):
                self._fronts.append(np.empty(0, dtype=np.int64))
            members = self._fronts[level]
            pushed = members[:0]
            if may_push and members.size:
                entering, present = self._loss[:, moving].T, self._loss[:, members].T
                beaten = np.any(
                    np.all(entering[:, None, :] <= present[None, :, :], axis=2)
                    & np.any(entering[:, None, :] < present[None, :, :], axis=2),
                    axis=0,
                )  # (members,): dominated by a point entering this front
                pushed, members = members[beaten], members[~beaten]
            self._fronts[level] = np.concatenate([members, moving])
            self._level[moving] = level
            moving, level = pushed, level + 1

    def extend(self, points: Sequence[Sequence[float]] | np.ndarray, keys: Iterable[int]) -> None:
        """Insert many points. They go in lexicographic order of their losses: a point never
        dominates one that precedes it in that order, so no insertion pushes anything back."""
        key_list = list(keys)
        loss = [self._as_loss(point) for point in points]
        if len(loss) != len(key_list):
            raise ValueError(f"{len(loss)} points but {len(key_list)} keys")
        if not loss:
            return
        table = np.vstack(loss)
        for i in np.lexsort(table.T[::-1]):
            self._insert(table[i], key_list[i], may_push=False)

    def fronts(self) -> list[list[int]]:
        """The keys of each front, front 0 first, ascending inside a front."""
        return [sorted(int(k) for k in self._keys[members]) for members in self._fronts if members.size]

    def leading(self, at_least: int) -> list[int]:
        """The keys of the first fronts, whole fronts until they hold at least ``at_least`` points
        (every key when the set is smaller), ascending."""
        keys: list[int] = []
        for members in self._fronts:
            if len(keys) >= at_least:
                break
            keys.extend(int(k) for k in self._keys[members])
        return sorted(keys)

    def crowded_rank(self, values: Sequence[float] | np.ndarray) -> CrowdedRank:
        """The rank a new point would take among the set, by (front, larger crowding distance
        first), without inserting it; a point with equal front and crowding is not ahead.

        Equal to sorting the set plus the point with ``non_dominated_sort`` (the point listed
        after the set's points, which are listed by key) and computing ``crowding_distance`` on
        its front: the points the new one would push back are off its front and behind it.
        """
        loss = self._as_loss(values)
        front = self._front_of(loss)
        ahead = sum(int(members.size) for members in self._fronts[:front])
        members = self._fronts[front] if front < len(self._fronts) else np.empty(0, dtype=np.int64)
        if members.size:
            present = self._loss[:, members].T
            pushed = np.all(loss <= present, axis=1) & np.any(loss < present, axis=1)
            members = members[~pushed]
            members = members[np.argsort(self._keys[members], kind="stable")]
        crowding = crowding_distance(np.vstack([self._loss[:, members].T, loss[None, :]]))
        ahead += int(np.count_nonzero(crowding[:-1] > crowding[-1]))
        return CrowdedRank(front=front, crowding=float(crowding[-1]), ahead=ahead)


def pareto_front(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]) -> list[int]:
    """Indices of the non-dominated points (front 0 of ``non_dominated_sort``)."""
    fronts = non_dominated_sort(values, directions)
    return fronts[0] if fronts else []


def _points_inside(loss: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Points strictly better than the reference in every objective; the others add no volume."""
    if loss.size == 0:
        return loss.reshape(0, reference.size)
    return loss[np.all(loss < reference, axis=1)]


def hypervolume_2d(
    values: Sequence[Sequence[float]] | np.ndarray,
    directions: Sequence[Any],
    reference: Sequence[float],
) -> float:
    """Exact 2-objective hypervolume by a sweep over the points sorted on the first objective."""
    if len(directions) != 2:
        raise ValueError(f"hypervolume_2d needs 2 objectives, got {len(directions)}")
    loss, ref = _prepare(values, directions, reference)
    loss = _points_inside(loss, ref)
    if loss.shape[0] == 0:
        return 0.0
    # ascending first objective; on ties the smaller second objective first
    loss = loss[np.lexsort((loss[:, 1], loss[:, 0]))]
    volume = 0.0
    best_second = ref[1]
    for first, second in loss:
        if second < best_second:  # a dominated point (second >= best so far) adds nothing
            volume += (ref[0] - first) * (best_second - second)
            best_second = second
    return float(volume)


def hypervolume(
    values: Sequence[Sequence[float]] | np.ndarray,
    directions: Sequence[Any],
    reference: Sequence[float],
) -> float:
    """Exact hypervolume of ``values`` (any number of objectives) with respect to ``reference``.

    ``reference`` is given in the objectives' own units and directions (e.g. ``[20.0, 500.0]`` for
    maximised PSNR in dB and minimised latency in ms): it must be worse than the points that
    should count; points not strictly better in every objective add nothing.
    """
    if len(directions) == 2:
        return hypervolume_2d(values, directions, reference)
    loss, ref = _prepare(values, directions, reference)
    loss = _points_inside(loss, ref)
    if loss.shape[0] == 0:
        return 0.0
    front = pareto_front(loss, ["minimize"] * loss.shape[1])
    return float(_hso(loss[front], ref))


def _prepare(values: Any, directions: Sequence[Any], reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    loss = to_minimization(values, directions)
    signs = np.array([_direction_sign(d) for d in directions])
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (len(directions),):
        raise ValueError(f"reference must have one value per objective ({len(directions)}), got {list(ref)}")
    if loss.size and not np.all(np.isfinite(loss)):
        raise ValueError("hypervolume needs finite values (NaN or inf found)")
    return loss, ref * signs


def _hso(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume by slicing objectives: cut along the last objective, recurse on the rest."""
    m = points.shape[1]
    if m == 1:
        return float(reference[0] - points[:, 0].min())
    if m == 2:
        return hypervolume_2d(points, ["minimize", "minimize"], reference)
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    volume = 0.0
    for i in range(points.shape[0]):
        upper = points[i + 1, -1] if i + 1 < points.shape[0] else reference[-1]
        depth = upper - points[i, -1]
        if depth <= 0:
            continue
        # the slab [z_i, z_{i+1}) is covered by the projections of the first i+1 points
        slab = points[: i + 1, :-1]
        slab = slab[pareto_front(slab, ["minimize"] * (m - 1))]
        volume += depth * _hso(slab, reference[:-1])
    return volume


def knee_point(values: np.ndarray | list[list[float]], directions: Sequence[Any]) -> int | None:
    """Index of the knee of a Pareto front: the point closest (Euclidean) to the utopia point after
    each objective is min-max normalised over the front so that 0 is its best value and 1 its
    worst. An objective that is equal on the whole front contributes 0. Ties go to the lower index.

    Closest-to-utopia (the "compromise programming" choice, Zeleny 1973) works for any number of
    objectives; with two it picks the point where a unit gain in one objective starts to cost
    more than a unit of the other, on the normalised scale.
    """
    loss = to_minimization(values, directions)
    if loss.shape[0] == 0:
        return None
    low = loss.min(axis=0)
    span = loss.max(axis=0) - low
    span[span == 0] = 1.0  # equal everywhere: normalised value 0 for every point
    normalised = (loss - low) / span
    distance = np.sqrt((normalised**2).sum(axis=1))
    return int(np.argmin(distance))  # argmin returns the first (lowest index) of equal minima


def knee_trial(study: optuna.Study, front: list[FrozenTrial] | None = None) -> FrozenTrial | None:
    """The knee (``knee_point``) of the study's front (``front_trials``, ordered by number), or
    None when the study has no finished feasible trial."""
    if front is None:
        front = front_trials(study)
    front = sorted((t for t in front if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if not front:
        return None
    index = knee_point([list(t.values) for t in front], list(study.directions))
    return front[index] if index is not None else None


def trial_steps(trial: FrozenTrial) -> int | None:
    """The steps a trial was planned to train (its stored ``train`` settings), or None."""
    steps = (trial.user_attrs.get(TRIAL.train) or {}).get("steps")
    return int(steps) if isinstance(steps, (int, float)) else None


def comparable_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The finished (COMPLETE) trials measured like the study's latest one: trained the same
    number of steps. Every finished trial, unless a proxy-fidelity check raised the steps part-way
    (docs/proxy_fidelity.md); then only those at the raised steps, so no front mixes PSNRs after
    different training lengths."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    latest = trial_steps(max(complete, key=lambda t: t.number))
    if latest is None:
        return list(complete)
    return [t for t in complete if trial_steps(t) == latest]


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's Pareto front over ``comparable_trials``: ``study.best_trials`` when every
    finished trial trained the same steps, else the non-dominated feasible trials at the latest
    steps (Optuna's rule: only feasible trials when any trial recorded constraints)."""
    comparable = comparable_trials(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(comparable) == len(complete):
        return list(study.best_trials)
    candidates = [t for t in comparable if all(v <= 0.0 for v in t.constraints.values())]
    if not candidates or any(t.values is None for t in candidates):
        return []
    return [candidates[i] for i in pareto_front([list(t.values) for t in candidates], list(study.directions))]
