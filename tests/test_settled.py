"""What each process keeps of a study's finished trials (``ehrsr.search.settled``) gives the same
answers as reading every trial again: the budget's sums, estimate and admission, a finished
repeat, a configuration profiled before and the dead workers' trials, after every step of a
history in which trials finish out of order, fail, are refused or repeat, with two study handles
on one storage (two workers)."""

from __future__ import annotations

import random
import statistics
import time
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ehrsr.search import budget as budget_module
from ehrsr.search.budget import (
    Budget,
    TrialCharge,
    estimate_trial_seconds,
    parse_budget,
    record_charge,
    record_start,
    trial_charge,
)
from ehrsr.search.record import STALE_SECONDS, fail_stale_trials
from ehrsr.search.revisits import find_finished_repeat
from ehrsr.search.settled import FinishedIndex, FinishedScan
from ehrsr.search.storage import open_storage
from ehrsr.search.trial import cached_cost
from ehrsr.study_schema import COST_KEYS, TRIAL

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIGS = [{"width": w, "wab": {"enabled": e}} for w in (8, 16) for e in (False, True)]
TRAIN = {"lr": 0.001, "steps": 108}


# ---------------------------------------------------------------------------------------------
# references: every trial read again, as before the caches


def _spent_reference(study: optuna.Study, now: datetime) -> Any:
    return budget_module._sum([trial_charge(t, now) for t in study.get_trials(deepcopy=False)])


def _allows_reference(budget: Budget, study: optuna.Study, estimate: float, number: int | None,
                      now: datetime) -> tuple[bool, str]:
    """``Budget.allows_new_trial`` as it was, reading every trial (device_kind None)."""
    charges = []
    for frozen in study.get_trials(deepcopy=False):
        if number is not None and frozen.number >= number:
            continue
        charge = trial_charge(frozen, now)
        if charge.running and charge.counted:
            charge = TrialCharge(max(charge.seconds, estimate), charge.device_kind, True, True, False)
        charges.append(charge)
    spent = budget_module._sum(charges)
    reason = budget._exhausted(spent)
    if reason is not None:
        return False, reason
    for limit in budget.limits:
        if limit.unit == "trials":
            continue
        left = limit.seconds - spent.amount(limit.unit) * budget_module._SECONDS_PER_UNIT[limit.unit]
        if left < estimate:
            return False, (f"{limit.describe()}: {left:.0f} device-seconds left, less than the "
                           f"{estimate:.0f} s a trial is estimated to cost")
    return True, f"within budget {budget.describe_short()} ({spent.describe()})"


def _estimate_reference(study: optuna.Study, prior: float, kind: str | None) -> float:
    charges = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        charge = trial_charge(frozen)
        if charge.refused or charge.seconds <= 0 or (kind is not None and charge.device_kind not in (kind, None)):
            continue
        charges.append(charge.seconds)
    return float(statistics.median(charges)) if charges else float(prior)


def _repeat_reference(study: optuna.Study, config: dict, train: dict, exclude: int) -> FrozenTrial | None:
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if frozen.number == exclude or TRIAL.repeat_of in frozen.user_attrs:
            continue
        if frozen.user_attrs.get("config") == config and frozen.user_attrs.get("train") == train:
            return frozen
    return None


def _cost_reference(study: optuna.Study, config: dict, device: str, exclude: int) -> Any:
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if frozen.number == exclude or frozen.user_attrs.get("device_name") != device:
            continue
        metrics = frozen.user_attrs.get("metrics") or {}
        if frozen.user_attrs.get("config") == config and all(metrics.get(k) is not None for k in COST_KEYS[:-1]):
            return frozen.number, {k: metrics[k] for k in COST_KEYS if k in metrics}
    return None


# ---------------------------------------------------------------------------------------------


def _start(study: optuna.Study, rng: random.Random) -> optuna.Trial:
    trial = study.ask()
    record_start(trial, rng.choice(["cpu", "cuda"]), rng.choice([1, 1, 2]))
    trial.set_user_attr("config", rng.choice(CONFIGS))
    trial.set_user_attr("train", TRAIN)
    trial.set_user_attr("device_name", rng.choice(["gpu-a", "gpu-b"]))
    trial.set_user_attr("heartbeat", time.time() - (STALE_SECONDS + 5 if rng.random() < 0.1 else 0))
    return trial


def _finish(study: optuna.Study, trial: optuna.Trial, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.1:
        trial.set_user_attr(TRIAL.refused, "over the MACs limit")
        study.tell(trial, state=TrialState.FAIL)
        return
    if roll < 0.2:
        trial.set_user_attr(TRIAL.repeat_of, 0)
    record_charge(trial, rng.choice([0.0, 0.1, 0.2, 0.7, 3.0, 11.5]))
    metrics = {k: 1.0 for k in COST_KEYS} if rng.random() < 0.8 else {"psnr": 28.0}
    trial.set_user_attr("metrics", metrics)
    if roll < 0.5:
        study.tell(trial, state=TrialState.PRUNED)
    elif roll < 0.6:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, [rng.random(), rng.random()])


