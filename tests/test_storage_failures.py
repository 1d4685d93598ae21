"""A storage that fails: a full disk stops at once in one line (SQLite's "database or disk is full"
is not a connection failure), a restart is waited out by opening a study and by the ablation,
baselines and fidelity runs as it is by the search loop (docs/scaling_out.md)."""

from __future__ import annotations

import errno
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import optuna
import psycopg.errors
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.trial import TrialState

import ehrsr.pipeline
import ehrsr.search.driver
from ehrsr.cli import main
from ehrsr.search import storage as storage_module
from ehrsr.search.storage import (
    StorageError,
    StorageFull,
    open_storage,
    retry_storage,
    storage_full,
    storage_unreachable,
)
from tests.cluster_helpers import MICRO

optuna.logging.set_verbosity(optuna.logging.WARNING)


class PageLimit:
    """Real SQLITE_FULL errors without a full disk: once ``on``, every statement on a SQLite
    connection first caps the file at its current page count (``PRAGMA max_page_count``), so the
    next write that needs a new page fails exactly as on a full disk ("database or disk is full")."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.on and conn.dialect.name == "sqlite":
            pages = cursor.execute("PRAGMA page_count").fetchone()[0]
            cursor.execute(f"PRAGMA max_page_count = {pages}")


@pytest.fixture
def page_limit():
    limit = PageLimit()
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", limit)
    try:
        yield limit
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", limit)


def _full_storage_error(tmp_path: Path, page_limit: PageLimit) -> Exception:
    """The exception Optuna raises when its SQLite file cannot grow."""
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    page_limit.on = True
    trial = study.ask()
    try:
        for i in range(1000):
            trial.set_user_attr(f"key{i}", "x" * 2000)
    except Exception as exc:  # what Optuna raises: its own StorageInternalError around SQLAlchemy's
        return exc
    raise AssertionError("the page limit never filled the file")


def test_sqlites_full_error_is_a_full_storage_not_an_unreachable_one(tmp_path, page_limit) -> None:
    exc = _full_storage_error(tmp_path, page_limit)
    chain, error = [], exc
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    sqlite_error = next(e for e in chain if isinstance(e, sqlite3.Error))
    assert sqlite_error.sqlite_errorname == "SQLITE_FULL"
    assert any(type(e).__module__.startswith("sqlalchemy") and isinstance(e, sqlalchemy.exc.OperationalError)
               for e in chain)  # the wrapper the retry once took for a lost connection
    assert storage_full(exc) and not storage_unreachable(exc)


def test_the_classifier_on_other_real_errors(tmp_path) -> None:
    disk = OSError(errno.ENOSPC, "No space left on device")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    server_full = psycopg.errors.DiskFull("could not extend file \"base/16384/2619\": No space left on device")
    for exc in (disk, quota, server_full):
        assert storage_full(exc) and not storage_unreachable(exc), exc
    with pytest.raises(StorageError) as refused:  # nothing listens on port 1: a connection failure
        open_storage("postgresql://user@127.0.0.1:1/db")
    for exc in (refused.value, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")):
        assert storage_unreachable(exc) and not storage_full(exc), exc
    assert not storage_full(OSError(errno.EACCES, "Permission denied"))


def test_retry_stops_at_once_on_a_full_storage_and_names_the_file(tmp_path, page_limit) -> None:
    exc = _full_storage_error(tmp_path, page_limit)
    calls = []

    def operation():
        calls.append(1)
        raise exc

    def no_waiting(seconds: float) -> None:
        raise AssertionError("a full storage must not be waited for")

    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(StorageFull) as full:
        retry_storage(operation, what="record a trial", storage_url=url, sleep=no_waiting)
    assert len(calls) == 1
    assert str(full.value) == (f"no space left on the device holding {tmp_path / 'study.db'} while trying to record "
                               "a trial: free some space, then run the same command again to resume")


def _micro_args(tmp_path: Path, name: str) -> list[str]:
    return ["--space", MICRO, "--budget", "trials=30", "--out-dir", str(tmp_path / "reports"), "--cache-dir",
            str(tmp_path / "cache"), "--profile-size", "32", "--threads", "1", "--study-name", name, "--no-report",
            "--profile-seconds", "0.000001"]


def test_a_search_on_a_full_disk_stops_in_one_line_and_leaves_no_trial_running(
        tmp_path, page_limit, monkeypatch, capsys) -> None:
    real_table = ehrsr.pipeline.write_trials_table

    def fill_after_two(study: optuna.Study, study_dir: Path) -> None:
        real_table(study, study_dir)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= 2:
            page_limit.on = True  # the disk is full from here on

    monkeypatch.setattr(ehrsr.pipeline, "write_trials_table", fill_after_two)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: pytest.fail("a full disk was waited for"))
    code = main(_micro_args(tmp_path, "full"))
    out, err = capsys.readouterr()
    page_limit.on = False
    db = tmp_path / "reports" / "full" / "study.db"
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == [err.strip().splitlines()[-1]]
    assert re.fullmatch(f"error: no space left on the device holding {re.escape(str(db))} while trying to "
                        "[a-z ]+: free some space, then run the same command again to resume", errors[0]), errors
    assert "storage unreachable" not in out + err
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{db}")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert 2 <= len(study.trials) < 30  # it stopped: no trial after the one the full disk hit
    last = study.trials[-1]
    assert last.state == TrialState.FAIL
    assert not (db.parent / "weights" / f"trial_{last.number:05d}.safetensors").exists()


def _unreachable() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_opening_a_study_waits_out_a_restart_once_the_storage_has_answered(monkeypatch, capsys) -> None:
    outcomes = [_unreachable(), _unreachable(), "prepared"]
    waits: list[float] = []

    def prepare_study(settings, log):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(ehrsr.search.driver, "prepare_study", prepare_study)
    monkeypatch.setattr(storage_module.time, "sleep", waits.append)
    said: list[str] = []
    settings = SimpleNamespace(storage="postgresql://u@db/x")
    assert ehrsr.search.driver.open_prepared(settings, log=said.append) == "prepared"
    assert waits == [1.0, 2.0] and said == ["storage unreachable, retrying in 1 s (open the study)",
                                            "storage unreachable, retrying in 2 s (open the study)"]


def test_a_storage_never_reached_is_reported_at_once(monkeypatch) -> None:
    def prepare_study(settings, log):
        open_storage("postgresql://user:pw@127.0.0.1:1/db")  # refused: the first contact fails

    monkeypatch.setattr(ehrsr.search.driver, "prepare_study", prepare_study)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: pytest.fail("a wrong URL was waited for"))
    with pytest.raises(StorageError, match=r"^cannot open storage postgresql://user:\*\*\*@127.0.0.1:1/db"):
        ehrsr.search.driver.open_prepared(SimpleNamespace(storage=None), log=lambda *a: None)


def _fail_once(monkeypatch, module, name: str) -> list[str]:
    """Make ``module.name`` raise a lost-connection error on its first call, then work."""
    real = getattr(module, name)
    failed: list[str] = []

    def flaky(*args, **kwargs):
        if not failed:
            failed.append(name)
            raise _unreachable()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return failed


def test_baseline_runs_wait_out_a_storage_restart(tmp_path, monkeypatch, capsys) -> None:
    import ehrsr.ablation.side
    from ehrsr.ablation.baselines import BaselineSpec, run_baselines
    from tests.test_trust import CTX, SpyRunner, _study

    study = _study(tmp_path)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    failed = _fail_once(monkeypatch, ehrsr.ablation.side, "record_outcome")
    result = run_baselines(study, CTX, [BaselineSpec("RLFN")], progress=False, runner=SpyRunner([27.0]))
    assert failed == ["record_outcome"] and result.statuses == {"RLFN (+bicubic skip)": "complete"}
    assert "storage unreachable, retrying in 1 s (record a run)" in capsys.readouterr().err
    side = optuna.load_study(study_name="demo-baselines", storage=study._storage)
    assert [t.state for t in side.trials] == [TrialState.COMPLETE]


def test_ablation_runs_wait_out_a_storage_restart(tmp_path, monkeypatch, capsys) -> None:
    import ehrsr.ablation.runner
    from ehrsr.ablation import run_controlled_ablation
    from tests.test_reports_ablation import CTX, FakeRunner, reference_study

    study = reference_study(tmp_path)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    failed = _fail_once(monkeypatch, ehrsr.ablation.runner, "record_outcome")
    result = run_controlled_ablation(study, CTX, seeds=1, progress=False, runner=FakeRunner())
    assert failed == ["record_outcome"] and result.runs_run == result.runs_planned == 5
    assert "storage unreachable, retrying in 1 s (record a run)" in capsys.readouterr().err
    ablation = optuna.load_study(study_name="abl-ablation", storage=study._storage)
    assert len(ablation.trials) == 5 and all(t.state == TrialState.COMPLETE for t in ablation.trials)


def test_a_full_disk_inside_a_trial_stops_the_search_too(tmp_path, monkeypatch) -> None:
    # safetensors says ENOSPC only in its text; any later trial would fail the same way
    from safetensors import SafetensorError

    from ehrsr.search import driver

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_full(full) and not storage_unreachable(full)
    other = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert not storage_full(other)

    def execute_trial(job, ctx, study):
        raise full

    monkeypatch.setattr(driver, "execute_trial", execute_trial)
    job = SimpleNamespace(weights_path=str(tmp_path / "weights" / "trial_00004.safetensors"), trial_number=4)
    with pytest.raises(StorageFull, match=rf"^no space left on the device holding {re.escape(str(tmp_path / 'weights'))} "
                                          r"while trying to run trial #4: free some space"):
        driver._execute_guarded(job, None, None)
    monkeypatch.setattr(driver, "execute_trial", lambda job, ctx, study: (_ for _ in ()).throw(RuntimeError("bug")))
    assert driver._execute_guarded(job, None, None).status == "error"  # anything else ends only this trial


class _EachCallSiteFailsOnce:
    """A lost connection at every storage call of a loop: each RDBStorage method call made inside
    the function named ``within`` fails the first time it comes through a given path of ehrsr code
    (its ehrsr frames) and works when the loop retries it. Calls made inside a search trial (an
    outage there ends that trial, documented) and from other threads are left alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, within: str = "run_worker") -> None:
        import inspect

        self.within = within
        self.failed: list[tuple[tuple[str, int], ...]] = []
        for name, function in inspect.getmembers(optuna.storages.RDBStorage, inspect.isfunction):
            static = isinstance(inspect.getattr_static(optuna.storages.RDBStorage, name), (staticmethod, classmethod))
            if not name.startswith("__") and not static:
                monkeypatch.setattr(optuna.storages.RDBStorage, name, self._wrap(function))

    def _wrap(self, function):
        def flaky(*args, **kwargs):
            path = self._path()
            if path is not None and path not in self.failed:
                self.failed.append(path)
                raise _unreachable()
            return function(*args, **kwargs)

        return flaky

    def _path(self) -> tuple[tuple[str, int], ...] | None:
        import traceback

        frames = traceback.extract_stack()
        names = {frame.name for frame in frames}
        if self.within not in names or "execute_trial" in names:
            return None
        return tuple((frame.filename, frame.lineno) for frame in frames
                     if "/ehrsr/" in frame.filename and "/tests/" not in frame.filename)


