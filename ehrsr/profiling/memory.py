"""Peak memory of one inference pass, in MiB (2**20 bytes).

Both devices report the same two numbers:

* ``peak_memory_mb``: the most memory allocated at any moment of the pass beyond what was allocated
  just before it (the weights and the input): activations, workspaces, the output.
* ``peak_memory_total_mb``: that plus what was allocated before, for reference.

How:

* **GPU**: ``torch.cuda.reset_peak_memory_stats``, one pass, ``torch.cuda.max_memory_allocated``
  minus ``torch.cuda.memory_allocated`` read before the pass. This is the caching allocator's
  allocated (not reserved) memory; cuDNN / cuBLAS workspaces taken through it are included.
* **CPU**: PyTorch's CPU allocator does not keep peak statistics, so the pass runs once under
  ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of the
  CPU allocator with its size and time. The running sum of those events, in time order, is the live
  memory allocated during the pass; its maximum is ``peak_memory_mb``. The total adds the bytes of
  the model's parameters and buffers and of the input. Memory that libraries allocate outside
  PyTorch's allocator (oneDNN primitive caches, MKL / pocketfft plans, the Python interpreter) is not
  seen; no resident-set-size number is used because the C allocator keeps freed pages mapped, so RSS
  after warm-up passes hides the pass's own peak.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ehrsr.profiling.latency import autocast_context, cudnn_benchmark, parse_dtype

__all__ = ["CPU_METHOD", "CUDA_METHOD", "PeakMemory", "measure_peak_memory"]

MIB = 2**20
CUDA_METHOD = "cuda allocator: max_memory_allocated during one pass minus memory_allocated before it"
CPU_METHOD = (
    "cpu allocator events (torch.profiler, profile_memory=True): peak of live bytes allocated "
    "during one pass; the total adds parameters, buffers and input"
)


@dataclass(frozen=True)
class PeakMemory:
    peak_memory_mb: float  # beyond what was allocated before the pass (MiB)
    peak_memory_total_mb: float  # including it (MiB)
    method: str  # how it was measured (``CUDA_METHOD`` or ``CPU_METHOD``)


def measure_peak_memory(
    model: nn.Module, inputs: torch.Tensor, dtype: str | torch.dtype = "float32"
) -> PeakMemory:
    """Peak memory of ``model(inputs)`` on the inputs' device, under ``torch.inference_mode()``.

    Run it after a warm-up (``measure_latency``) so one-time allocations of the first pass (cuDNN
    autotuning, lazily built caches) do not count.
    """
    _, torch_dtype = parse_dtype(dtype)
    device = inputs.device
    with torch.inference_mode():
        if device.type == "cuda":
            return _cuda_peak(model, inputs, torch_dtype)
        return _cpu_peak(model, inputs, torch_dtype)


def _cuda_peak(model: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> PeakMemory:
    torch.cuda.synchronize(inputs.device)
    torch.cuda.reset_peak_memory_stats(inputs.device)
    before = torch.cuda.memory_allocated(inputs.device)
    # the same cuDNN algorithms (and workspaces) as the timed passes
    with cudnn_benchmark(), autocast_context("cuda", dtype):
        output = model(inputs)
    torch.cuda.synchronize(inputs.device)
    peak = torch.cuda.max_memory_allocated(inputs.device)
    del output
    return PeakMemory((peak - before) / MIB, peak / MIB, CUDA_METHOD)


def _cpu_peak(model: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> PeakMemory:
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # fd 2 is silenced for the whole window: see _quiet_stderr
    with _quiet_stderr(), profiler:
        with autocast_context("cpu", dtype):
            output = model(inputs)
        del output  # freed inside the window: its allocation still counts towards the peak
    peak = _peak_live_bytes(profiler)
    resident = _bytes_of(model, inputs)
    return PeakMemory(peak / MIB, (peak + resident) / MIB, CPU_METHOD)


def _peak_live_bytes(profiler: object) -> int:
    """Maximum running sum of the CPU allocator's allocation (+) and free (-) events, in time order."""
    events = [
        e
        for e in profiler.profiler.kineto_results.events()  # type: ignore[attr-defined]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _bytes_of(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes held before the pass: unique storages of parameters, buffers and the input."""
    storages: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers(), inputs):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 during the profiled pass.

    libkineto prints start/stop banners and, on machines without a GPU, a "gpuGetDeviceCount failed"
    error straight to fd 2 on every profile, and c10 warns once per process that a block allocated
    before the window was freed inside it (a cached tensor the model replaces; it only means that
    free is not subtracted). A search profiles hundreds of models. The pass is one more forward of
    a model that has already run unsilenced many times (latency passes), so no warning of its own
    is lost; Python exceptions are unaffected.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
