"""Several workers on one storage, killed workers, crashing trials and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.pipeline import run_pipeline
from ehrsr.search import trial as trial_module
from ehrsr.search.driver import run_search
from ehrsr.search.study import SearchSettings
from ehrsr.search.trial import STALE_SECONDS, TrialJob, execute_isolated, fail_stale_trials

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "run_search.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward a trials= budget: they ran (not refused, not waiting)."""
    return [t for t in study.trials if t.state != TrialState.WAITING and "refused" not in t.user_attrs]


def test_two_independent_processes_on_one_journal_share_the_budget(tmp_path: Path) -> None:
    # a journal file, as Optuna advises for several processes: on one SQLite file two processes
    # can both claim the same enqueued trial (seen here), so --workers refuses SQLite
    url = f"journal:{tmp_path / 'shared.journal'}"

    def args(budget: str) -> list[str]:
        return ["--space", MICRO, "--storage", url, "--study-name", "shared", "--budget", budget,
                "--profile-size", "32", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r"),
                "--no-report", "--quiet", "--threads", "1"]

    # prepare the study and the data cache once, then start two independent workers at the same time
    first = _popen(args("trials=1"), tmp_path)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    workers = [_popen(args("trials=6"), tmp_path) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    from ehrsr.search.storage import open_storage

    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    assert len(_counted(study)) == 6  # exactly the budget, however the two workers interleaved
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_workers_refuse_a_shared_sqlite_file(tmp_path: Path, capsys) -> None:
    from ehrsr.cli import main

    code = main(["--space", MICRO, "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                 "--out-dir", str(tmp_path / "r"), "--budget", "trials=2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot share the SQLite storage" in err and "journal:" in err


def test_workers_option_starts_processes_on_a_journal(tmp_path: Path) -> None:
    proc = _popen(["--space", MICRO, "--study-name", "multi", "--budget", "trials=5", "--workers", "2",
                   "--profile-size", "32", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r"),
                   "--no-report", "--threads", "1"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert (tmp_path / "r" / "multi" / "study.journal").exists()  # several processes: a journal file
    assert "[w0]" in out and "[w1]" in out
    assert "Using an existing study" not in out + err  # Optuna's INFO lines are off in workers too
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "r" / "multi" / "study.journal"))
    )
    study = optuna.load_study(study_name="multi", storage=storage)
    assert len(_counted(study)) == 5


def test_killed_worker_keeps_finished_trials_and_its_trial_is_failed_later(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    args = ["--space", MICRO, "--storage", url, "--study-name", "kill", "--budget", "trials=40",
            "--profile-size", "32", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r"),
            "--no-report", "--quiet", "--no-early-stopping", "--threads", "1"]
    proc = _popen(args, tmp_path)
    deadline = time.time() + 300
    done: list = []
    while time.time() < deadline:
        time.sleep(1.0)
        try:
            study = optuna.load_study(study_name="kill", storage=url)
        except KeyError:
            continue
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if len(done) >= 2 and running:
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert len(done) >= 2, "the worker finished fewer than 2 trials in time"
    study = optuna.load_study(study_name="kill", storage=url)
    kept = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
    assert all(kept[t.number] == t.values for t in done)  # nothing finished was lost
    orphans = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert orphans  # the trial it was running stays RUNNING ...
    for number in orphans:  # as seen from another machine, which cannot look for the process
        worker = study.trials[number].user_attrs.get("worker")
        if worker:
            study._storage.set_trial_user_attr(study.trials[number]._trial_id, "worker",
                                               {**worker, "host": "another-node|boot|pid:[1]"})
    assert fail_stale_trials(study) == []  # not yet stale: it might still be alive
    failed = fail_stale_trials(study, now=time.time() + STALE_SECONDS + 1)
    assert failed == orphans  # ... until a live worker sees its heartbeat (or start) is stale
    stale = study.trials[orphans[0]]
    assert stale.state == TrialState.FAIL and stale.user_attrs["status"] == "crashed"


def _crash(job, results) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _raise(job, results) -> None:
    results.put(("error", "RuntimeError: CUDA error: an illegal memory access", "Traceback ..."))
    raise SystemExit(1)


def _job() -> TrialJob:
    return TrialJob("sqlite:///unused.db", "x", 0, 0, {}, {"lr": 1e-3}, 4, 0, [2], 2, True, {}, "cpu", None, None, None)


def test_a_crashing_trial_process_becomes_a_failed_outcome() -> None:
    outcome = execute_isolated(_job(), poll_seconds=0.2, target=_crash)
    assert outcome.status == "crashed" and "signal 11" in outcome.reason
    outcome = execute_isolated(_job(), poll_seconds=0.2, target=_raise)
    assert outcome.status == "error" and "illegal memory access" in outcome.reason


def test_isolated_trials_run_end_to_end(tmp_path: Path) -> None:
    settings = SearchSettings(space=MICRO, budget="trials=3", study_name="iso", out_dir=tmp_path / "r",
                              cache_dir=str(tmp_path / "c"), profile_size=(32, 32), isolate=True,
                              write_reports=False, verbosity=0)
    summary = run_search(settings)
    assert summary.n_complete + summary.n_pruned == 3


def test_ctrl_c_marks_the_running_trial_and_still_summarises(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = trial_module.run_configuration

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, "run_configuration", interrupt_second)
    settings = SearchSettings(space=MICRO, budget="trials=5", study_name="ctrlc", out_dir=tmp_path / "r",
                              cache_dir=str(tmp_path / "c"), profile_size=(32, 32), write_reports=False,
                              verbosity=0)
    summary = run_pipeline(settings)  # the pipeline writes trials.csv after every trial
    assert summary.interrupted and summary.n_complete + summary.n_pruned == 1
    study = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{tmp_path / 'r' / 'ctrlc' / 'study.db'}")
    second = study.trials[1]
    assert second.state == TrialState.FAIL and second.user_attrs["status"] == "interrupted"
    assert (tmp_path / "r" / "ctrlc" / "trials.csv").exists()


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "nsga3", "gp", "random"])
def test_every_sampler_runs(sampler: str, tmp_path: Path) -> None:
    settings = SearchSettings(space=MICRO, budget="trials=3", study_name=f"s-{sampler}", sampler=sampler,
                              out_dir=tmp_path / "r", cache_dir=str(tmp_path / "c"), profile_size=(32, 32),
                              write_reports=False, verbosity=0, early_stopping=False)
    summary = run_search(settings)
    assert summary.n_complete == 3


def test_a_trial_killed_before_its_first_heartbeat_is_failed_too(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    orphan = study.ask()  # a worker died right after ask(): no heartbeat was ever written
    alive = study.ask()
    study._storage.set_trial_user_attr(alive._trial_id, "heartbeat", time.time() + 10 * STALE_SECONDS)
    assert fail_stale_trials(study) == []
    assert fail_stale_trials(study, now=time.time() + STALE_SECONDS + 1) == [orphan.number]
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert study.trials[alive.number].state == TrialState.RUNNING