class _RepeatTheFirstTrial(optuna.samplers.RandomSampler):
    """Random proposals, except that trial 3 proposes what trial 2 did (a finished repeat; the
    search's own first trials are enqueued references)."""

    def sample_independent(self, study, trial, name, distribution):
        if trial.number in (2, 3):
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                return distribution.choices[-1]
            return distribution.high
        return super().sample_independent(study, trial, name, distribution)


def test_every_storage_call_of_the_search_loop_waits_out_a_lost_connection(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ehrsr.search.driver, "build_sampler", lambda *_: _RepeatTheFirstTrial(seed=0))
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    outage = _EachCallSiteFailsOnce(monkeypatch)
    args = _micro_args(tmp_path, "lost")
    args[args.index("--budget") + 1] = "trials=4"
    assert main(args) == 0
    out, err = capsys.readouterr()
    monkeypatch.undo()
    study = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'reports' / 'lost' / 'study.db'}")
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.FAIL not in states, states
    trained = [t for t in study.trials if "repeat_of" not in t.user_attrs]
    repeats = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert len(trained) == 4 and [(t.number, t.user_attrs["repeat_of"]) for t in repeats] == [(3, 2)]
    said = set(re.findall(r"storage unreachable, retrying in 1 s \(([a-z' ]+)\)", out + err))
    # every storage operation of the loop met the outage once and was retried (the progress and
    # the repeat lookup share the reads of the budget checks, and the first heartbeat is written
    # with the trial's start: they send nothing of their own)
    assert {"fail orphaned trials", "read the study's settings", "check the budget", "ask for a trial",
            "start a trial", "record a trial", "write the trials table"} <= said, said
    assert len(outage.failed) >= 20


