"""The search's TPE reads a bounded history beyond ``max_trials`` finished trials
(``ehrsr.search.sampler_history``): below the limit it is TPE itself, proposal for proposal;
beyond it the wrapped sampler sees exactly the most recent trials plus the leading fronts of the
whole study's feasible complete trials, and TPE works on that view."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from ehrsr.search.pareto import non_dominated_sort
from ehrsr.search.sampler_history import TPE_HISTORY_LIMIT, BoundedHistorySampler
from ehrsr.search.study import build_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

DIRECTIONS = ["maximize", "minimize"]
DISTRIBUTIONS = {"x": FloatDistribution(0.0, 1.0), "kind": CategoricalDistribution(["a", "b"]),
                 "z": FloatDistribution(-1.0, 1.0)}


def _history(n: int, seed: int = 0) -> list[FrozenTrial]:
    """Finished trials of a conditional space (``z`` only with kind b): complete ones (a sixth of
    them infeasible, with values better than every feasible one), pruned ones (no values) and
    failed ones."""
    rng = np.random.default_rng(seed)
    trials = []
    for i in range(n):
        kind = "a" if i % 2 else "b"
        params: dict[str, Any] = {"x": float(rng.random()), "kind": kind}
        if kind == "b":
            params["z"] = float(rng.uniform(-1, 1))
        distributions = {k: DISTRIBUTIONS[k] for k in params}
        state = (TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                 TrialState.COMPLETE)[i % 5]
        values = [float(rng.integers(0, 20)) / 2, float(rng.integers(0, 20)) / 2] if state == TrialState.COMPLETE else None
        constraints = {"latency": 1.0 if i % 6 == 0 else -1.0} if state == TrialState.COMPLETE else None
        if constraints and constraints["latency"] > 0:
            values = [20.0, -1.0]  # infeasible trials would dominate every feasible one
        trials.append(create_trial(state=state, values=values, params=params, distributions=distributions,
                                   constraints=constraints))
    return trials


def _study(trials: list[FrozenTrial], sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    study.add_trials(trials)
    return study


def _suggest(trial: optuna.Trial) -> dict[str, Any]:
    out: dict[str, Any] = {"x": trial.suggest_float("x", 0.0, 1.0), "kind": trial.suggest_categorical("kind", ["a", "b"])}
    if out["kind"] == "b":
        out["z"] = trial.suggest_float("z", -1.0, 1.0)
    return out


def _tpe(seed: int) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


class _Spy(optuna.samplers.RandomSampler):
    """Records the finished trials (and their states) each call of the sampler could read."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[list[int]] = []

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        self.seen.append([t.number for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                         TrialState.PRUNED))])
        assert [t.number for t in study.get_trials(deepcopy=False)] == sorted(
            {*self.seen[-1], *(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,
                                                                                            TrialState.FAIL)))})
        return {}


def test_below_the_limit_the_proposals_are_tpes_own() -> None:
    history = _history(60)
    plain = _study(history, _tpe(seed=3))
    bounded = _study(history, BoundedHistorySampler(_tpe(seed=3), max_trials=100))
    for _ in range(6):
        a, b = plain.ask(), bounded.ask()
        assert _suggest(a) == _suggest(b)
        values = [1.0, 2.0]
        plain.tell(a, values)
        bounded.tell(b, values)


def test_beyond_the_limit_the_sampler_sees_recent_trials_and_the_leading_fronts() -> None:
    history = _history(300)
    spy = _Spy()
    sampler = BoundedHistorySampler(spy, max_trials=40)
    study = _study(history, sampler)
    running = study.ask()  # a running trial is still visible in its own state
    _suggest(running)
    finished = [t for t in history if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    feasible = [(i, t) for i, t in enumerate(history) if t.state == TrialState.COMPLETE and t.constraints["latency"] <= 0]
    fronts = non_dominated_sort([t.values for _, t in feasible], DIRECTIONS)
    leading: list[int] = []
    for front in fronts:  # whole fronts until at least ceil(0.1 * 40) = 4 trials
        if len(leading) >= math.ceil(0.1 * 40):
            break
        leading += [feasible[i][0] for i in front]
    recent = [history.index(t) for t in finished[-40:]]
    assert spy.seen[-1] == sorted({*recent, *leading})
    assert 40 < len(spy.seen[-1]) < 60
    assert sampler.visible_trials(study) == [t for t in study.get_trials(deepcopy=False) if t.number in spy.seen[-1]]
    # a better trial finishing later joins the fronts, and the window moves on
    study.tell(running, [100.0, -100.0])
    _suggest(study.ask())
    assert 300 in spy.seen[-1]
    assert min(spy.seen[-1]) == min(leading)  # the study's best old trials are not forgotten


def test_tpe_proposes_through_the_bounded_view() -> None:
    study = _study(_history(400), BoundedHistorySampler(_tpe(seed=0), max_trials=50))
    proposals = []
    for _ in range(5):
        trial = study.ask()
        proposals.append(_suggest(trial))
        study.tell(trial, [5.0, 5.0])
    assert all(0.0 <= p["x"] <= 1.0 and p["kind"] in ("a", "b") for p in proposals)
    assert len({p["x"] for p in proposals}) == 5


def test_the_search_builds_tpe_with_the_limit() -> None:
    sampler = build_sampler("tpe", 0)
    assert isinstance(sampler, BoundedHistorySampler)
    assert isinstance(sampler.sampler, optuna.samplers.TPESampler)
    assert sampler.max_trials == TPE_HISTORY_LIMIT
    with pytest.raises(ValueError, match="max_trials must be >= 10"):
        BoundedHistorySampler(_tpe(0), max_trials=5)
