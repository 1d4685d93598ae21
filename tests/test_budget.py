"""Budget parsing, accounting in the Optuna storage, and sharing between workers."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from datetime import datetime, timedelta
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.budget import (
    Budget,
    BudgetError,
    BudgetLimit,
    check_budget_device,
    estimate_trial_seconds,
    parse_budget,
    record_charge,
    record_refused,
    record_start,
    trial_charge,
)
from ehrsr.study_schema import TRIAL

T0 = datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _finished(study, charged=None, kind="cuda", devices=1, state=TrialState.COMPLETE, seconds=None, **attrs):
    """Add a finished trial: with ``charged_seconds`` or, if None, with start/complete times."""
    user_attrs = {TRIAL.device_kind: kind, TRIAL.n_devices: devices, **attrs}
    if charged is not None:
        user_attrs[TRIAL.charged_seconds] = charged
    duration = seconds if seconds is not None else 1.0
    trial = optuna.trial.FrozenTrial(
        number=0,
        state=state,
        value=None,
        values=[1.0] if state == TrialState.COMPLETE else None,
        datetime_start=T0,
        datetime_complete=T0 + timedelta(seconds=duration),
        params={},
        distributions={},
        user_attrs=user_attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=0,
    )
    study.add_trial(trial)


# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "unit", "amount", "seconds"),
    [
        ("gpu-hours=48", "gpu-hours", 48.0, 48 * 3600.0),
        ("cpu-hours=2", "cpu-hours", 2.0, 7200.0),
        ("hours=1.5", "hours", 1.5, 5400.0),
        ("minutes=10", "minutes", 10.0, 600.0),
        ("trials=30", "trials", 30, None),
        ("  GPU-Hours = 0.25 ", "gpu-hours", 0.25, 900.0),
    ],
)
def test_parse_each_form(text, unit, amount, seconds):
    budget = parse_budget(text)
    assert budget.limits == (BudgetLimit(unit, amount),)
    assert budget.limits[0].seconds == seconds


def test_parse_combination_keeps_order_and_describes():
    budget = parse_budget("gpu-hours=48,trials=30")
    assert [limit.unit for limit in budget.limits] == ["gpu-hours", "trials"]
    assert budget.describe_short() == "gpu-hours=48,trials=30"
    assert budget.describe() == (
        "at most 48 GPU-hours (device time of CUDA trials) or 30 trials, whichever is exhausted first"
    )
    assert parse_budget("minutes=10").describe() == "at most 10 minutes of device time (all trials)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty budget"),
        ("gpu-hours", "budget item 'gpu-hours' has no '='"),
        ("weeks=2", "unknown budget unit 'weeks' in 'weeks=2'; valid units: gpu-hours, cpu-hours, hours, minutes, trials"),
        ("hours=abc", "budget amount 'abc' of hours is not a number"),
        ("hours=-1", "budget amount of hours must be > 0, got -1"),
        ("minutes=0", "budget amount of minutes must be > 0, got 0"),
        ("hours=inf", "must be a finite number"),
        ("trials=2.5", "trials must be a whole number, got 2.5"),
        ("trials=3,trials=4", "budget unit 'trials' is given twice"),
        ("hours=1,minutes=30", "hours and minutes both limit the total device time"),
        ("trials=3,,hours=1", "has an empty item"),
    ],
)
def test_parse_errors_name_the_problem_in_one_line(text, expected):
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI maps ValueError to exit status 2


def test_check_budget_device():
    with pytest.raises(BudgetError, match=r"gpu-hours=48 needs a CUDA GPU.*cpu-hours=\.\.\. or minutes=\.\.\."):
        check_budget_device(parse_budget("gpu-hours=48"), cuda_available=False)
    check_budget_device(parse_budget("gpu-hours=48"), cuda_available=True)
    check_budget_device(parse_budget("cpu-hours=2,trials=5"), cuda_available=False)
    # cpu-hours alone would never be spent by trials that run on CUDA
    with pytest.raises(BudgetError, match="only counts cpu trials but the trials run on cuda"):
        check_budget_device(parse_budget("cpu-hours=2"), cuda_available=True, device_kind="cuda")
    check_budget_device(parse_budget("cpu-hours=2,trials=4"), cuda_available=True, device_kind="cuda")


# ---------------------------------------------------------------------------------------------
# accounting


def test_spent_sums_charges_by_device_kind():
    study = optuna.create_study()
    _finished(study, charged=3600.0, kind="cuda")
    _finished(study, charged=1800.0, kind="cuda", state=TrialState.PRUNED)
    _finished(study, charged=600.0, kind="cpu", state=TrialState.FAIL)  # diverged: still spent
    _finished(study, charged=0.0, kind="cpu", state=TrialState.FAIL, **{TRIAL.refused: "too many params"})
    study.enqueue_trial({})  # WAITING: not started, costs nothing
    spent = parse_budget("gpu-hours=2").spent(study)
    assert spent.gpu_seconds == pytest.approx(5400.0)
    assert spent.cpu_seconds == pytest.approx(600.0)
    assert spent.total_seconds == pytest.approx(6000.0)
    assert (spent.trials, spent.running, spent.refused) == (3, 0, 1)
    assert spent.amount("gpu-hours") == pytest.approx(1.5)
    assert spent.amount("minutes") == pytest.approx(100.0)
    assert spent.amount("trials") == 3


def test_charge_falls_back_to_trial_times_times_devices():
    study = optuna.create_study()
    _finished(study, charged=None, kind="cuda", devices=2, seconds=30.0)  # e.g. worker killed
    charge = trial_charge(study.trials[0])
    assert charge.seconds == pytest.approx(60.0)
    assert charge.device_kind == "cuda" and charge.counted


def test_running_trials_are_charged_their_elapsed_time():
    study = optuna.create_study()
    trial = study.ask()
    record_start(trial, "cuda", n_devices=2)
    start = study.trials[0].datetime_start
    budget = parse_budget("gpu-hours=1,trials=5")
    spent = budget.spent(study, now=start + timedelta(seconds=100))
    assert spent.gpu_seconds == pytest.approx(200.0)  # 100 s x 2 GPUs
    assert (spent.trials, spent.running) == (1, 1)
    remaining = budget.remaining(study, now=start + timedelta(seconds=100))
    assert remaining["gpu-hours"] == pytest.approx(1 - 200 / 3600)
    assert remaining["trials"] == 4
    # once finished, the recorded charge replaces the elapsed time
    assert record_charge(trial, 90.0) == pytest.approx(180.0)
    study.tell(trial, 1.0)
    assert budget.spent(study).gpu_seconds == pytest.approx(180.0)


def test_exhausted_names_the_first_exhausted_limit():
    study = optuna.create_study()
    budget = parse_budget("minutes=10,trials=2")
    assert budget.exhausted(study) is None
    _finished(study, charged=200.0)
    assert budget.exhausted(study) is None
    _finished(study, charged=200.0)
    reason = budget.exhausted(study)
    assert reason is not None and reason.startswith("trials=2 reached: 2 trials")
    assert budget.used_fraction(budget.spent(study)) == pytest.approx(1.0)
    _finished(study, charged=300.0)
    assert budget.exhausted(study).startswith("minutes=10 reached")


def test_allows_new_trial_needs_room_for_the_estimate():
    study = optuna.create_study()
    budget = parse_budget("minutes=10")
    _finished(study, charged=500.0, kind="cpu")
    ok, reason = budget.allows_new_trial(study, 60.0)
    assert ok, reason
    ok, reason = budget.allows_new_trial(study, 120.0)
    assert not ok
    assert reason == "minutes=10: 100 device-seconds left, less than the 120 s a trial is estimated to cost"


def test_allows_new_trial_by_device_kind():
    study = optuna.create_study()
    _finished(study, charged=3500.0, kind="cuda")
    budget = parse_budget("gpu-hours=1,cpu-hours=1")
    assert budget.allows_new_trial(study, 200.0, device_kind="cpu")[0]  # not charged to gpu-hours
    ok, reason = budget.allows_new_trial(study, 200.0, device_kind="cuda")
    assert not ok and reason.startswith("gpu-hours=1: 100 device-seconds left")
    assert not budget.allows_new_trial(study, 200.0)[0]  # unknown kind: every limit must cover it
    _finished(study, charged=200.0, kind="cuda")
    ok, reason = budget.allows_new_trial(study, 1.0, device_kind="cpu")  # first exhausted stops all
    assert not ok and reason.startswith("gpu-hours=1 reached")


def test_running_trials_count_at_least_their_estimate():
    study = optuna.create_study()
    trial = study.ask()
    record_start(trial, "cpu")
    now = study.trials[0].datetime_start + timedelta(seconds=10)
    budget = parse_budget("minutes=5")  # 300 s
    # the running trial has used 10 s but will likely use the 120 s estimate: 180 s left >= 120
    assert budget.allows_new_trial(study, 120.0, now=now)[0]
    # with a 160 s estimate: 300 - 160 = 140 s left < 160
    ok, reason = budget.allows_new_trial(study, 160.0, now=now)
    assert not ok and "140 device-seconds left" in reason


def test_admission_by_trial_number_settles_races():
    study = optuna.create_study()
    budget = parse_budget("trials=2")
    _finished(study, charged=10.0)  # trial 0
    first, second = study.ask(), study.ask()  # two workers asked at the same time: trials 1, 2
    assert budget.allows_new_trial(study, 10.0, trial_number=first.number)[0]
    ok, reason = budget.allows_new_trial(study, 10.0, trial_number=second.number)
    assert not ok and reason.startswith("trials=2 reached: 2 trials")
    # the loser is marked refused and costs nothing, so the budget ends at exactly 2 trials
    record_refused(second, "budget: " + reason)
    study.tell(second, state=TrialState.FAIL)
    study.tell(first, 1.0)
    assert budget.spent(study).trials == 2


def test_estimate_trial_seconds():
    study = optuna.create_study()
    assert estimate_trial_seconds(study, prior_seconds=30.0) == 30.0
    _finished(study, charged=10.0, kind="cpu")
    _finished(study, charged=100.0, kind="cpu")
    _finished(study, charged=5.0, kind="cpu", state=TrialState.PRUNED)  # stopped early: cheap
    _finished(study, charged=20.0, kind="cpu")
    _finished(study, charged=999.0, kind="cpu", state=TrialState.FAIL)  # failures are not typical
    _finished(study, charged=0.0, kind="cpu", **{TRIAL.refused: "invalid"})
    _finished(study, charged=3000.0, kind="cuda")
    assert estimate_trial_seconds(study, 30.0, device_kind="cpu") == pytest.approx(15.0)  # [5,10,20,100]
    assert estimate_trial_seconds(study, 30.0) == pytest.approx(20.0)  # [5,10,20,100,3000]


def test_budget_survives_a_resume(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="resume")
    for seconds in (100.0, 250.0):
        trial = study.ask()
        record_start(trial, "cpu")
        record_charge(trial, seconds)
        study.tell(trial, 1.0)
    del study
    resumed = optuna.load_study(storage=url, study_name="resume")
    spent = parse_budget("cpu-hours=1").spent(resumed)
    assert spent.cpu_seconds == pytest.approx(350.0)
    assert spent.trials == 2


def test_budget_needs_a_limit():
    with pytest.raises(BudgetError, match="at least one limit"):
        Budget(())


# ---------------------------------------------------------------------------------------------
# two worker processes on one storage

CHARGE_SECONDS = 0.25  # every trial's charge: a fixed number, not a measured time


def _open_study(url: str) -> optuna.Study:
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return optuna.load_study(storage=JournalStorage(JournalFileBackend(url[len("journal:"):])), study_name="shared")
    return optuna.load_study(storage=url, study_name="shared")


def _budget_worker(url: str, me: str, barrier: Any, results: Any) -> None:
    """One worker's admission loop, in lockstep with the other through ``barrier``: both check the
    budget before either asks, and both ask before either checks its trial number, so every round
    is a race and the last one is lost by exactly one worker. A worker that stops breaks the
    barrier, and the other runs on alone."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(url)
    budget = parse_budget("trials=7")

    def together() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):  # the other worker has stopped
            barrier.wait(timeout=60)

    ran = refused = 0
    while True:
        allowed = budget.allows_new_trial(study, CHARGE_SECONDS, device_kind="cpu")[0]
        together()
        if not allowed:
            break
        trial = study.ask()
        together()
        ok, why = budget.allows_new_trial(study, CHARGE_SECONDS, device_kind="cpu", trial_number=trial.number)
        if not ok:
            record_refused(trial, "budget: " + why)
            study.tell(trial, state=TrialState.FAIL)
            refused += 1
            break
        record_start(trial, "cpu")
        record_charge(trial, CHARGE_SECONDS)  # the "training"
        study.tell(trial, 1.0)
        ran += 1
        together()
    barrier.abort()
    results.put((me, ran, refused))


