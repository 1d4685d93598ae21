"""The search's own overhead per trial at 100, 1,000 and 5,000 finished trials, on SQLite, a
journal file and PostgreSQL: everything a worker does around a trial except training and timing.

One worker's loop (``run_worker`` in ehrsr/search/driver.py and ``execute_trial`` in
ehrsr/search/trial.py) is replayed around synthetic trials of the ``tiny`` space: the objective
values are drawn, nothing is trained or timed on the CPU. Each measured trial goes through

    budget       fail_stale_trials, estimate_trial_seconds, Budget.allows_new_trial (twice),
                 Budget.spent for the progress bar
    ask + start  study.ask, the space's suggestions, cached_cost (profiled before?) and the start
                 attributes (one storage write with the parameters, the first heartbeat included)
    lookups      RepeatPolicy.check (a finished repeat?)
    heartbeat    Heartbeat start and stop (its thread)
    MACs         UnitMacCounter.count of the trial's network, as a fresh process counts it: its
                 memory empty, the units on disk (ehrsr/profiling/unit_counts.py)
    latency      predict_device_latencies for one device profile (a latency model covering the
                 space's units, synthetic unit costs)
    MO-ASHA      the rung attribute and MOASHA.decide at every rung below the top
    record       latency sources and record_outcome (metrics, status, charge, tell)
    trials.csv   the pipeline's after-trial hook (ehrsr.pipeline.refresh_trials_table: paced, so
                 its cost shows in the mean and the slowest trial, not the median)

and, reported apart from that total, the sampler: the time spent inside the search's sampler
(``build_sampler("tpe")``: TPE with a bounded history beyond ``TPE_HISTORY_LIMIT`` finished
trials, ehrsr/search/sampler_history.py) and, for comparison, Optuna's TPE built the same way but
reading the whole history, asked for the same trial. "MO-ASHA full sort" times, for comparison
too, what the decision did before it kept the rung per process: read every rung value and sort
the rung (the reference ranking of tests/test_asha_ranking.py), on top of the same writes.

The study is filled with synthetic finished trials first (the tiny space's parameters drawn at
random, the user attributes of a real trial, a third stopped at rung 0: storage_overhead.py makes
them) and grows between sizes, so "finished" counts those plus the trials measured before.
PostgreSQL is a real server on loopback (tests/pg_server.py, fsync off). On SQLite and
PostgreSQL the table also counts the SQL statements one trial of the loop sends (each a round trip,
whatever the load: the sampler's included, the comparison timings' not), how many of them Optuna's
own ``ask``, suggestions and ``tell`` send besides its sampler's reads, and times ``SELECT 1``. The loop writes as
``run_worker`` does: a trial's parameters and start attributes in one transaction
(``storage.suggest_and_set``), the other attributes in one per step (``storage.set_user_attrs``),
and the checks of a loop step on one read of the study (``settled.one_read``).

    python benchmarks/study_overhead.py [--sizes 100,1000,5000] [--trials 20] [--backends sqlite,journal,postgresql]
    python benchmarks/study_overhead.py --smoke      # 20 trials, SQLite and journal, 2 measured: seconds

Prints medians (ms per trial) and the load average; asserts nothing. Timings vary with the
machine's load: compare columns of one run, and quote the load with the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState, create_trial

from benchmarks._common import print_table
from benchmarks.storage_overhead import (
    create_filled_study,
    postgres_if_wanted,
    settle,
    storage_url,
    synthetic_outcome,
)

SUITE = ("budget", "ask + start", "lookups", "heartbeat", "MACs", "latency", "MO-ASHA", "record", "trials.csv")
DEVICE = "bench-cpu"


class TimedSampler(BaseSampler):
    """Delegates to ``sampler`` and adds up the seconds spent inside it."""

    def __init__(self, sampler: BaseSampler) -> None:
        self.sampler = sampler
        self.seconds = 0.0

    def _timed(self, function: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def infer_relative_search_space(self, study, trial):
        return self._timed(self.sampler.infer_relative_search_space, study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._timed(self.sampler.sample_relative, study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._timed(self.sampler.sample_independent, study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        return self._timed(self.sampler.before_trial, study, trial)

    def after_trial(self, study, trial, state, values):
        return self._timed(self.sampler.after_trial, study, trial, state, values)

    def reseed_rng(self):
        self.sampler.reseed_rng()


def synthetic_history(space: Any, n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials of ``space``: parameters drawn at random through the space's own
    suggestions, the attributes of ``storage_overhead.synthetic_outcome`` with objective values
    drawn (PSNR about 28 dB, latency log-normal about 3 ms, so fronts are as thin as a real
    study's); a draw the space refuses is a failed trial, as in the search."""
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=["maximize", "minimize"])
    rng = random.Random(seed)
    start = datetime.now() - timedelta(hours=1)
    trials = []
    for i in range(n):
        trial = draw.ask()
        sampled = space.suggest(trial, scale=4)
        frozen = draw._storage.get_trial(trial._trial_id)
        draw.tell(trial, [0.0, 0.0])
        if sampled.config is None:
            trials.append(create_trial(state=TrialState.FAIL, params=frozen.params, distributions=frozen.distributions,
                                       user_attrs={"refused": str(sampled.refused), "status": "refused"}))
            continue
        state, values, attrs = synthetic_outcome(i, start, config=sampled.config.to_dict(), rungs=1)
        drawn = [28.0 + rng.gauss(0, 0.5), 3.0 * math.exp(rng.gauss(0, 0.4))]
        attrs["rung_0_values"] = [drawn[0] - 0.5 + rng.gauss(0, 0.1), drawn[1]]
        values = drawn if values is not None else None
        attrs["train"] = {**asdict(sampled.train), "seed": 0}
        trials.append(create_trial(state=state, values=values, params=frozen.params,
                                   distributions=frozen.distributions, user_attrs=attrs))
    return trials