def test_every_storage_call_of_the_ablation_baselines_and_fidelity_runs_waits_out_a_lost_connection(
        tmp_path, monkeypatch, capsys) -> None:
    from ehrsr.ablation import run_controlled_ablation
    from ehrsr.ablation.baselines import BaselineSpec, run_baselines
    from tests.test_reports_ablation import CTX, FakeRunner, reference_study
    from tests.test_trust import CTX as BASELINE_CTX
    from tests.test_trust import SpyRunner, _study

    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    study = reference_study(tmp_path / "a")
    outage = _EachCallSiteFailsOnce(monkeypatch, within="run_controlled_ablation")
    result = run_controlled_ablation(study, CTX, seeds=1, progress=False, runner=FakeRunner())
    assert result.runs_run == result.runs_planned == 5 and len(outage.failed) >= 5
    ablation = optuna.load_study(study_name="abl-ablation", storage=study._storage)
    assert len(ablation.trials) == 5 and all(t.state == TrialState.COMPLETE for t in ablation.trials)

    study = _study(tmp_path / "b")
    outage = _EachCallSiteFailsOnce(monkeypatch, within="run_baselines")
    result = run_baselines(study, BASELINE_CTX, [BaselineSpec("RLFN")], progress=False, runner=SpyRunner([27.0]))
    assert result.statuses == {"RLFN (+bicubic skip)": "complete"} and len(outage.failed) >= 3
    side = optuna.load_study(study_name="demo-baselines", storage=study._storage)
    assert [t.state for t in side.trials] == [TrialState.COMPLETE]

    from ehrsr.ablation.fidelity import run_fidelity

    outage = _EachCallSiteFailsOnce(monkeypatch, within="run_fidelity")
    result = run_fidelity(study, BASELINE_CTX, configs=6, factor=3, progress=False, runner=SpyRunner([28.0] * 6))
    assert result.runs_run == 6 and len(outage.failed) >= 5
    side = optuna.load_study(study_name="demo-fidelity", storage=study._storage)
    assert [t.state for t in side.trials] == [TrialState.COMPLETE] * 6
    assert "storage unreachable, retrying in 1 s" in capsys.readouterr().err