@pytest.mark.parametrize("storage_kind", ["sqlite", "journal"])
def test_budget_shared_between_two_worker_processes(tmp_path, storage_kind):
    if storage_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
        optuna.create_study(storage=url, study_name="shared")
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        url = f"journal:{tmp_path / 'journal.log'}"
        optuna.create_study(storage=JournalStorage(JournalFileBackend(url[len("journal:"):])), study_name="shared")
    context = multiprocessing.get_context("spawn")  # fresh processes, as separate workers are
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_budget_worker, args=(url, me, barrier, results)) for me in ("a", "b")]
    for worker in workers:
        worker.start()
    outcome = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    # three rounds of two trials, then a race for the seventh: one worker wins it, the other's
    # trial is refused (told FAIL, costs nothing), so the budget ends at exactly 7 trials
    assert sorted((ran, refused) for _, ran, refused in outcome) == [(3, 1), (4, 0)]
    study = _open_study(url)
    spent = parse_budget("trials=7").spent(study)
    assert spent.trials == 7
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 7
    (loser,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert loser.number == 7 and loser.user_attrs[TRIAL.refused].startswith("budget: trials=7 reached")
    assert not trial_charge(loser).counted
    assert spent.total_seconds == pytest.approx(7 * CHARGE_SECONDS)