def test_cached_answers_equal_a_full_read_after_every_step(tmp_path) -> None:
    url = f"journal:{tmp_path / 'study.journal'}"
    first = optuna.create_study(storage=open_storage(url), study_name="s", directions=["maximize", "minimize"])
    second = optuna.load_study(storage=open_storage(url), study_name="s")  # another worker's handle
    budget = parse_budget("minutes=1,trials=40")  # exhausted on the way: both answers are exercised
    rng = random.Random(1)
    running: list[tuple[optuna.Study, optuna.Trial]] = []
    answers: set[bool] = set()
    for step in range(160):
        study = first if step % 3 else second
        if running and (len(running) > 6 or rng.random() < 0.5):
            owner, trial = running.pop(rng.randrange(len(running)))  # trials finish out of order
            _finish(owner, trial, rng)
        else:
            running.append((study, _start(study, rng)))
        now = datetime.now()
        for handle in (first, second):
            assert budget.spent(handle, now) == _spent_reference(handle, now)
            for kind in (None, "cpu", "cuda"):
                assert estimate_trial_seconds(handle, 20.0, kind) == _estimate_reference(handle, 20.0, kind)
            number = running[-1][1].number if running else None
            for asked in {None, number}:
                answer = budget.allows_new_trial(handle, 5.0, trial_number=asked, now=now)
                assert answer == _allows_reference(budget, handle, 5.0, asked, now)
                answers.add(answer[0])
            exclude = running[-1][1].number if running else -1
            for config in CONFIGS:
                got = find_finished_repeat(handle, config, TRAIN, exclude=exclude)
                want = _repeat_reference(handle, config, TRAIN, exclude)
                assert (got and got.number) == (want and want.number)
                for device in ("gpu-a", "gpu-b"):
                    assert cached_cost(handle, config, device, exclude=exclude) == _cost_reference(
                        handle, config, device, exclude)
    assert len(first.get_trials(states=(TrialState.COMPLETE,))) > 20
    assert answers == {True, False}


def test_admission_counts_only_trials_below_the_asking_one() -> None:
    # a worker's trial N is admitted on the trials numbered below it, finished or not
    study = optuna.create_study()
    budget = parse_budget("trials=3")
    rng = random.Random(0)
    trials = [study.ask() for _ in range(5)]
    for trial in trials[:2]:
        record_start(trial, "cpu")
    record_charge(trials[3], 1.0)
    study.tell(trials[3], 1.0)  # finished, but numbered above the asking trial 2
    assert budget.allows_new_trial(study, 1.0, trial_number=2)[0]
    assert not budget.allows_new_trial(study, 1.0, trial_number=4)[0]  # 0, 1, 2 (running) and 3
    del rng


def test_stale_running_trials_are_failed_once_whatever_finished_around_them() -> None:
    study = optuna.create_study()
    trials = [study.ask() for _ in range(6)]
    for i, trial in enumerate(trials):
        record_start(trial, "cpu")
        trial.set_user_attr("heartbeat", time.time() - (STALE_SECONDS + 10 if i in (1, 4) else 0))
    study.tell(trials[0], 1.0)
    study.tell(trials[3], 2.0)
    assert fail_stale_trials(study) == [1, 4]
    assert fail_stale_trials(study) == []  # failed trials are finished: never looked at again
    assert [t.state for t in study.get_trials()][:5] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING,
                                                          TrialState.COMPLETE, TrialState.FAIL]


def test_scan_hands_out_each_finished_trial_once_and_starts_over_for_a_new_study() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    scan = FinishedScan()
    trials = [study.ask() for _ in range(4)]
    study.tell(trials[1], 1.0)
    new, reset = scan.update(study.get_trials(deepcopy=False))
    assert [t.number for t in new] == [1] and not reset and scan.settled == 0  # trial 0 still runs
    study.tell(trials[0], 0.5)
    study.tell(trials[3], 3.0)
    new, _ = scan.update(study.get_trials(deepcopy=False))
    assert [t.number for t in new] == [0, 3] and scan.settled == 2
    assert [t.number for t in scan.unfinished(study.get_trials(deepcopy=False))] == [2]
    assert scan.update(study.get_trials(deepcopy=False))[0] == []
    optuna.delete_study(study_name="s", storage=storage)
    again = optuna.create_study(storage=storage, study_name="s")
    again.tell(again.ask(), 9.0)
    new, reset = scan.update(again.get_trials(deepcopy=False))
    assert reset and [t.value for t in new] == [9.0]


def test_index_keeps_the_earliest_trial_of_a_key() -> None:
    study = optuna.create_study()
    trials = [study.ask() for _ in range(3)]
    index = FinishedIndex(lambda t: t.user_attrs.get("key"))
    for trial in trials:
        trial.set_user_attr("key", "same")
    study.tell(trials[2], 1.0)
    assert index.lookup(study, "same").number == 2
    study.tell(trials[0], 1.0)  # an earlier trial finishing later takes its place
    assert index.lookup(study, "same").number == 0
    assert index.lookup(study, "other") is None