def synthetic_device(space: Any, input_hw: tuple[int, int], patience: int) -> list[tuple[Any, Any, Any]]:
    """One device profile whose latency model covers the units of ``space`` (made-up unit costs)."""
    from ehrsr.profiling.latency_model import LatencyModel, LatencyTarget, enumerate_units, space_fingerprint
    from ehrsr.search.device_latency import DeviceLatency

    target = LatencyTarget(profile="bench-device", kind="cpu", runtime="torch", threads=1, dtype="float32",
                           input_hw=input_hw, scale=4)
    rng = random.Random(0)
    units = {key: {"latency_ms": rng.uniform(0.01, 2.0)}
             for key in enumerate_units(space, input_hw, patience=patience)}
    model = LatencyModel(target=target, space=space_fingerprint(space), units=units)
    return [(DeviceLatency("bench-device", target.to_dict(), "<synthetic>"), model, target)]


class Worker:
    """One worker's state across measured trials (the objects ``run_worker`` keeps)."""

    def __init__(self, study: optuna.Study, space: Any, folder: Path, shape: tuple[int, ...],
                 devices: list[tuple[Any, Any, Any]], seed: int) -> None:
        from ehrsr.profiling.unit_counts import UnitCountStore, UnitMacCounter, default_store_dir
        from ehrsr.search.asha import MOASHA
        from ehrsr.search.budget import parse_budget
        from ehrsr.search.revisits import RepeatPolicy
        from ehrsr.search.study import build_sampler

        self.study, self.space, self.folder, self.shape, self.devices = study, space, folder, shape, devices
        self.budget = parse_budget("trials=1000000,hours=100000")
        self.policy = RepeatPolicy()
        self.asha = MOASHA.from_fidelity(space.fidelity, study.directions)
        self.store = UnitCountStore(default_store_dir())
        self.process_counter = UnitMacCounter(self.store)
        self.sampler = TimedSampler(build_sampler("tpe", seed))
        study.sampler = self.sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Optuna's TPE as build_sampler makes it, reading the whole history (for comparison)
            self.whole_history_tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
        self.rng = random.Random(seed)
        self.statements: StatementCounter | None = None
        self.uncounted_statements = 0  # statements of this trial's comparison timings

    def _comparison(self, function: Callable[[], Any]) -> Any:
        """Run a comparison timing whose statements are not the loop's."""
        before = self.statements.count if self.statements is not None else 0
        try:
            return function()
        finally:
            if self.statements is not None:
                self.uncounted_statements += self.statements.count - before

    def trial(self) -> dict[str, float]:
        """One synthetic trial; milliseconds per group, the sampler's apart."""
        from ehrsr.model import build_model
        from ehrsr.pipeline import refresh_trials_table
        from ehrsr.profiling.unit_counts import UnitMacCounter
        from ehrsr.search.budget import estimate_trial_seconds, start_attrs
        from ehrsr.search.device_latency import predict_device_latencies
        from ehrsr.search.record import Heartbeat, TrialOutcome, fail_stale_trials, record_outcome
        from ehrsr.search.settled import one_read
        from ehrsr.search.storage import suggest_and_set
        from ehrsr.search.trial import cached_cost
        from ehrsr.study_schema import LATENCY_SOURCES_ATTR, steps_scale, study_storage

        study, ms = self.study, dict.fromkeys((*SUITE, "sampler", "TPE whole history", "MO-ASHA full sort"), 0.0)
        self.uncounted_statements = 0

        def timed(group: str, function: Callable[[], Any]) -> Any:
            sampler_before = self.sampler.seconds
            statements_before = self.statements.count if self.statements is not None else 0
            start = time.perf_counter()
            out = function()
            inside = self.sampler.seconds - sampler_before
            ms[group] += (time.perf_counter() - start - inside) * 1e3
            ms["sampler"] += inside * 1e3
            if self.statements is not None:
                ms[f"{group} SQL"] = ms.get(f"{group} SQL", 0) + self.statements.count - statements_before
            return out

        fidelity = self.space.fidelity
        with one_read(study):  # as run_worker: the loop step's checks share one read
            timed("budget", lambda: fail_stale_trials(study))
            timed("budget", lambda: steps_scale(study.user_attrs))  # the study's settings, read once a step
            estimate = timed("budget", lambda: estimate_trial_seconds(study, fidelity.seconds_per_trial_estimate, "cpu"))
            timed("budget", lambda: self.budget.allows_new_trial(study, estimate, device_kind="cpu"))
            timed("budget", lambda: self.budget.used_fraction(self.budget.spent(study)))  # the progress bar
        trial = timed("ask + start", study.ask)
        step_read = one_read(study)  # the check after the ask, the start and the repeat lookup share one
        step_read.__enter__()
        timed("budget", lambda: self.budget.allows_new_trial(study, estimate, device_kind="cpu",
                                                             trial_number=trial.number))

        def start_trial() -> tuple[Any, dict[str, Any]]:  # as driver._start_trial
            def attrs_of(sampled: Any) -> dict[str, Any]:
                attrs = {**start_attrs("cpu", 1), "device_name": DEVICE, "train": {**asdict(sampled.train), "seed": 0},
                         **Heartbeat.first_beat()}
                if sampled.config is not None:
                    attrs["config"] = sampled.config.to_dict()
                    found = cached_cost(study, attrs["config"], DEVICE, exclude=trial.number)  # profiled before?
                    if found is not None:
                        attrs["cost_from_trial"] = found[0]
                return attrs

            sampled = suggest_and_set(trial, lambda: self.space.suggest(trial, scale=4), attrs_of)
            return sampled, {**asdict(sampled.train), "seed": 0}

        sampled, train = timed("ask + start", start_trial)
        config = sampled.config.to_dict() if sampled.config is not None else None
        if config is not None:
            timed("lookups", lambda: self.policy.check(study, trial.number, config, train))
        step_read.__exit__(None, None, None)
        self._comparison(lambda: self._time_whole_history_tpe(study_storage(study).get_trial(trial._trial_id), ms))
        if config is None:
            timed("record", lambda: record_outcome(study, trial, TrialOutcome.failed("refused", str(sampled.refused))))
            timed("trials.csv", lambda: refresh_trials_table(study, self.folder))
            return ms
        heartbeat = Heartbeat(study, trial._trial_id, first_beat_written=True)
        timed("heartbeat", heartbeat.__enter__)

        model = build_model(sampled.config)  # a trial builds it to train it: not overhead
        self.process_counter.count(model, self.shape)  # units new to the store are counted here, untimed
        count = timed("MACs", lambda: UnitMacCounter(self.store).count(model, self.shape))
        self._cover(sampled.config)
        device = timed("latency", lambda: predict_device_latencies(sampled.config, self.devices))

        values = [28.0 + self.rng.gauss(0, 0.5), 3.0 * math.exp(self.rng.gauss(0, 0.4))]
        promoted = True
        for rung, steps in enumerate(self.asha.rungs[:-1]):
            record = {f"rung_{rung}": {"step": steps, "values": values}}  # written with the values, as execute_trial does
            promoted = timed("MO-ASHA", lambda r=rung, a=record: self.asha.decide(trial, r, values, also=a)).promote
            self._comparison(lambda r=rung: self._time_full_sort(trial.number, r, values, ms))
            if not promoted:
                break
        timed("heartbeat", lambda: heartbeat.__exit__(None, None, None))
        metrics = {"psnr": values[0], "ssim": 0.8, "latency_ms": values[1], "macs": count.macs,
                   "params": count.params, "params_deploy": count.params_deploy, **device.metrics}
        outcome = TrialOutcome(status="complete" if promoted else "pruned", values=values if promoted else None,
                               metrics=metrics, seconds={"train": 5.0, "eval": 0.5, "profile": 0.2},
                               steps_done=fidelity.max_steps if promoted else fidelity.min_steps)

        def record() -> None:
            trial.set_user_attr(LATENCY_SOURCES_ATTR, device.sources)
            record_outcome(study, trial, outcome, wall_seconds=5.7)

        timed("record", record)
        timed("trials.csv", lambda: refresh_trials_table(study, self.folder))
        return ms

    def _time_whole_history_tpe(self, frozen: optuna.trial.FrozenTrial, ms: dict[str, float]) -> None:
        """Optuna's TPE over the whole history, asked for the same trial (not part of the loop)."""
        tpe = self.whole_history_tpe
        start = time.perf_counter()
        space = tpe.infer_relative_search_space(self.study, frozen)
        relative = tpe.sample_relative(self.study, frozen, space)
        for name, distribution in frozen.distributions.items():
            if name not in relative:
                tpe.sample_independent(self.study, frozen, name, distribution)
        ms["TPE whole history"] += (time.perf_counter() - start) * 1e3

    def _time_full_sort(self, number: int, rung: int, values: list[float], ms: dict[str, float]) -> None:
        """What MO-ASHA's decision did before it kept the rung (besides its two writes): read every
        trial's rung value and sort the whole rung (tests/test_asha_ranking.py keeps that ranking)."""
        from ehrsr.search.asha import rung_values
        from tests.test_asha_ranking import quadratic_decision

        start = time.perf_counter()
        quadratic_decision(self.asha, values, rung_values(self.study, rung, exclude_trial=number), rung)
        ms["MO-ASHA full sort"] += (time.perf_counter() - start) * 1e3

    def _cover(self, config: Any) -> None:
        """Give the synthetic latency model any unit the space enumeration missed (untimed)."""
        for _, model, target in self.devices:
            for key in model.predict(config, target.input_hw).missing_units:
                model.units[key] = {"latency_ms": 1.0}


