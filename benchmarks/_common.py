"""Shared helpers of the benchmark scripts: argument parsing with ``--smoke``, median timers, the
machine's load and a plain-text table printer."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

SMOKE_HELP = ("run the real code path at the smallest size, in seconds (CI runs every benchmark so); "
              "its numbers mean nothing")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               smoke: Mapping[str, object]) -> argparse.Namespace:
    """Parse ``argv`` after adding ``--smoke``; with ``--smoke`` the defaults in ``smoke`` replace
    the script's own (a flag given explicitly still wins)."""
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(smoke) - dests)
    if unknown:
        raise ValueError(f"smoke defaults for options the parser does not have: {', '.join(unknown)}")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def machine_load() -> str:
    """The 1-minute load average against the cores, flagged when other jobs compete for them."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores" + (" (busy: timings are indicative)" if load > 0.75 * cores else "")


def median_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def paired_median_ms(
    fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 3, repeats: int = 21
) -> tuple[float, float]:
    """Medians of two functions timed alternately (a, b, a, b, ...), so that drift in the machine's
    speed (other processes, clock changes) hits both alike and their ratio stays meaningful."""
    t_a, t_b = interleaved_median_ms([fn_a, fn_b], warmup=warmup, repeats=repeats)
    return t_a, t_b


def interleaved_median_ms(
    fns: Sequence[Callable[[], object]], warmup: int = 3, repeats: int = 21,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """``paired_median_ms`` for any number of functions: one round times each once, in order.
    ``clock``: seconds; ``time.process_time`` times the process's CPU time (see ``cpu_clock``)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = clock()
            fn()
            fn_times.append((clock() - start) * 1e3)
    return [statistics.median(t) for t in times]


def cpu_clock(name: str, threads: int) -> Callable[[], float]:
    """The clock for ``--clock NAME``: ``wall`` (``time.perf_counter``) or ``cpu`` (the process's CPU
    time: with one thread, the compute time whatever else runs on a shared machine; as in
    docs/latency_models.md, refused for more threads, whose CPU times add up)."""
    if name == "wall":
        return time.perf_counter
    if threads != 1:
        raise SystemExit(f"--clock cpu needs --threads 1 (the CPU times of {threads} threads add up)")
    return time.process_time


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Markdown-style table (pastes straight into an issue note)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
