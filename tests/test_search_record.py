"""The one trial-recording path (ehrsr.search.record): what it writes, charges and tells Optuna."""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.budget import record_start, trial_charge
from ehrsr.search.record import STALE_SECONDS, TrialOutcome, fail_stale_trials, record_outcome

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(name: str = "s") -> optuna.Study:
    return optuna.create_study(study_name=name, directions=["maximize", "minimize"])


def test_a_complete_outcome_is_written_charged_and_told(tmp_path: Path) -> None:
    study = _study()
    trial = study.ask()
    record_start(trial, "cpu", 2)
    outcome = TrialOutcome(status="complete", values=[30.5, 12.0], metrics={"psnr": 30.5, "latency_ms": 12.0},
                           seconds={"total": 3.0}, steps_done=40, constraints={"latency_ms": -8.0},
                           weights=str(tmp_path / "weights" / "t.safetensors"))
    stored = record_outcome(study, trial, outcome, wall_seconds=5.0, weights_root=tmp_path)
    frozen = study.trials[0]
    assert stored.status == "complete" and frozen.state == TrialState.COMPLETE
    assert frozen.values == [30.5, 12.0]
    assert frozen.user_attrs["metrics"] == {"psnr": 30.5, "latency_ms": 12.0}
    assert frozen.user_attrs["steps_done"] == 40 and frozen.user_attrs["seconds"] == {"total": 3.0}
    assert frozen.user_attrs["weights"] == "weights/t.safetensors"
    assert frozen.constraints == {"latency_ms": -8.0}
    assert trial_charge(frozen).seconds == pytest.approx(10.0)  # 5 s x 2 devices


@pytest.mark.parametrize(("status", "state"), [("pruned", TrialState.PRUNED), ("stopped", TrialState.PRUNED),
                                               ("diverged", TrialState.FAIL), ("oom", TrialState.FAIL)])
def test_other_outcomes_map_to_their_states(status: str, state: TrialState) -> None:
    study = _study()
    trial = study.ask()
    record_outcome(study, trial, TrialOutcome(status=status, reason="why", metrics={}, seconds={}, steps_done=7),
                   wall_seconds=1.0)
    frozen = study.trials[0]
    assert frozen.state == state
    assert frozen.user_attrs["status"] == ("pruned" if status == "stopped" else status)
    assert frozen.user_attrs["reason"] == "why" and frozen.user_attrs["steps_done"] == 7


def test_a_refused_outcome_costs_nothing_and_records_no_metrics() -> None:
    study = _study()
    trial = study.ask()
    record_start(trial, "cpu")
    record_outcome(study, trial, TrialOutcome.failed("refused", "params 3M > --max-params 1M"), wall_seconds=9.0)
    frozen = study.trials[0]
    charge = trial_charge(frozen)
    assert frozen.state == TrialState.FAIL and charge.refused and charge.seconds == 0.0
    assert "metrics" not in frozen.user_attrs and "steps_done" not in frozen.user_attrs


@pytest.mark.parametrize("values", [[30.0], [30.0, math.nan]])
def test_complete_with_values_that_do_not_fit_the_objectives_is_an_error(values: list[float]) -> None:
    study = _study()
    trial = study.ask()
    stored = record_outcome(study, trial, TrialOutcome(status="complete", values=values, metrics={}),
                            wall_seconds=1.0)
    frozen = study.trials[0]
    assert stored.status == "error" and frozen.state == TrialState.FAIL
    assert "objective values for 2 objectives" in frozen.user_attrs["reason"]


def test_search_trials_and_ablation_runs_go_stale_by_one_rule() -> None:
    search, ablation = _study("s"), _study("s-ablation")
    numbers = []
    for study in (search, ablation):
        trial = study.ask()
        record_start(trial, "cpu", 1)
        start = study.trials[0].datetime_start.timestamp()
        study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", start + 42.0)
        numbers.append(trial.number)
    now = time.time() + STALE_SECONDS + 60
    for study, number in zip((search, ablation), numbers):
        assert fail_stale_trials(study, now=now) == [number]
        frozen = study.trials[number]
        assert frozen.state == TrialState.FAIL and frozen.user_attrs["status"] == "crashed"
        assert trial_charge(frozen).seconds == pytest.approx(42.0)  # start to last heartbeat
