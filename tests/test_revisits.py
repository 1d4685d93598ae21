"""Revisits: a resumed study continues its random stream, repeats are recorded, not trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import ehrsr.search.driver as driver
from ehrsr.cli import main
from ehrsr.search.record import record_outcome
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
            record_outcome(study, trial, record_repeat(trial, earlier), wall_seconds=0.0)
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


def test_workers_that_join_a_study_draw_their_own_stream() -> None:
    # machines started together, each worker 0 with the same --seed, all see an empty study:
    # without their host and process in the hash they would all draw the creator's stream
    study = optuna.create_study()
    assert sampler_seed(3, study, 0) == 3
    joined = sampler_seed(3, study, 0, joined=True)
    assert joined != 3 and 0 <= joined < 2**32
    assert joined == sampler_seed(3, study, 0, joined=True)  # one process: stable
    script = ("import optuna; from ehrsr.search.revisits import sampler_seed; "
              "print(sampler_seed(3, optuna.create_study(), 0, joined=True))")
    import subprocess
    import sys
    other = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert other not in (3, joined)  # another process (pid) draws another stream


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


# ---------------------------------------------------------------------------------------------
# the driver's trial loop (micro space, built-in images, a few training steps)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data cache for the module's searches (preparing the images is the slow part)."""
    return tmp_path_factory.mktemp("cache")


MICRO = str(Path(__file__).resolve().parent / "fixtures" / "micro.yaml")


class _SameProposal(optuna.samplers.BaseSampler):
    """A sampler stand-in that proposes the same configuration every time (the last choice, the
    upper bound), so every proposal after the first repeats a finished trial."""

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            return distribution.choices[-1]
        return distribution.high


def _micro_args(out: Path, cache: Path, name: str, budget: str, *extra: str) -> list[str]:
    return ["--space", MICRO, "--budget", budget, "--out-dir", str(out), "--cache-dir", str(cache),
            "--profile-size", "32", "--study-name", name, "--no-report", "--quiet", "--seed", "3",
            "--profile-seconds", "0.000001", "--ablation-share", "0", *extra]


def _spy_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    trained: list[int] = []
    real = driver.execute_trial

    def spy(job, **kwargs):
        trained.append(job.trial_number)
        return real(job, **kwargs)

    monkeypatch.setattr(driver, "execute_trial", spy)
    return trained


def _load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


@pytest.mark.slow
def test_driver_records_a_repeat_without_training_it(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "build_sampler", lambda *_: _SameProposal())
    trained = _spy_training(monkeypatch)
    out = tmp_path / "r"
    assert main(_micro_args(out, cache, "rep", "trials=4")) == 0
    study = _load(out, "rep")
    finished = [t for t in study.trials if t.state != TrialState.WAITING]
    repeats = [t for t in finished if "repeat_of" in t.user_attrs]
    originals = [t for t in finished if "repeat_of" not in t.user_attrs]
    # only the originals trained; the repeats did not reach training at all
    assert trained == [t.number for t in originals]
    # repeats do not take trials=4 slots: the run stops on convergence after 20 repeats in a row
    assert len(repeats) == RepeatPolicy().max_consecutive
    assert len(originals) <= 4
    by_number = {t.number: t for t in finished}
    for t in repeats:
        earlier = by_number[t.user_attrs["repeat_of"]]
        assert "repeat_of" not in earlier.user_attrs and earlier.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert t.user_attrs["config"] == earlier.user_attrs["config"]
        assert t.user_attrs["train"] == earlier.user_attrs["train"]
        assert t.state == earlier.state and t.values == earlier.values
        assert t.user_attrs["metrics"] == earlier.user_attrs["metrics"]
        assert t.user_attrs["charged_seconds"] == 0.0 and t.user_attrs["steps_done"] == 0
        assert "not trained again" in t.user_attrs["reason"]
        assert not any(k.startswith("rung_") for k in t.user_attrs)
    from ehrsr.search.budget import parse_budget

    spent = parse_budget("trials=4").spent(study)
    assert spent.trials == len(originals) and spent.repeats == len(repeats)


@pytest.mark.slow
def test_driver_allow_repeats_trains_every_proposal(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "build_sampler", lambda *_: _SameProposal())
    trained = _spy_training(monkeypatch)
    out = tmp_path / "r"
    assert main(_micro_args(out, cache, "rep", "trials=4", "--allow-repeats")) == 0
    study = _load(out, "rep")
    finished = [t for t in study.trials if t.state != TrialState.WAITING]
    assert trained == [t.number for t in finished] and len(finished) == 4
    assert not any("repeat_of" in t.user_attrs for t in finished)
    # the stand-in proposed one configuration at least twice, and each was trained
    keys = [repr((t.user_attrs["config"], t.user_attrs["train"])) for t in finished]
    assert len(set(keys)) < len(keys)
    # a configuration profiled before on this device takes its cost from the earliest such trial
    # (looked up when the trial starts, written with its start): nothing is timed again
    first: dict[str, optuna.trial.FrozenTrial] = {}
    reused = 0
    for t in finished:
        config = repr(t.user_attrs["config"])
        earlier = first.setdefault(config, t)
        if earlier is t:
            assert "cost_from_trial" not in t.user_attrs
            continue
        reused += 1
        assert t.user_attrs["cost_from_trial"] == earlier.number
        for key in ("macs", "params", "latency_ms"):
            assert t.user_attrs["metrics"][key] == earlier.user_attrs["metrics"][key]
    assert reused >= 1


@pytest.mark.slow
def test_resumed_micro_search_proposes_no_finished_configuration(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds: list[int] = []
    real = driver.build_sampler
    monkeypatch.setattr(driver, "build_sampler", lambda name, seed: (seeds.append(seed), real(name, seed))[1])
    out = tmp_path / "r"
    assert main(_micro_args(out, cache, "res", "trials=3", "--sampler", "random")) == 0
    first = {t.number for t in _load(out, "res").trials if t.state != TrialState.WAITING}
    assert main(_micro_args(out, cache, "res", "trials=6", "--sampler", "random")) == 0
    study = _load(out, "res")
    assert seeds[0] == 3 and seeds[1] != 3  # the resume draws a new stream
    keys = {}
    for t in study.trials:
        if t.state == TrialState.WAITING:
            continue
        key = repr((t.user_attrs["config"], t.user_attrs["train"]))
        if t.number not in first:
            assert key not in keys, f"trial #{t.number} replays #{keys.get(key)}"
        keys.setdefault(key, t.number)
    assert len(keys) == 6
