"""Revisits (issue 15): a resumed study continues its random stream, repeats are recorded, not trained."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.revisits import RepeatPolicy, find_finished_repeat, record_repeat, sampler_seed

optuna.logging.set_verbosity(optuna.logging.WARNING)

CHOICES = {f"p{i}": list(range(8)) for i in range(4)}  # 4096 configurations
TRAIN = {"steps": 36, "batch_size": 4, "patch_size": 32, "loss": "l1", "lr": 1e-3}


def _suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {name: trial.suggest_categorical(name, values) for name, values in CHOICES.items()}


def _make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)
    return optuna.samplers.RandomSampler(seed=seed)


def _run(study: optuna.Study, n_trials: int, policy: RepeatPolicy, trained: list[dict[str, Any]],
         train: dict[str, Any] = TRAIN) -> list[optuna.trial.FrozenTrial]:
    """The driver's loop in miniature: ask, suggest, check for a repeat, then record it or 'train'."""
    for _ in range(n_trials):
        trial = study.ask()
        config = _suggest(trial)
        trial.set_user_attr("config", config)
        trial.set_user_attr("train", train)
        earlier = policy.check(study, trial.number, config, train)
        if earlier is not None:
            outcome = record_repeat(trial, earlier)
            if outcome["status"] == "complete":
                study.tell(trial, outcome["values"])
            else:
                study.tell(trial, state=TrialState.PRUNED)
            continue
        trained.append(config)
        trial.set_user_attr("metrics", {"psnr": float(sum(config.values()))})
        study.tell(trial, float(sum(config.values())))
    return study.trials


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_resumed_study_proposes_no_finished_configuration(kind: str) -> None:
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=_make_sampler(kind, 7))
    assert sampler_seed(7, first) == 7  # a fresh study keeps the user's seed
    _run(first, 6, RepeatPolicy(), [])
    finished = [t.params for t in first.trials]

    # the old behaviour, for contrast: the same seed again replays the same first proposals
    replay = optuna.create_study(sampler=_make_sampler(kind, 7))
    _run(replay, 2, RepeatPolicy(allow_repeats=True), [])
    assert [t.params for t in replay.trials] == finished[:2]

    resumed = optuna.load_study(study_name="s", storage=storage)
    seed = sampler_seed(7, resumed)
    assert seed != 7
    resumed.sampler = _make_sampler(kind, seed)
    trained: list[dict[str, Any]] = []
    _run(resumed, 6, RepeatPolicy(), trained)
    new = [t.params for t in resumed.trials[6:]]
    assert len(new) == 6 and not any(p in finished for p in new)
    assert trained == new  # nothing was a repeat, everything trained


def test_each_worker_and_each_resume_gets_its_own_seed() -> None:
    study = optuna.create_study()
    study.enqueue_trial({"p0": 1})  # enqueued references are there before the first start too
    seeds = {sampler_seed(3, study, worker) for worker in range(4)}
    assert len(seeds) == 4 and 3 in seeds
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.0))
    assert sampler_seed(3, study, 0) != 3
    assert sampler_seed(3, study, 0) == sampler_seed(3, study, 0)  # deterministic
    assert all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="worker_index"):
        sampler_seed(3, study, -1)


class _FixedSampler(optuna.samplers.BaseSampler):
    """A sampler stand-in that always proposes the first choice of every parameter."""

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return param_distribution.to_internal_repr(param_distribution.choices[0])


def test_repeat_is_recorded_not_trained() -> None:
    study = optuna.create_study(sampler=_FixedSampler())
    trained: list[dict[str, Any]] = []
    trials = _run(study, 2, RepeatPolicy(), trained)
    assert len(trained) == 1
    assert trials[1].user_attrs["repeat_of"] == 0
    assert trials[1].state == TrialState.COMPLETE and trials[1].values == trials[0].values
    assert trials[1].user_attrs["metrics"] == trials[0].user_attrs["metrics"]
    # a third proposal points at the trial that trained, not at the recorded repeat
    assert find_finished_repeat(study, trials[0].user_attrs["config"], TRAIN, exclude=2).number == 0


def test_allow_repeats_trains_every_proposal() -> None:
    study = optuna.create_study(sampler=_FixedSampler())
    trained: list[dict[str, Any]] = []
    trials = _run(study, 2, RepeatPolicy(allow_repeats=True), trained)
    assert len(trained) == 2
    assert all("repeat_of" not in t.user_attrs for t in trials)


def test_other_fidelity_or_unfinished_trial_is_not_a_repeat() -> None:
    study = optuna.create_study(sampler=_FixedSampler())
    trained: list[dict[str, Any]] = []
    _run(study, 1, RepeatPolicy(), trained)
    _run(study, 1, RepeatPolicy(), trained, train={**TRAIN, "steps": 72})  # another fidelity trains
    assert len(trained) == 2
    failed = study.ask()
    config = _suggest(failed)
    study.tell(failed, state=TrialState.FAIL)
    assert find_finished_repeat(study, config, {**TRAIN, "steps": 144}) is None


def test_repeat_of_a_pruned_trial_is_pruned_without_rungs() -> None:
    study = optuna.create_study(sampler=_FixedSampler())
    first = study.ask()
    config = _suggest(first)
    first.set_user_attr("config", config)
    first.set_user_attr("train", TRAIN)
    first.set_user_attr("rung_0", {"step": 36, "values": [20.0]})
    study.tell(first, state=TrialState.PRUNED)
    trials = _run(study, 1, RepeatPolicy(), [])
    assert trials[1].state == TrialState.PRUNED and trials[1].user_attrs["repeat_of"] == 0
    assert "rung_0" not in trials[1].user_attrs  # MO-ASHA must not count one run twice


def test_policy_stops_after_consecutive_repeats() -> None:
    policy = RepeatPolicy(max_consecutive=3)
    assert policy.converged(2) is None
    assert "converged" in policy.converged(3)
    with pytest.raises(ValueError, match="max_consecutive"):
        RepeatPolicy(max_consecutive=0)
