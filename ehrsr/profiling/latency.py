"""Latency of one inference pass: warm-up passes, then the median and spread of timed passes.

Follows PLKSR's benchmark harness in spirit (Lee et al. 2024: 100 warm-up passes, 100 timed
passes) rather than the NTIRE ESR script (each image timed once, no warm-up): the median of many
warm passes is stable enough to rank models, and its 10th / 90th percentiles show the noise.

* GPU: ``torch.backends.cudnn.benchmark = True`` (restored afterwards), CUDA events recorded
  around each pass and synchronised before reading them, optional autocast to float16 / bfloat16.
* CPU: a fixed ``torch.set_num_threads(threads)`` (restored afterwards), ``time.perf_counter``
  around each pass.

Both run under ``torch.inference_mode()``. Defaults scale down automatically (``plan_passes``):
one cold pass and one calibration pass estimate the time per pass; then warm-up and timed passes
are chosen to fill a time budget (1.0 s of timed passes, plus a quarter of that warming up), 5 to 100
timed passes and up to 100 warm-ups. A 5 ms model gets 50 warm-ups and 100 timed passes (0.75 s); a
model that takes 300 ms per pass gets 2 warm-ups and 5 timed passes (about 2 s). As a single
calibration pass can mislead on a busy machine, an automatic plan also stops at twice its budget
(after at least 5 timed passes). Explicit ``warmup`` / ``repeats`` are always honoured exactly.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "CudaEventClock",
    "LatencyStats",
    "PassPlan",
    "PerfCounterClock",
    "cpu_name",
    "cpu_threads",
    "cudnn_benchmark",
    "device_name",
    "measure_latency",
    "parse_device",
    "parse_dtype",
    "plan_passes",
    "resolve_budget",
    "run_timed",
]

MAX_WARMUP = 100  # PLKSR's harness
MAX_REPEATS = 100  # PLKSR's harness
MIN_REPEATS = 5  # fewer timed passes make the 10th / 90th percentiles meaningless
CALIBRATION_PASSES = 2  # one cold pass (lazy initialisation, cuDNN autotuning), one to estimate
BUDGET_S = {"cpu": 1.0, "cuda": 1.0}  # seconds of timed passes the automatic plan aims for
WARMUP_SHARE = 0.25  # warm-up time as a share of the timed budget
OVERRUN = 2.0  # an automatic plan stops at twice its budget when the calibration was optimistic

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LatencyStats:
    """Timing of ``repeats`` passes after ``warmup`` untimed ones (milliseconds)."""

    latency_ms: float  # median
    latency_ms_p10: float
    latency_ms_p90: float
    samples_ms: tuple[float, ...]  # every timed pass, in order
    warmup: int  # untimed passes actually run (calibration passes included)
    repeats: int  # timed passes
    dtype: str
    device: str  # readable device name (GPU model, or CPU model and threads)


@dataclass(frozen=True)
class PassPlan:
    warmup: int
    repeats: int


def parse_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    """('float32' | 'float16' | 'bfloat16', torch dtype); anything else raises ``ValueError``."""
    if isinstance(dtype, torch.dtype):
        for _name, value in _DTYPES.items():
            if value == dtype:
                return _canonical(value), value
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        value = _DTYPES[dtype.lower()]
        return _canonical(value), value
    raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")


def _canonical(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """A CPU or an available CUDA device; anything else raises ``ValueError`` naming the problem."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch.cuda.is_available() is False)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        dev = torch.device("cuda", index)
    return dev


def resolve_budget(device_type: str, budget_s: float | None) -> float:
    """Seconds of timed passes an automatic plan aims for: ``budget_s``, or the device's default.

    Raises ``ValueError`` unless ``budget_s`` is None or a positive finite number.
    """
    if budget_s is None:
        return BUDGET_S[device_type]
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not 0 < budget_s < math.inf:
        raise ValueError(f"the latency budget must be a positive number of seconds or None, got {budget_s!r}")
    return float(budget_s)


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} or None (automatic), got {value!r}")


def plan_passes(
    pass_ms: float,
    device_type: str,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> PassPlan:
    """Warm-up and timed passes for a model that takes ``pass_ms`` per pass (see module docstring).

    Explicit ``warmup`` / ``repeats`` win; the warm-up count includes the calibration passes.
    ``budget_s``: seconds of timed passes to aim for (default ``BUDGET_S`` of the device type).
    """
    budget_ms = 1000.0 * resolve_budget(device_type, budget_s)
    pass_ms = max(pass_ms, 1e-3)
    if repeats is None:
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, math.floor(budget_ms / pass_ms)))
    if warmup is None:
        warmup = min(MAX_WARMUP, max(CALIBRATION_PASSES, math.floor(WARMUP_SHARE * budget_ms / pass_ms)))
    return PassPlan(warmup=warmup, repeats=repeats)


