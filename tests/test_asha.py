"""MO-ASHA promotion rules and the Pareto maths under them, on hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest

from ehrsr.search.asha import MOASHA, decision_attr, record_rung, rung_attr, rung_steps, rung_values
from ehrsr.search.pareto import (
    crowding_distance,
    hypervolume,
    hypervolume_2d,
    non_dominated_sort,
    pareto_front,
)

MIN2 = ["minimize", "minimize"]

# A hand-made rung with 9 trials, both objectives minimised.
# Front 1: (0,10) (2,6) (3,5) (10,0). Crowding inside it (ranges 10 and 10):
#   (0,10), (10,0): boundary -> inf
#   (2,6): objective 1 neighbours 0 and 3 -> 0.3; objective 2 neighbours 5 and 10 -> 0.5; total 0.8
#   (3,5): objective 1 neighbours 2 and 10 -> 0.8; objective 2 neighbours 0 and 6 -> 0.6; total 1.4
# Front 2: (5,7) (11,1) (4,12)  [(5,7) by (3,5); (11,1) by (10,0); (4,12) by (0,10)]
# Front 3: (6,8) [by (5,7)]; front 4: (9,9) [by (6,8)].
RUNG9 = [(0, 10), (2, 6), (3, 5), (10, 0), (5, 7), (6, 8), (11, 1), (4, 12), (9, 9)]


def _others(values, me):
    return [v for v in values if v != me]


# ---------------------------------------------------------------------------------------------
# Pareto maths


def test_non_dominated_sort_hand_case():
    fronts = non_dominated_sort(RUNG9, MIN2)
    # index: 0 (0,10) 1 (2,6) 2 (3,5) 3 (10,0) 4 (5,7) 5 (6,8) 6 (11,1) 7 (4,12) 8 (9,9)
    assert fronts == [[0, 1, 2, 3], [4, 6, 7], [5], [8]]


def test_non_dominated_sort_respects_directions():
    # (PSNR dB, latency ms): maximise the first, minimise the second
    values = [(30.0, 10.0), (31.0, 20.0), (29.0, 5.0), (30.0, 12.0), (28.0, 30.0)]
    fronts = non_dominated_sort(values, ["maximize", "minimize"])
    assert fronts[0] == [0, 1, 2]  # (30,12) is dominated by (30,10); (28,30) by everything
    assert fronts[1] == [3]
    assert fronts[2] == [4]


def test_non_dominated_sort_duplicates_share_a_front():
    assert non_dominated_sort([(1, 1), (1, 1), (2, 2)], MIN2) == [[0, 1], [2]]


def test_crowding_distance_hand_case():
    front = np.array([(0, 10), (2, 6), (3, 5), (10, 0)], dtype=float)
    distance = crowding_distance(front)
    assert math.isinf(distance[0]) and math.isinf(distance[3])
    assert distance[1] == pytest.approx(0.3 + 0.5)
    assert distance[2] == pytest.approx(0.8 + 0.6)


def test_crowding_distance_small_fronts_and_constant_objective():
    assert np.all(np.isinf(crowding_distance([(1.0, 2.0), (2.0, 1.0)])))
    # objective 2 is constant: it separates no one and adds nothing; objective 1 does the work
    distance = crowding_distance([(0.0, 5.0), (1.0, 5.0), (4.0, 5.0)])
    assert math.isinf(distance[0]) and math.isinf(distance[2])
    assert distance[1] == pytest.approx((4.0 - 0.0) / 4.0)


def test_hypervolume_2d_hand_case():
    # minimise both, reference (4, 4): points (1,3), (2,2), (3,1) form a staircase.
    # Area = 3x1 [x from 1..4, y 3..4] + 2x1 [x 2..4, y 2..3] + 1x1 [x 3..4, y 1..2] = 6
    points = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume_2d(points, MIN2, [4, 4]) == pytest.approx(6.0)
    # a dominated point and a point outside the reference box add nothing
    assert hypervolume([*points, (3, 3), (5, 0)], MIN2, [4, 4]) == pytest.approx(6.0)
    # with PSNR maximised: (PSNR 30, 10 ms) and (32, 20 ms), reference (25 dB, 50 ms):
    # (30-25)*(50-10) + (32-30)*(50-20) = 200 + 60 = 260
    assert hypervolume([(30, 10), (32, 20)], ["maximize", "minimize"], [25, 50]) == pytest.approx(260.0)
    assert hypervolume([], MIN2, [1, 1]) == 0.0


def _hypervolume_inclusion_exclusion(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact volume of a union of boxes [p, ref] by inclusion-exclusion (independent of HSO)."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(range(len(points)), size):
            corner = points[list(subset)].max(axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(reference - corner, 0, None)))
    return total


@pytest.mark.parametrize("n_objectives", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(n_objectives):
    rng = np.random.default_rng(n_objectives)
    for _ in range(5):
        points = rng.uniform(0, 1, size=(7, n_objectives))
        reference = np.full(n_objectives, 1.1)
        expected = _hypervolume_inclusion_exclusion(points, reference)
        assert hypervolume(points, ["minimize"] * n_objectives, reference) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n_objectives", [2, 3])
def test_hypervolume_matches_optuna(n_objectives):
    # Optuna 5 computes hypervolumes only in a private module; this cross-checks ours against it.
    hv = pytest.importorskip("optuna._hypervolume")
    rng = np.random.default_rng(10 + n_objectives)
    points = rng.uniform(0, 1, size=(60, n_objectives))
    reference = np.full(n_objectives, 1.05)
    ours = hypervolume(points, ["minimize"] * n_objectives, reference)
    front = points[pareto_front(points, ["minimize"] * n_objectives)]
    assert ours == pytest.approx(hv.compute_hypervolume(front, reference), rel=1e-9)


def test_pareto_functions_reject_bad_input():
    with pytest.raises(ValueError, match="direction must be"):
        non_dominated_sort([(1, 2)], ["min", "max"])
    with pytest.raises(ValueError, match="2 objectives but 3 directions"):
        non_dominated_sort([(1, 2)], ["minimize"] * 3)
    with pytest.raises(ValueError, match="finite"):
        non_dominated_sort([(1, float("nan"))], MIN2)
    with pytest.raises(ValueError, match="one value per objective"):
        hypervolume([(1, 2)], MIN2, [3])


# ---------------------------------------------------------------------------------------------
# rungs


def test_rung_steps():
    assert rung_steps(12, 3, 108) == (12, 36, 108)
    assert rung_steps(1000, 3, 27000) == (1000, 3000, 9000, 27000)
    # max_steps not on the geometric grid still ends the ladder (full fidelity)
    assert rung_steps(10, 3, 100) == (10, 30, 90, 100)
    assert rung_steps(5, 2, 5) == (5,)
    with pytest.raises(ValueError, match="eta must be >= 2"):
        rung_steps(10, 1, 100)
    with pytest.raises(ValueError, match=r"max_steps \(5\) must be >= min_steps \(10\)"):
        rung_steps(10, 3, 5)


def test_moasha_rungs_and_indices():
    asha = MOASHA(12, 3, 108, MIN2)
    assert asha.rungs == (12, 36, 108)
    assert asha.top_rung == 2
    assert asha.rung_index(36) == 1
    assert asha.rung_index(37) is None


# ---------------------------------------------------------------------------------------------
# promotion decisions on hand-made rung values


def test_nine_trials_top_three_continue():
    asha = MOASHA(10, 3, 90, MIN2)
    # 9 trials -> floor(9/3) = 3 continue. Ranked: the two boundary points (inf crowding), then
    # (3,5) with crowding 1.4, then (2,6) with 0.8, then front 2 and 3.
    decision = asha.should_promote((3, 5), _others(RUNG9, (3, 5)), rung_index=0)
    assert decision.promote, decision.reason
    assert (decision.rank, decision.front, decision.n_continue) == (3, 1, 3)
    assert decision.crowding == pytest.approx(1.4)
    assert "rank 3 of 9" in decision.reason and "top 3 = floor(9/3)" in decision.reason

    # on the first front, but less isolated than (3,5): 3 trials rank ahead of it -> stops
    decision = asha.should_promote((2, 6), _others(RUNG9, (2, 6)), rung_index=0)
    assert not decision.promote
    assert (decision.rank, decision.front) == (4, 1)
    assert decision.crowding == pytest.approx(0.8)

    # a boundary point of the first front is never behind anyone
    decision = asha.should_promote((10, 0), _others(RUNG9, (10, 0)))
    assert decision.promote and decision.rank == 1 and math.isinf(decision.crowding)

    # dominated: front 4 -> stops
    decision = asha.should_promote((9, 9), _others(RUNG9, (9, 9)))
    assert not decision.promote
    assert decision.front == 4


def test_five_trials_two_objectives_eta3_only_the_most_isolated_continue():
    # PSNR (max) / latency (min). n=5 -> floor(5/3) = 1 may continue.
    asha = MOASHA(10, 3, 90, ["maximize", "minimize"])
    rung = {
        "fast": (28.0, 5.0),  # front 1, boundary (lowest latency)
        "balanced": (30.0, 10.0),  # front 1, interior: crowding (32-28)/4 + (20-5)/15 = 2.0
        "accurate": (32.0, 20.0),  # front 1, boundary (highest PSNR)
        "dominated": (29.0, 12.0),  # dominated by balanced
        "worst": (27.0, 30.0),  # dominated by everyone
    }

    def decide(name):
        return asha.should_promote(rung[name], [v for k, v in rung.items() if k != name])

    assert decide("accurate").promote  # boundary, infinite crowding: nobody ranks ahead
    assert decide("fast").promote
    balanced = decide("balanced")
    assert not balanced.promote and balanced.rank == 3 and balanced.crowding == pytest.approx(2.0)
    assert not decide("dominated").promote and decide("dominated").front == 2
    assert not decide("worst").promote and decide("worst").front == 3


def test_fewer_than_eta_trials_continue():
    asha = MOASHA(10, 3, 90, MIN2)
    first = asha.should_promote((5, 5), [])
    assert first.promote and "too few to rank" in first.reason
    # even a trial dominated by the only other one continues while n < eta
    assert asha.should_promote((6, 6), [(1, 1)]).promote
    # n == eta: floor(3/3) = 1 continues; a dominated trial stops
    assert not asha.should_promote((6, 6), [(1, 1), (2, 0)]).promote


def test_non_finite_values():
    asha = MOASHA(10, 3, 90, MIN2)
    diverged = asha.should_promote((float("nan"), 5.0), [(1, 1), (2, 2), (3, 3)])
    assert not diverged.promote and "non-finite" in diverged.reason
    # a diverged other ranks behind every finite trial: (3,3) is 2nd of the finite ones, and with
    # 6 trials floor(6/3) = 2 continue
    others = [(1, 1), (float("nan"), 0.0), (4, 4), (5, 5), (6, 6)]
    assert asha.should_promote((3, 3), others).promote


def test_single_objective_is_plain_asha():
    asha = MOASHA(10, 2, 40, ["maximize"])
    # 4 trials, eta 2 -> top 2 continue
    assert asha.should_promote([30.0], [[29.0], [31.0], [28.0]]).promote  # 2nd best
    assert not asha.should_promote([28.5], [[29.0], [31.0], [28.0]]).promote  # 3rd
    # a tie at the cut-off favours the arriving trial (as Optuna's SuccessiveHalvingPruner)
    assert asha.should_promote([29.0], [[29.0], [31.0], [28.0]]).promote


def test_wrong_number_of_values():
    with pytest.raises(ValueError, match="must have 2 objectives"):
        MOASHA(10, 3, 90, MIN2).should_promote((1.0,), [])


# ---------------------------------------------------------------------------------------------
# rung values in the storage


def test_record_and_read_rung_values():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=MIN2)
    trials = [study.ask() for _ in range(3)]
    record_rung(trials[0], 0, (1.0, 2.0))
    record_rung(trials[1], 0, (3.0, 1.0))
    record_rung(trials[1], 1, (2.5, 1.0))
    assert trials[0].user_attrs[rung_attr(0)] == [1.0, 2.0]
    assert rung_values(study, 0) == [[1.0, 2.0], [3.0, 1.0]]
    assert rung_values(study, 0, exclude_trial=trials[0]) == [[3.0, 1.0]]
    assert rung_values(study, 0, exclude_trial=1) == [[1.0, 2.0]]
    assert rung_values(study, 1) == [[2.5, 1.0]]
    # finished (pruned) trials keep their rung values
    study.tell(trials[0], state=optuna.trial.TrialState.PRUNED)
    assert rung_values(study, 0, exclude_trial=trials[2]) == [[1.0, 2.0], [3.0, 1.0]]


def test_decide_sees_other_workers_through_sqlite(tmp_path):
    # two study handles on one SQLite file stand for two workers
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker_a = optuna.create_study(storage=url, study_name="s", directions=MIN2)
    worker_b = optuna.load_study(storage=url, study_name="s")
    asha = MOASHA(10, 3, 90, MIN2)

    decisions = []
    for i, values in enumerate([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (0.5, 0.5)]):
        study = worker_a if i % 2 == 0 else worker_b
        trial = study.ask()
        decisions.append(asha.decide(trial, 0, values))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    # trial 0 and 1: fewer than eta at the rung; trial 2 is dominated by both others (n=3 -> 1
    # continues); trial 3 dominates everyone (n=4 -> 1 continues)
    assert [d.promote for d in decisions] == [True, True, False, True]
    assert [d.n_at_rung for d in decisions] == [1, 2, 3, 4]
    # the decision text is stored with the trial, and a fresh handle (a resumed run) sees it all
    resumed = optuna.load_study(storage=url, study_name="s")
    stored = resumed.trials[2].user_attrs
    assert stored[rung_attr(0)] == [3.0, 3.0]
    assert "stop" in stored[decision_attr(0)]
    assert len(rung_values(resumed, 0)) == 4


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_about_one_in_eta_continues_on_random_arrivals(eta):
    # Asynchronous arrivals with independent values: a newcomer's rank is about uniform among the
    # n at the rung, so about 1/eta of the arrivals continue (a little more: the first eta-1
    # always continue and ties go to the newcomer).
    asha = MOASHA(10, eta, 1000, ["maximize", "minimize"])
    promoted = arrivals = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        seen: list[np.ndarray] = []
        for _ in range(90):
            values = rng.normal(size=2)
            promoted += asha.should_promote(values, seen).promote
            seen.append(values)
            arrivals += 1
    assert 0.75 / eta < promoted / arrivals < 1.4 / eta
