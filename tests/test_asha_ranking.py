"""MO-ASHA's incremental ranking (cached rung values, ``pareto.ParetoLevels``) decides exactly as
the full sort of the rung it replaced, on recorded rung histories.

``quadratic_decision`` below is MO-ASHA's decision as it was first written: every decision sorts
the whole rung (the candidate included) with ``non_dominated_sort`` and computes the crowding
distance of every front. The histories have ties (values on a coarse grid, duplicates),
diverged trials (non-finite values), trials that never reach the rung (infeasible or failed),
out-of-order arrivals, two workers on one storage, one to four objectives and several eta.
Decisions are compared whole: promote, reason text, rank, n, front and crowding distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.asha import MOASHA, Decision, rung_values
from ehrsr.search.pareto import ParetoLevels, crowding_distance, non_dominated_sort, to_minimization

optuna.logging.set_verbosity(optuna.logging.WARNING)


def quadratic_decision(asha: MOASHA, own_values: Sequence[float], others_values: Sequence[Sequence[float]],
                       rung_index: int | None = None) -> Decision:
    """The reference: sort the rung with the candidate, rank by (front, larger crowding first)."""
    m = len(asha.directions)
    own = np.asarray(own_values, dtype=float)
    others = np.asarray(others_values, dtype=float).reshape(-1, m)
    n = others.shape[0] + 1
    where = asha._where(rung_index)
    if not np.all(np.isfinite(own)):
        return Decision(False, f"{where}: non-finite objective values {own.tolist()}", n, n, 0)
    if n < asha.eta:
        return Decision(True, f"{where}: {n} of eta={asha.eta} trials have reached it, too few to rank; continue",
                        rank=1, n_at_rung=n, n_continue=n)
    n_continue = n // asha.eta
    finite_others = others[np.all(np.isfinite(others), axis=1)]
    table = np.vstack([finite_others, own[None, :]])
    me = table.shape[0] - 1
    fronts = non_dominated_sort(table, asha.directions)
    loss = to_minimization(table, asha.directions)
    front_of: dict[int, int] = {}
    crowding_of: dict[int, float] = {}
    for f, members in enumerate(fronts):
        for idx, dist in zip(members, crowding_distance(loss[members])):
            front_of[idx] = f
            crowding_of[idx] = float(dist)
    key = {idx: (front_of[idx], -crowding_of[idx]) for idx in front_of}
    ahead = sum(1 for idx in range(me) if key[idx] < key[me])
    rank = ahead + 1
    promote = ahead < n_continue
    front = front_of[me] + 1
    crowding = crowding_of[me]
    crowd_text = "inf" if math.isinf(crowding) else f"{crowding:.3g}"
    verdict = "continue" if promote else "stop"
    reason = (f"{where}: rank {rank} of {n} (front {front}, crowding {crowd_text}); "
              f"top {n_continue} = floor({n}/{asha.eta}) continue; {verdict}")
    return Decision(promote, reason, rank, n, n_continue, front, crowding)


def _directions(m: int) -> list[str]:
    return [("maximize", "minimize")[k % 2] for k in range(m)]


def _history_values(rng: np.random.Generator, n: int, m: int) -> list[list[float]]:
    """Values on a coarse grid (many ties and duplicates), about 5 % of them non-finite."""
    values = rng.integers(0, 6, size=(n, m)).astype(float) * 0.5
    values[rng.random(n) < 0.05, rng.integers(0, m)] = np.nan
    values[rng.random(n) < 0.02, 0] = np.inf
    return values.tolist()


# ---------------------------------------------------------------------------------------------
# the levels themselves


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_levels_equal_a_full_sort_whatever_the_insertion_order(m: int) -> None:
    rng = np.random.default_rng(m)
    for _ in range(40):
        n = int(rng.integers(1, 80))
        points = rng.integers(0, 5, size=(n, m)).astype(float)
        directions = _directions(m)
        expected = non_dominated_sort(points, directions)
        one_by_one = ParetoLevels(directions)
        for i in rng.permutation(n):  # arrivals in any order: insertions push points back
            one_by_one.add(points[i], int(i))
        batch = ParetoLevels(directions)
        batch.extend(points, range(n))
        assert one_by_one.fronts() == expected
        assert batch.fronts() == expected
        assert len(one_by_one) == len(batch) == n


def test_levels_refuse_non_finite_points_and_wrong_widths() -> None:
    levels = ParetoLevels(["minimize", "minimize"])
    with pytest.raises(ValueError, match="finite"):
        levels.add([1.0, float("nan")], 0)
    with pytest.raises(ValueError, match="2 objectives"):
        levels.add([1.0], 0)
    with pytest.raises(ValueError, match="3 points but 2 keys"):
        levels.extend([[1, 2], [2, 1], [3, 3]], [0, 1])


# ---------------------------------------------------------------------------------------------
# decisions on values held in memory


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("eta", [2, 3, 4])
def test_should_promote_equals_the_full_sort_on_arrival_sequences(m: int, eta: int) -> None:
    rng = np.random.default_rng(100 * m + eta)
    asha = MOASHA(10, eta, 1000, _directions(m))
    promoted = 0
    for _ in range(3):
        history = _history_values(rng, 70, m)
        for i, values in enumerate(history):
            seen = history[:i]
            got = asha.should_promote(values, seen, rung_index=0)
            assert got == quadratic_decision(asha, values, seen, rung_index=0), (i, values)
            promoted += got.promote
    assert 0 < promoted < 3 * 70  # the histories exercise both verdicts


# ---------------------------------------------------------------------------------------------
# decisions through the storage (the cached, incremental path)


def _replay(studies: list[optuna.Study], asha: MOASHA, rng: np.random.Generator, n_trials: int,
            m: int) -> list[tuple[Decision, Decision]]:
    """Run a rung history: trials start in batches (several RUNNING at once, as with many
    workers), reach rung 0 in random order, some continue to rung 1, some fail before any rung
    (refused, infeasible) or diverge (NaN values); every decision is compared with the full sort
    of the same rung read from the storage."""
    pairs = []
    pending: list[tuple[optuna.Study, optuna.Trial]] = []
    started = 0
    while started < n_trials or pending:
        while started < n_trials and len(pending) < 5:
            study = studies[started % len(studies)]
            pending.append((study, study.ask()))
            started += 1
        study, trial = pending.pop(int(rng.integers(len(pending))))
        if rng.random() < 0.1:  # refused or infeasible before its first rung: no rung value
            study.tell(trial, state=TrialState.FAIL)
            continue
        last_values: list[float] = []
        stopped = False
        for rung in (0, 1):
            values = _history_values(rng, 1, m)[0]
            reference = quadratic_decision(asha, values, rung_values(study, rung, exclude_trial=trial.number), rung)
            decision = asha.decide(trial, rung, values)
            pairs.append((decision, reference))
            last_values = values
            if not decision.promote:
                stopped = True
                break
        if stopped or not all(map(math.isfinite, last_values)):
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, last_values)
    return pairs


@pytest.mark.parametrize("m", [1, 2, 3])
def test_decide_equals_the_full_sort_in_memory(m: int) -> None:
    rng = np.random.default_rng(7 + m)
    asha = MOASHA(10, 3, 90, _directions(m))
    study = optuna.create_study(directions=_directions(m))
    pairs = _replay([study], asha, rng, 120, m)
    assert [got for got, _ in pairs] == [want for _, want in pairs]
    assert {got.promote for got, _ in pairs} == {True, False}
    assert max(got.n_at_rung for got, _ in pairs) > 90


def test_decide_equals_the_full_sort_with_two_workers_on_a_journal(tmp_path) -> None:
    # two handles on one journal file stand for two workers: each has its own cache and sees the
    # other's trials only through the storage
    from ehrsr.search.storage import open_storage

    url = f"journal:{tmp_path / 'study.journal'}"
    directions = _directions(2)
    first = optuna.create_study(storage=open_storage(url), study_name="s", directions=directions)
    second = optuna.load_study(storage=open_storage(url), study_name="s")
    asha = MOASHA(10, 2, 40, directions)
    pairs = _replay([first, second], asha, np.random.default_rng(3), 80, 2)
    assert [got for got, _ in pairs] == [want for _, want in pairs]
    assert {got.promote for got, _ in pairs} == {True, False}


def test_a_repeated_decision_for_the_same_trial_still_excludes_it() -> None:
    directions = _directions(2)
    asha = MOASHA(10, 2, 40, directions)
    study = optuna.create_study(directions=directions)
    trials = [study.ask() for _ in range(4)]
    for i, trial in enumerate(trials[:3]):
        asha.decide(trial, 0, [float(i), float(i)])
    again = asha.decide(trials[0], 0, [0.0, 0.0])  # its own value is in this process's cache now
    assert again == quadratic_decision(asha, [0.0, 0.0], rung_values(study, 0, exclude_trial=0), 0)
    assert again.n_at_rung == 3


def test_a_study_created_again_under_the_same_name_starts_a_new_table() -> None:
    storage = optuna.storages.InMemoryStorage()
    directions = _directions(2)
    asha = MOASHA(10, 2, 40, directions)
    old = optuna.create_study(storage=storage, study_name="s", directions=directions)
    for i in range(4):
        asha.decide(old.ask(), 0, [float(i), 0.0])
    optuna.delete_study(study_name="s", storage=storage)
    new = optuna.create_study(storage=storage, study_name="s", directions=directions)
    first, second = new.ask(), new.ask()
    asha.decide(first, 0, [5.0, 5.0])
    decision = asha.decide(second, 0, [1.0, 1.0])
    assert decision.n_at_rung == 2  # the deleted study's four values are not counted
    assert decision == quadratic_decision(asha, [1.0, 1.0], [[5.0, 5.0]], 0)