def cpu_name() -> str:
    """This machine's CPU model (as latency model files record the hardware)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device, threads: int | None = None) -> str:
    """A readable name: the GPU model for CUDA, the CPU model and thread count for the CPU."""
    dev = parse_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (cuda:{dev.index})"
    n = threads if threads is not None else torch.get_num_threads()
    return f"{cpu_name()} ({n} thread{'s' if n != 1 else ''})"


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """``torch.set_num_threads(threads)`` for the duration (None: leave as is); restored afterwards."""
    _check_count("threads", threads, 1)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` for the duration; the previous value is restored."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithm for these shapes
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def autocast_context(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (weights stay float32); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class PerfCounterClock:
    """Wall-clock time of a CPU pass."""

    def time_ms(self, run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return 1000.0 * (time.perf_counter() - start)


class CudaEventClock:
    """GPU time of a pass between two CUDA events; the end event is synchronised before reading.

    ``event_factory`` / ``synchronize`` default to ``torch.cuda.Event`` / ``torch.cuda.synchronize``
    (injectable so the control flow can be tested on a machine without a GPU).
    """

    def __init__(
        self,
        device: torch.device,
        event_factory: Callable[..., object] | None = None,
        synchronize: Callable[[torch.device], None] | None = None,
    ) -> None:
        self.device = device
        self.event_factory = event_factory or torch.cuda.Event
        self.synchronize = synchronize or torch.cuda.synchronize

    def time_ms(self, run: Callable[[], object]) -> float:
        start = self.event_factory(enable_timing=True)
        end = self.event_factory(enable_timing=True)
        self.synchronize(self.device)  # nothing queued before the start event
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


def run_timed(
    run: Callable[[], object],
    clock: PerfCounterClock | CudaEventClock,
    device_type: str,
    warmup: int | None,
    repeats: int | None,
    budget_s: float | None = None,
) -> tuple[list[float], int, int]:
    """Warm up, time; returns (samples in ms, warm-up passes run, timed passes run).

    Explicit counts are always honoured. Automatic counts come from the calibration estimate; as
    one estimate can be far off on a busy machine, an automatic count also stops at a deadline of
    ``OVERRUN`` times its share of the budget (timing stops only once ``MIN_REPEATS`` are done).
    """
    budget_s = resolve_budget(device_type, budget_s)
    warmup_deadline = repeats_deadline = math.inf
    done = 0
    if warmup is None or repeats is None:
        clock.time_ms(run)  # cold pass: lazy initialisation, allocator growth, cuDNN autotuning
        estimate = clock.time_ms(run)
        done = CALIBRATION_PASSES
        plan = plan_passes(estimate, device_type, warmup, repeats, budget_s)
        if warmup is None:
            warmup_deadline = time.perf_counter() + OVERRUN * WARMUP_SHARE * budget_s
        if repeats is None:
            repeats_deadline = OVERRUN * budget_s  # relative: starts with the timed passes
        warmup = max(plan.warmup, done)
        repeats = plan.repeats
    while done < warmup and time.perf_counter() < warmup_deadline:
        clock.time_ms(run)
        done += 1
    samples: list[float] = []
    stop = time.perf_counter() + repeats_deadline
    while len(samples) < repeats:
        samples.append(clock.time_ms(run))
        if len(samples) >= MIN_REPEATS and time.perf_counter() > stop:
            break
    return samples, done, len(samples)


def measure_latency(
    model: nn.Module,
    inputs: torch.Tensor,
    dtype: str | torch.dtype = "float32",
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    budget_s: float | None = None,
) -> LatencyStats:
    """Time ``model(inputs)`` on the inputs' device (the model must already be there, in eval mode).

    ``dtype`` float16 / bfloat16 runs under autocast. ``warmup`` / ``repeats`` None: automatic
    (module docstring), aiming at ``budget_s`` seconds of timed passes (default ``BUDGET_S``; the
    search uses less, see ``ehrsr.search``). ``threads`` applies to the CPU only (None: the
    current setting).
    """
    resolve_budget(inputs.device.type, budget_s)  # validate before running anything
    dtype_name, torch_dtype = parse_dtype(dtype)
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    device = inputs.device
    _check_model_device(model, device)

    def run() -> object:
        with autocast_context(device.type, torch_dtype):
            return model(inputs)

    with torch.inference_mode():
        if device.type == "cuda":
            with cudnn_benchmark():
                samples, warmup_done, repeats_done = run_timed(run, CudaEventClock(device), "cuda", warmup, repeats, budget_s)
            name = device_name(device)
        else:
            with cpu_threads(threads) as n_threads:
                samples, warmup_done, repeats_done = run_timed(run, PerfCounterClock(), "cpu", warmup, repeats, budget_s)
            name = device_name(device, n_threads)
    return stats_from_samples(samples, warmup_done, repeats_done, dtype_name, name)


def stats_from_samples(samples: Sequence[float], warmup: int, repeats: int, dtype: str, device: str) -> LatencyStats:
    """``LatencyStats`` of timed passes: the median with its 10th/90th percentiles."""
    p10, median, p90 = (float(v) for v in np.percentile(samples, [10, 50, 90]))
    return LatencyStats(
        latency_ms=median,
        latency_ms_p10=p10,
        latency_ms_p90=p90,
        samples_ms=tuple(samples),
        warmup=warmup,
        repeats=repeats,
        dtype=dtype,
        device=device,
    )


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    """The model's first parameter (or buffer) must be on the inputs' device."""
    first = next(iter((*model.parameters(), *model.buffers())), None)
    if first is None:
        return
    same_index = device.index is None or first.device.index in (None, device.index)
    if first.device.type != device.type or not same_index:
        raise ValueError(
            f"{type(model).__name__} has tensors on {first.device} but the input is on {device}; "
            "move the model first (profile_model does this for you)"
        )
