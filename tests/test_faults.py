"""Every fault survived (docs/scaling_out.md, "What survives which fault"): a fault injected with
``EHRSR_FAULT`` ends only its own trial, with its reason recorded, and the search goes on to its budget."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr import faults
from ehrsr.search.driver import run_search
from ehrsr.search.study import SearchSettings

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")


def test_fault_spec_parsing() -> None:
    assert faults.parse_fault("nan@step:5") == faults.Fault("nan", step=5)
    assert faults.parse_fault("oom@step:3@trial:1") == faults.Fault("oom", step=3, trial=1)
    assert faults.parse_fault("profile-error") == faults.Fault("profile-error")
    for bad in ("nope", "nan@step:x", "nan@when:3"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse_fault(bad)


def test_unset_fault_hits_nothing(monkeypatch) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert not faults.hits("nan", 1)
    faults.inject("oom", 1)  # no error


def _search(tmp_path: Path, name: str, isolate: bool = False) -> tuple[optuna.Study, object]:
    settings = SearchSettings(space=MICRO, budget="trials=3", study_name=name, out_dir=tmp_path / "r",
                              cache_dir=str(tmp_path / "c"), profile_size=(32, 32), write_reports=False,
                              verbosity=0, early_stopping=False, threads=1, isolate=isolate)
    summary = run_search(settings)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")
    return study, summary


@pytest.mark.parametrize(("spec", "status", "reason"), [
    ("nan@step:3@trial:1", "diverged", "step 3"),
    ("oom@step:2@trial:1", "oom", "out of memory"),
    ("profile-error@trial:1", "error", "injected fault profile-error"),
    ("trial-exception@trial:1", "error", "injected fault trial-exception"),
])
def test_a_fault_ends_only_its_trial_and_the_search_reaches_its_budget(
        spec: str, status: str, reason: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV_VAR, spec)
    study, summary = _search(tmp_path, "fault")
    trials = study.trials
    assert len(trials) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    hit = trials[1]
    assert hit.state == TrialState.FAIL and hit.user_attrs["status"] == status
    assert reason in hit.user_attrs["reason"]
    assert [t.state for t in (trials[0], trials[2])] == [TrialState.COMPLETE] * 2
    assert summary.n_complete == 2 and summary.n_failed == 1 and "trials=3" in summary.stopped_reason


def test_a_fault_in_an_isolated_trial_process_ends_only_that_trial(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "nan@step:2")  # every trial diverges, in its child process
    study, summary = _search(tmp_path, "iso", isolate=True)
    assert [t.user_attrs["status"] for t in study.trials] == ["diverged"] * 3
    assert summary.n_failed == 3
