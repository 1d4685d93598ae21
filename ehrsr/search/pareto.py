"""Pareto maths shared by early stopping, the study driver, the ablation and the reports.

* ``non_dominated_sort``: the fast non-dominated sort of NSGA-II (Deb, Pratap, Agarwal, Meyarivan,
  "A fast and elitist multiobjective genetic algorithm: NSGA-II", IEEE TEVC 2002, section III-A).
* ``crowding_distance``: NSGA-II's crowding distance (same paper, section III-B), computed inside
  one front.
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

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "crowding_distance",
    "dominates",
    "hypervolume",
    "hypervolume_2d",
    "knee_point",
    "knee_trial",
    "non_dominated_sort",
    "pareto_front",
    "to_minimization",
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
    """The knee (``knee_point``) of ``study.best_trials`` (trials ordered by number), or None when
    the study has no finished feasible trial."""
    if front is None:
        front = study.best_trials
    front = sorted((t for t in front if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if not front:
        return None
    index = knee_point([list(t.values) for t in front], list(study.directions))
    return front[index] if index is not None else None