class StatementCounter:
    """SQL statements sent by an RDB storage (SQLite, PostgreSQL): each is a round trip to the
    database, whatever the machine's load. ``round_trip_ms``: the median of ``SELECT 1``."""

    def __init__(self, study: optuna.Study) -> None:
        from ehrsr.study_schema import study_storage

        storage = study_storage(study)
        self.engine = getattr(getattr(storage, "_backend", storage), "engine", None)  # None: not an RDB
        self.count = 0
        self.optuna_protocol = 0  # of them, sent by Optuna's own ask, suggestions or tell (not its sampler)
        if self.engine is not None:
            import sqlalchemy

            sqlalchemy.event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1
        frame = sys._getframe(1)
        while frame is not None:  # innermost first: the sampler runs inside ask and the suggestions
            code = frame.f_code
            if code.co_name == "_timed" and code.co_filename == __file__:
                break  # the sampler's own reads
            if code.co_name in ("ask", "_suggest", "tell") and "/optuna/" in code.co_filename:
                self.optuna_protocol += 1
                break
            frame = frame.f_back

    def round_trip_ms(self, repeats: int = 50) -> float | None:
        if self.engine is None:
            return None
        import sqlalchemy

        times = []
        with self.engine.connect() as connection:
            for _ in range(repeats):
                start = time.perf_counter()
                connection.execute(sqlalchemy.text("SELECT 1")).fetchall()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def measure(worker: Worker, n_trials: int, statements: StatementCounter) -> dict[str, float]:
    runs = []
    counts = []
    optuna_counts = []
    for _ in range(n_trials):
        before, optuna_before = statements.count, statements.optuna_protocol
        runs.append(worker.trial())  # the statements of the whole-history TPE and full sort are not counted:
        counts.append(statements.count - before - worker.uncounted_statements)
        optuna_counts.append(statements.optuna_protocol - optuna_before)
    medians = {group: statistics.median(run.get(group, 0) for run in runs) for group in runs[-1]}
    totals = [sum(run[g] for g in SUITE) for run in runs]
    medians["suite total"] = statistics.median(totals)
    medians["suite mean"] = statistics.fmean(totals)  # paced work (trials.csv) shows here
    medians["suite max"] = max(totals)
    medians["SQL statements"] = statistics.median(counts) if statements.engine is not None else float("nan")
    medians["Optuna SQL"] = statistics.median(optuna_counts) if statements.engine is not None else float("nan")
    return medians


