"""The canary notices a busy machine, and measurements taken under contention are re-measured."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ehrsr.profiling.canary import Canary, CanaryReading, measure_with_canary

BUSY_LOOP = "import time\nprint('ready', flush=True)\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


def test_canary_ratio_rises_under_artificial_cpu_load():
    canary = Canary(threads=1, budget_s=0.03)
    quiet_ms = canary.calibrate()
    before = canary.check()
    # several busy loops per core: the canary's thread gets a small share of a core whatever else runs
    n_busy = 6 * (os.cpu_count() or 1)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True) for _ in range(n_busy)]
    try:
        for process in busy:  # every loop is running before the canary is read
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        loaded = canary.check()
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()
    assert quiet_ms > 0 and loaded.quiet_ms == quiet_ms
    assert loaded.contended and loaded.ratio > canary.threshold
    assert loaded.ratio > before.ratio + 0.25


def test_contended_measurement_is_measured_again():
    class Scripted(Canary):
        def __init__(self, ratios: list[float]) -> None:
            super().__init__()
            self.ratios = ratios

        def check(self) -> CanaryReading:
            ratio = self.ratios.pop(0)
            return CanaryReading(ratio, 1.0, ratio, ratio > self.threshold)

    calls = []
    result, reading, attempts = measure_with_canary(lambda: calls.append(1) or len(calls), Scripted([2.0, 1.1, 5.0]))
    assert (result, reading.ratio, attempts) == (2, 1.1, 2)  # the second, quiet measurement is kept
    result, reading, attempts = measure_with_canary(lambda: 7, Scripted([2.0, 1.8, 1.9]), retries=2)
    assert reading.contended and reading.ratio == 1.8 and attempts == 3  # still busy: flagged, best kept


def test_threshold_must_be_a_ratio_above_one():
    with pytest.raises(ValueError, match="above 1"):
        Canary(threshold=0.9)
