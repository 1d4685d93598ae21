"""Many machines for real: worker processes on one PostgreSQL study, a SIGKILLed worker, the gRPC
storage proxy. The server is real (tests/pg_server.py), on loopback; each worker has its own
folders, as on its own machine, and shares only the storage URL."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.budget import parse_budget
from ehrsr.search.storage import open_storage
from tests.cluster_helpers import MICRO, counted_trials, micro_extra, start_worker, worker_argv

TRIAL_LINE = re.compile(r"^(?:\[w\d+\] )?#(\d+)\s", re.MULTILINE)


def _worker(tmp_path: Path, storage: str, study: str, budget: str, index: int, *extra: str) -> subprocess.Popen:
    home = tmp_path / f"machine{index}"
    home.mkdir(exist_ok=True)
    argv = worker_argv(space=MICRO, storage=storage, study=study, budget=budget, out_dir=str(home / "reports"),
                       extra=[*micro_extra(home / "cache"), *extra])
    return start_worker(argv, home)


def _wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _check_study(storage_url: str, name: str, n: int, outs: list[str]) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    counted = counted_trials(study)
    assert len(counted) == n
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == len(study.trials)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # every trial a worker finished is printed once by that worker: none was finished by two
    printed = [int(m) for out in outs for m in TRIAL_LINE.findall(out)]
    assert len(printed) == len(set(printed))
    finished_here = {t.number for t in counted if "charged_seconds" in t.user_attrs and t.user_attrs.get("status") != "crashed"}
    assert set(printed) >= finished_here
    # the budget is charged once per trial: the spent total is the sum of the trials' own charges
    spent = parse_budget(f"trials={n}").spent(study)
    assert spent.trials == n and spent.running == 0
    charges = [t.user_attrs["charged_seconds"] for t in counted]
    assert all(c > 0 for c in charges)
    assert spent.total_seconds == pytest.approx(sum(charges))
    return study


@pytest.mark.slow
def test_three_workers_on_postgresql_end_with_exactly_the_budget(tmp_path: Path, pg_url: str) -> None:
    # three independent processes started together, as on three machines: they race to create
    # the study, to enqueue its reference trials and for the last trial slots
    n = 6
    procs = [_worker(tmp_path, pg_url, "pg3", f"trials={n}", i) for i in range(3)]
    outs = _wait_all(procs)
    assert all("trials=6 reached" in out for out in outs)  # each stopped on the shared budget
    study = _check_study(pg_url, "pg3", n, outs)
    # each machine draws its own sampler stream (revisits.sampler_seed, joined): started together
    # with one --seed they once proposed the same configurations, recorded as repeats
    assert not [t.number for t in study.trials if "repeat_of" in t.user_attrs]
    # the two reference configurations were enqueued once, whichever worker created the study
    references = [t.user_attrs["reference"] for t in study.trials if "reference" in t.user_attrs]
    assert sorted(references) == ["all-modules", "conv-only"]
    # the default objectives, named for Optuna and in the study's own record alike
    assert study.metric_names == ["psnr", "latency"]
    assert study.user_attrs["objectives"] == ["psnr", "latency"]


@pytest.mark.slow
def test_a_sigkilled_worker_loses_one_trial_and_the_others_finish(tmp_path: Path, pg_url: str) -> None:
    n = 7
    procs = [_worker(tmp_path, pg_url, "kill", f"trials={n}", i, "--no-early-stopping") for i in range(3)]
    victim = procs[0]
    storage = open_storage(pg_url)
    killed_number = None
    deadline = time.time() + 300
    while killed_number is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="kill", storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (t.user_attrs.get("worker") or {}).get("pid") == victim.pid:  # inside its heartbeat: training
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed_number = t.number
                break
    assert killed_number is not None, "the first worker never ran a trial while watched"
    outs = _wait_all(procs[1:])
    study = _check_study(pg_url, "kill", n, outs)
    killed = study.trials[killed_number]
    # failed at once by a surviving worker on this host (its pid is gone), long before the
    # heartbeat grace period (liveness.STALE_SECONDS) could have run out
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["status"] == "crashed" and "worker process ended" in killed.user_attrs["reason"]
    # charged from its start to its last sign of life (the heartbeat it wrote when training began)
    last_sign = killed.user_attrs["heartbeat"] - killed.datetime_start.timestamp()
    assert last_sign > 0
    assert killed.user_attrs["charged_seconds"] == pytest.approx(last_sign, abs=1e-6)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) >= n - 2  # --no-early-stopping


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_through_the_grpc_storage_proxy(tmp_path: Path, pg_url: str) -> None:
    port = _free_port()
    proxy = start_worker(["run_search.py", "storage-proxy", "--storage", pg_url, "--host", "127.0.0.1",
                          "--port", str(port)], tmp_path)
    try:
        first = proxy.stdout.readline()  # printed once the database is open, just before serving
        assert f"listening on 127.0.0.1:{port}" in first, first or proxy.stderr.read()[-2000:]
        url = f"grpc://127.0.0.1:{port}"
        n = 4
        procs = [_worker(tmp_path, url, "proxied", f"trials={n}", i) for i in range(2)]
        outs = _wait_all(procs)
        # the trials are in the database behind the proxy, read here without it
        _check_study(pg_url, "proxied", n, outs)
    finally:
        proxy.send_signal(signal.SIGTERM)
        out, err = proxy.communicate(timeout=60)
    assert proxy.returncode == 0, err[-2000:]
    assert "storage proxy stopped" in out


def test_a_database_restart_mid_search_costs_at_most_the_running_trials(
        tmp_path: Path, pg_url: str, postgres_server) -> None:
    # the server goes away for some seconds while two workers search: they wait and retry with
    # backoff, say so, lose at most the trials they were running, and end with exactly the budget
    n = 6
    procs = [_worker(tmp_path, pg_url, "outage", f"trials={n}", i, "--no-early-stopping") for i in range(2)]
    storage = open_storage(pg_url)
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="outage", storage=storage)
        except KeyError:
            continue
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            break
    assert all(p.poll() is None for p in procs), "a worker ended before the outage"
    postgres_server.outage(5.0)
    outs = _wait_all(procs, timeout=300)
    assert any("storage unreachable, retrying in" in out for out in outs)
    study = _check_study(pg_url, "outage", n, outs)
    # a configuration refused before training (FAIL with status "refused") is not a lost trial
    lost = [t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get("status") != "refused"]
    assert len(lost) <= 2  # at most one running trial per worker
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) >= n - 2