def main(argv: list[str] | None = None) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.simplefilter("ignore", FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="finished trials in the study when measuring")
    parser.add_argument("--trials", type=int, default=20, help="trials measured at each size")
    parser.add_argument("--backends", default="sqlite,journal,postgresql")
    parser.add_argument("--profile-size", type=int, default=64,
                        help="LR side of the MAC count and the latency model's input (cost here does not depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="the same code at the smallest size: 20 finished trials, 2 measured, SQLite and journal")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.trials, args.backends = "20", 2, "sqlite,journal"
    sizes = sorted(int(s) for s in args.sizes.split(","))
    backends = args.backends.split(",")
    from ehrsr.search.sampler_history import TPE_HISTORY_LIMIT
    from ehrsr.search.space import load_space

    space = load_space("tiny")
    shape = (1, 3, args.profile_size, args.profile_size)
    print(f"search overhead per trial (ms, median of {args.trials} trials per size), tiny space, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; sampler: TPE, "
          f"bounded history beyond {TPE_HISTORY_LIMIT} finished trials", flush=True)
    t0 = time.perf_counter()
    history = synthetic_history(space, sizes[-1], seed=args.seed)
    devices = synthetic_device(space, shape[-2:], patience=50 if args.smoke else 500)
    print(f"  {len(history)} synthetic trials and a latency model of {len(devices[0][1].units)} units "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    statement_rows = []
    with postgres_if_wanted(backends) as server, tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            url = storage_url(backend, f"overhead_{backend}", tmp, server)
            filled = 0
            study = None
            for size in sizes:
                t0 = time.perf_counter()
                if study is None:
                    study = create_filled_study(url, history[:size])
                    worker = Worker(study, space, Path(tmp) / backend, shape, devices, args.seed)
                    worker.statements = statements = StatementCounter(study)
                else:
                    study.add_trials(history[filled:size])
                filled = size
                fill_s = time.perf_counter() - t0
                settle(study)  # after thousands of rows at once, as autovacuum would
                n_finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
                m = measure(worker, args.trials, statements)
                round_trip = statements.round_trip_ms()
                if statements.engine is not None:
                    statement_rows.append([backend, n_finished, *(m.get(f"{g} SQL", 0) for g in SUITE),
                                           m["SQL statements"]])
                rows.append([backend, n_finished, *(m[g] for g in SUITE), m["suite total"], m["suite mean"],
                             m["suite max"], m["SQL statements"], m["Optuna SQL"], round_trip if round_trip is not None else "-",
                             m["sampler"], m["TPE whole history"], m["MO-ASHA full sort"], fill_s])
                print(f"  {backend} {n_finished} finished: suite {m['suite total']:.1f} ms, sampler "
                      f"{m['sampler']:.1f} ms, TPE whole history {m['TPE whole history']:.1f} ms "
                      f"(filled in {fill_s:.1f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    print_table(["storage", "finished", *SUITE, "suite total", "suite mean", "suite max", "SQL statements",
                 "of them Optuna's ask/tell (sampler aside)", "SELECT 1 ms", "sampler", "TPE whole history", "MO-ASHA full sort", "fill s"], rows,
                title=f"ms per trial (medians; 'suite mean' and 'suite max': mean and slowest trial), load "
                      f"average {os.getloadavg()[0]:.1f} at the end")
    if statement_rows:
        print_table(["storage", "finished", *SUITE, "all"], statement_rows,
                    title="SQL statements per trial (medians; 'ask + start' includes the sampler's reads)")


if __name__ == "__main__":
    main()
