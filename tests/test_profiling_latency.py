"""Latency measurement: statistics, pass counts, thread handling, the automatic plan and the CUDA
code path (exercised with stand-in events on machines without a GPU). No wall-clock assertions."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from ehrsr.profiling import cpu_threads, device_name, measure_latency, plan_passes
from ehrsr.profiling import latency as latency_module


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1)).eval()


def test_statistics_are_ordered_and_repeats_honoured() -> None:
    stats = measure_latency(_small_model(), torch.rand(1, 3, 16, 16), warmup=3, repeats=7)
    assert stats.repeats == 7 and len(stats.samples_ms) == 7
    assert stats.warmup == 3
    assert all(s > 0 for s in stats.samples_ms)
    assert stats.latency_ms_p10 <= stats.latency_ms <= stats.latency_ms_p90
    assert min(stats.samples_ms) <= stats.latency_ms_p10 and stats.latency_ms_p90 <= max(stats.samples_ms)
    ordered = sorted(stats.samples_ms)
    assert stats.latency_ms == pytest.approx(ordered[3])  # median of 7
    assert stats.dtype == "float32"


def test_warmup_and_timed_passes_are_counted_exactly() -> None:
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(torch.is_inference_mode_enabled())
            return x * 2

    stats = measure_latency(Counting(), torch.rand(4), warmup=4, repeats=6)
    assert len(calls) == 4 + 6
    assert all(calls)  # every pass under torch.inference_mode()
    assert (stats.warmup, stats.repeats) == (4, 6)


def test_automatic_plan_scales_with_pass_time() -> None:
    fast = plan_passes(0.5, "cpu")
    assert (fast.warmup, fast.repeats) == (latency_module.MAX_WARMUP, latency_module.MAX_REPEATS)
    slow = plan_passes(300.0, "cpu")  # 1.0 s budget / 300 ms = 3 -> at least 5 timed; 2 warm-up
    assert (slow.warmup, slow.repeats) == (latency_module.CALIBRATION_PASSES, 5)
    very_slow = plan_passes(5000.0, "cpu")
    assert very_slow.repeats == latency_module.MIN_REPEATS  # never fewer than 5 timed passes
    middle = plan_passes(50.0, "cuda")  # 1.0 s budget on GPU: 20 timed, 5 warm-up
    assert (middle.warmup, middle.repeats) == (5, 20)
    assert plan_passes(50.0, "cpu", warmup=0, repeats=3) == latency_module.PassPlan(0, 3)


def test_automatic_defaults_run_calibration_then_the_plan() -> None:
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x + 1

    stats = measure_latency(Counting(), torch.rand(4))
    # a microsecond model: 100 warm-up passes (the 2 calibration passes among them), 100 timed
    assert stats.warmup == latency_module.MAX_WARMUP and stats.repeats == latency_module.MAX_REPEATS
    assert len(calls) == stats.warmup + stats.repeats


def test_automatic_plan_stops_at_its_deadline_but_explicit_counts_do_not(monkeypatch) -> None:
    """A calibration that was far too optimistic: the 2nd pass is fast, later ones are slow."""
    clock = {"now": 0.0}
    durations = iter([1.0, 0.001] + [0.5] * 1000)  # seconds per pass

    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock["now"])

    def run() -> None:
        clock["now"] += next(durations)

    samples, warmup, repeats = latency_module.run_timed(run, latency_module.PerfCounterClock(), "cpu", None, None)
    # plan: 100 / 100 from a 1 ms estimate; reality 500 ms per pass. Warm-up stops at its
    # deadline (2 x 0.25 s: one 0.5 s pass), timing at 2 x 1.0 s, here after the 5 passes it must do
    assert latency_module.BUDGET_S["cpu"] == 1.0 and latency_module.OVERRUN == 2.0
    assert warmup == latency_module.CALIBRATION_PASSES + 1
    assert repeats == len(samples) == 5
    assert samples[-1] == pytest.approx(500.0)

    durations = iter([0.5] * 1000)
    samples, warmup, repeats = latency_module.run_timed(run, latency_module.PerfCounterClock(), "cpu", 3, 12)
    assert (warmup, repeats, len(samples)) == (3, 12, 12)


def test_threads_are_set_during_and_restored_after() -> None:
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    stats = measure_latency(Probe(), torch.rand(2), warmup=1, repeats=2, threads=1)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
    assert stats.device.endswith("(1 thread)")
    with cpu_threads(None) as n:
        assert n == before


def test_bfloat16_runs_under_cpu_autocast() -> None:
    dtypes = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            y = self.linear(x)
            dtypes.append(y.dtype)
            return y

    stats = measure_latency(Probe(), torch.rand(2, 4), dtype="bf16", warmup=0, repeats=2)
    assert stats.dtype == "bfloat16"
    assert set(dtypes) == {torch.bfloat16}  # autocast ran the linear in bfloat16


def test_channels_last_input_is_kept() -> None:
    formats = []

    class Probe(nn.Module):
        def forward(self, x):
            formats.append(x.is_contiguous(memory_format=torch.channels_last))
            return x

    x = torch.rand(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    measure_latency(Probe(), x, warmup=0, repeats=1)
    assert formats == [True]


class _FakeEvent:
    """Stands in for torch.cuda.Event: records the perf_counter time when recorded."""

    log: ClassVar[list[str]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t: float | None = None

    def record(self) -> None:
        import time

        self.t = time.perf_counter()
        _FakeEvent.log.append("record")

    def synchronize(self) -> None:
        _FakeEvent.log.append("event.synchronize")

    def elapsed_time(self, end: _FakeEvent) -> float:
        assert self.t is not None and end.t is not None, "elapsed_time before both events were recorded"
        return 1000.0 * (end.t - self.t)


def test_cuda_event_clock_records_around_each_pass_and_synchronises() -> None:
    _FakeEvent.log = []
    syncs = []
    clock = latency_module.CudaEventClock(
        torch.device("cpu"), event_factory=_FakeEvent, synchronize=lambda device: syncs.append(device)
    )
    ran = []
    samples, warmup, repeats = latency_module.run_timed(lambda: ran.append(1), clock, "cuda", 2, 3)
    assert (warmup, repeats) == (2, 3) and len(ran) == 5
    # per pass: device synchronize, start.record, run, end.record, end.synchronize
    assert _FakeEvent.log == ["record", "record", "event.synchronize"] * 5
    assert len(syncs) == 5
    assert all(s >= 0 for s in samples)


def test_cuda_requests_fail_clearly_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    with pytest.raises(ValueError, match="CUDA is not available"):
        device_name("cuda")
    with pytest.raises(ValueError, match="device must be"):
        device_name("tpu")


def test_device_name_reads_the_cpu_model_and_threads() -> None:
    name = device_name("cpu", threads=3)
    assert name.endswith("(3 threads)")
    assert len(name) > len(" (3 threads)")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "warmup"),
        ({"repeats": 0}, "repeats"),
        ({"threads": 0}, "threads"),
        ({"dtype": "int8"}, "dtype"),
        ({"repeats": 2.5}, "repeats"),
        ({"budget_s": 0}, "latency budget"),
        ({"budget_s": -1.0}, "latency budget"),
        ({"budget_s": float("inf")}, "latency budget"),
        ({"budget_s": True}, "latency budget"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        measure_latency(_small_model(), torch.rand(1, 3, 8, 8), **kwargs)


def test_model_on_another_device_than_the_input_is_rejected() -> None:
    class Meta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(2, device="meta"))

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="move the model first"):
        measure_latency(Meta(), torch.rand(2), warmup=0, repeats=1)


def test_automatic_timing_stops_at_twice_the_budget_after_the_minimum(monkeypatch) -> None:
    """Passes of 0.1 s after a 1 ms calibration: plan 100 timed, deadline 2 s -> 20 passes (+1)."""
    clock = {"now": 0.0}
    durations = iter([0.5, 0.001] + [0.1] * 1000)
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock["now"])

    def run() -> None:
        clock["now"] += next(durations)

    samples, warmup, repeats = latency_module.run_timed(run, latency_module.PerfCounterClock(), "cpu", 2, None)
    assert warmup == 2  # explicit: honoured (the calibration passes count towards it)
    assert 20 <= repeats == len(samples) <= 21


def test_a_smaller_budget_plans_fewer_passes_but_never_fewer_than_five() -> None:
    # the search's 0.25 s plan: a 40 ms model gets 6 timed passes (250 / 40) and the 2 calibration
    # passes as warm-up; the default 1 s plan gives it 25 timed and 6 warm-up
    assert plan_passes(40.0, "cpu", budget_s=0.25) == latency_module.PassPlan(2, 6)
    assert plan_passes(40.0, "cpu") == latency_module.PassPlan(6, 25)
    assert plan_passes(300.0, "cpu", budget_s=0.25).repeats == latency_module.MIN_REPEATS
    assert plan_passes(40.0, "cpu", warmup=1, repeats=9, budget_s=0.25) == latency_module.PassPlan(1, 9)


def test_budget_reaches_the_timing_loop_and_its_deadline(monkeypatch) -> None:
    """Passes of 50 ms: a 0.25 s budget times 5 of them; its deadline (2 x 0.25 s) cuts an
    optimistic plan after 10 timed passes where the default budget would allow 40."""
    clock = {"now": 0.0}
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock["now"])

    def run_with(durations):
        it = iter(durations)

        def run() -> None:
            clock["now"] += next(it)

        return run

    _, warmup, repeats = latency_module.run_timed(
        run_with([0.05] * 1000), latency_module.PerfCounterClock(), "cpu", None, None, 0.25)
    assert (warmup, repeats) == (2, 5)
    _, _, repeats = latency_module.run_timed(
        run_with([0.05, 0.001] + [0.05] * 1000), latency_module.PerfCounterClock(), "cpu", None, None, 0.25)
    assert 10 <= repeats <= 11
