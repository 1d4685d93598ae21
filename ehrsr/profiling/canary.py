"""A canary for latency measurements taken on a machine that other work may be using.

A fixed small reference network (four 3x3 convolutions, 16 channels, 64x64, seeded weights) is
timed when a run starts, a few times, and its fastest mean time per pass is the *quiet* reference. Timing it
again next to a measurement (before a trial's timing, or every few units of a calibration) gives
the ratio ``now / quiet``: about 1 on an idle machine, clearly above 1 when other processes compete
for the cores or memory bandwidth. A measurement taken with a ratio above the threshold (1.3 by
default) is flagged and can be re-measured (``measure_with_canary``). The ratio is stored with the
measurement, so a report can say how busy the machine was. This is the idea of the "reference
workload" used by benchmark harnesses to detect noisy neighbours, applied to a single model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ehrsr.profiling.latency import measure_latency

__all__ = ["DEFAULT_THRESHOLD", "Canary", "CanaryReading", "measure_with_canary", "reference_network"]

DEFAULT_THRESHOLD = 1.3  # 30 % slower than quiet: more than the run-to-run noise of an idle CPU
CANARY_BUDGET_S = 0.05  # seconds of timed passes per reading: about 20 passes of a ~2 ms network
QUIET_READINGS = 3  # the quiet reference is the fastest of this many readings

T = TypeVar("T")


def reference_network() -> nn.Module:
    """The fixed canary network: conv3x3-ReLU x 4 at 16 channels (seeded, eval mode)."""
    generator = torch.Generator().manual_seed(1234)
    layers: list[nn.Module] = []
    channels = [3, 16, 16, 16, 3]
    for c_in, c_out in itertools.pairwise(channels):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
            conv.bias.zero_()
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@dataclass(frozen=True)
class CanaryReading:
    """One timing of the canary: its mean pass time, the ratio to the quiet reference, and the verdict."""

    latency_ms: float
    quiet_ms: float
    ratio: float
    contended: bool


class Canary:
    """Times the reference network with ``threads`` CPU threads; ``calibrate`` first, then ``check``."""

    def __init__(self, threads: int | None = 1, *, threshold: float = DEFAULT_THRESHOLD, size: int = 64,
                 budget_s: float = CANARY_BUDGET_S) -> None:
        if not threshold > 1:
            raise ValueError(f"the canary threshold must be a ratio above 1, got {threshold!r}")
        self.threads = threads
        self.threshold = threshold
        self.budget_s = budget_s
        self.network = reference_network()
        self.inputs = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
        self.quiet_ms: float | None = None

    def time_ms(self) -> float:
        """Mean time per pass of the reference network over a short run of timed passes.

        The mean, not the protocol's median: a pass shorter than a scheduler time slice is often
        not interrupted at all, so the median of a contended run stays near the quiet value while
        the preempted passes only show in the tail. The mean counts them.
        """
        stats = measure_latency(self.network, self.inputs, threads=self.threads, budget_s=self.budget_s)
        return float(sum(stats.samples_ms) / len(stats.samples_ms))

    def calibrate(self, readings: int = QUIET_READINGS) -> float:
        """Set and return the quiet reference: the fastest of ``readings`` readings."""
        self.quiet_ms = min(self.time_ms() for _ in range(readings))
        return self.quiet_ms

    def check(self) -> CanaryReading:
        """Time the canary now and compare it with the quiet reference (calibrates on first use)."""
        if self.quiet_ms is None:
            self.calibrate()
        assert self.quiet_ms is not None
        now = self.time_ms()
        ratio = now / self.quiet_ms
        return CanaryReading(now, self.quiet_ms, ratio, ratio > self.threshold)


def measure_with_canary(
    measure: Callable[[], T], canary: Canary, *, retries: int = 2
) -> tuple[T, CanaryReading, int]:
    """Run ``measure()`` right after a canary reading; while the reading says the machine is busy,
    measure again (at most ``retries`` more times). Returns the result taken with the lowest ratio,
    that reading, and how many measurements were made; a reading still ``contended`` tells the
    caller to record the measurement as taken under contention."""
    best: tuple[T, CanaryReading] | None = None
    attempts = 0
    for _ in range(retries + 1):
        reading = canary.check()
        result = measure()
        attempts += 1
        if best is None or reading.ratio < best[1].ratio:
            best = (result, reading)
        if not reading.contended:
            break
    assert best is not None
    return best[0], best[1], attempts
