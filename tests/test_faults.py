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


def _dead_worker() -> dict:
    """The ``worker`` attribute of a process on this host that has ended."""
    import subprocess

    from ehrsr.search.liveness import _host_key

    proc = subprocess.Popen(["true"])
    proc.wait()
    return {"host": _host_key(), "pid": proc.pid, "started": 0.0}


def test_a_running_orphan_is_charged_only_up_to_its_last_heartbeat() -> None:
    from datetime import timedelta

    from ehrsr.search.budget import parse_budget, record_start
    from ehrsr.search.record import fail_stale_trials

    study = optuna.create_study()
    trial = study.ask()
    record_start(trial, "cpu", 1)
    start = study.trials[0].datetime_start
    trial.set_user_attr("heartbeat", start.timestamp() + 10.0)
    trial.set_user_attr("worker", _dead_worker())
    budget = parse_budget("minutes=10,trials=5")
    spent = budget.spent(study, now=start + timedelta(seconds=100))
    # its clock stopped at the last heartbeat (10 s), not at "now" (100 s)
    assert spent.total_seconds == pytest.approx(10.0) and (spent.running, spent.orphaned) == (1, 1)
    alive = study.ask()  # a live one (this process) keeps its running clock
    record_start(alive, "cpu", 1)
    from ehrsr.search.liveness import current_worker

    alive.set_user_attr("worker", current_worker().to_dict())
    alive.set_user_attr("heartbeat", start.timestamp() + 95.0)
    spent = budget.spent(study, now=start + timedelta(seconds=100))
    assert spent.orphaned == 1 and spent.running == 2
    assert fail_stale_trials(study) == [0]
    assert study.trials[0].user_attrs["charged_seconds"] == pytest.approx(10.0)
    assert budget.spent(study, now=start + timedelta(seconds=100)).orphaned == 0


def test_the_summary_counts_orphans_and_the_budget_still_ends_exactly(tmp_path: Path) -> None:
    study, _ = _search(tmp_path, "orph")  # trials=3 spent
    orphan = study.ask()  # a worker that died mid-trial
    orphan.set_user_attr("worker", _dead_worker())
    settings = SearchSettings(space=MICRO, budget="trials=5", study_name="orph", out_dir=tmp_path / "r",
                              cache_dir=str(tmp_path / "c"), profile_size=(32, 32), write_reports=False,
                              verbosity=0, early_stopping=False, threads=1)
    summary = run_search(settings)
    assert summary.n_orphaned == 1 and summary.n_complete == 4 and summary.n_failed == 1
    assert summary.spent.startswith("5 trials")
    study = optuna.load_study(study_name="orph", storage=f"sqlite:///{tmp_path / 'r' / 'orph' / 'study.db'}")
    assert study.trials[orphan.number].user_attrs["status"] == "crashed"


def test_without_local_lpips_weights_a_run_notes_it_once_and_never_downloads(tmp_path: Path, monkeypatch,
                                                                              capfd) -> None:
    # no LPIPS weights here (an empty torch hub): LPIPS is not an objective, so nothing may be
    # downloaded, and the single-worker run says once that it goes on without LPIPS
    import ehrsr.metrics
    from ehrsr.cli import main
    from ehrsr.search import study as study_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(study_module, "_LPIPS_FAILURES", {})
    downloads = []
    real = ehrsr.metrics.LPIPS.__init__

    def spy(self, *args, **kwargs):
        downloads.append(kwargs.get("allow_download", True))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ehrsr.metrics.LPIPS, "__init__", spy)
    code = main(["--space", MICRO, "--study-name", "lp", "--budget", "trials=2", "--profile-size", "32",
                 "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r"), "--no-report",
                 "--threads", "1"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert downloads and not any(downloads)  # every attempt was local-only
    assert (out + err).count("note: LPIPS unavailable") == 1
    assert "Downloading" not in out + err
