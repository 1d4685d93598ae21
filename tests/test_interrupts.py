"""SIGTERM is handled as Ctrl-C: the signal handlers themselves, then real signals sent to real
search processes (one worker; a parent with isolated-trial workers; a side study). ``train`` is
tested in tests/test_fulltrain.py, the Slurm array's ``scancel`` in tests/test_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from ehrsr.interrupts import CTRL_C, SIGTERM, Terminated, deferred_stop, exit_status, sigterm_as_interrupt
from ehrsr.search.driver import run_search
from ehrsr.search.storage import open_storage
from ehrsr.search.study import SearchSettings
from tests.cluster_helpers import MICRO, micro_space_with_steps, start_worker

# ---------------------------------------------------------------------------------------------
# the handlers, with real signals sent to this process


def test_sigterm_as_interrupt_raises_terminated_once_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once; this line is never finished
    assert signal.getsignal(signal.SIGTERM) == before
    with sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt) as caught:  # Terminated is a KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM (Slurm may send two) is ignored
        time.sleep(0.05)
    assert isinstance(caught.value, Terminated)
    assert (exit_status(CTRL_C), exit_status(SIGTERM)) == (130, 143)


def test_deferred_stop_records_the_first_signal_and_a_second_ctrl_c_raises() -> None:
    with deferred_stop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.name == SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # ignored
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C wants out now
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with deferred_stop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.name is None  # an ignored signal stays ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# searches stopped by SIGTERM


def long_space(folder: Path) -> str:
    """The micro space with trials far too long to end before the signal."""
    return micro_space_with_steps(folder, 100_000)


def wait_for(condition: Callable[[], list[FrozenTrial]], proc: subprocess.Popen, n: int,
             timeout: float = 300) -> list[FrozenTrial]:
    """Poll until ``condition()`` lists ``n`` trials (the process must keep running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            found = condition()
        except KeyError:  # the study is not created yet
            found = []
        if len(found) >= n:
            return found
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {n} running trials after {timeout} s: {proc.communicate()[1][-3000:]}")


def running_in_training(storage: str, study_name: str) -> Callable[[], list[FrozenTrial]]:
    path = Path(storage.split(":", 1)[1].removeprefix("///"))

    def condition() -> list[FrozenTrial]:
        if not path.exists():  # opening it here would create it under the search
            return []
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        # "worker" is written when the trial's heartbeat starts, just before training
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]
    return condition


def assert_interrupted(storage: str, study_name: str, numbers: list[int]) -> None:
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    for number in numbers:
        trial = study.trials[number]
        assert trial.state == TrialState.FAIL, number
        assert trial.user_attrs["status"] == "interrupted" and trial.user_attrs["reason"] == "interrupted (SIGTERM)"


def search_argv(space: str, out_dir: Path, study: str, *extra: str) -> list[str]:
    return ["run_search.py", "--space", space, "--budget", "trials=3", "--study-name", study, "--out-dir",
            str(out_dir), "--profile-size", "32", "--threads", "1", "--cache-dir", str(out_dir / "cache"),
            "--no-early-stopping", *extra]


def test_sigterm_fails_the_running_trial_prints_the_summary_and_exits_143(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    proc = start_worker(search_argv(long_space(tmp_path), out, "term"), tmp_path)
    storage = f"sqlite:///{out / 'term' / 'study.db'}"
    (running,) = wait_for(running_in_training(storage, "term"), proc, 1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert_interrupted(storage, "term", [running.number])
    assert "Search term: interrupted (SIGTERM)" in stdout
    assert re.search(r"^  trials +0 complete, 0 stopped early, 1 failed/refused$", stdout, re.MULTILINE), stdout
    # a scheduler kills the job soon after SIGTERM: the summary first, no report
    assert "report not written (stopped by SIGTERM)" in stdout
    assert not (out / "term" / "report.md").exists()


def test_sigterm_to_a_parent_of_workers_reaches_their_isolated_trials(tmp_path: Path) -> None:
    # `kill PID` reaches the parent alone; it passes SIGTERM on to its workers, which stop the
    # trial processes they run (--isolate) and record their trials as interrupted
    out = tmp_path / "reports"
    proc = start_worker(search_argv(long_space(tmp_path), out, "par", "--workers", "2", "--isolate",
                                    "--no-report"), tmp_path)
    storage = f"journal:{out / 'par' / 'study.journal'}"
    running = wait_for(running_in_training(storage, "par"), proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143, stderr[-3000:]
    assert_interrupted(storage, "par", [t.number for t in running])
    assert "Search par: interrupted (SIGTERM)" in stdout


def test_sigterm_fails_the_running_run_of_a_side_study(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    settings = SearchSettings(space=MICRO, budget="trials=4", study_name="side", out_dir=out,
                              cache_dir=str(tmp_path / "cache"), profile_size=(32, 32),
                              early_stopping=False, write_reports=False, verbosity=0)
    assert run_search(settings).n_complete == 4
    # the proxy-fidelity retrains, far longer than the trials (8 steps x 20000)
    proc = start_worker(["run_search.py", "fidelity", "--study-name", "side", "--out-dir", str(out),
                         "--configs", "4", "--factor", "20000"], tmp_path)
    storage = f"sqlite:///{out / 'side' / 'study.db'}"
    (running,) = wait_for(running_in_training(storage, "side-fidelity"), proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert_interrupted(storage, "side-fidelity", [running.number])
