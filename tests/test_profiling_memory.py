"""Peak memory: the CPU allocator-event measurement against known tensor sizes, growth with the
input, and the CUDA code path driven through stand-ins for the allocator statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrsr.profiling import measure_peak_memory
from ehrsr.profiling import memory as memory_module

MIB = 2**20


class Allocates(nn.Module):
    """Allocates exactly known float32 tensors: a (C, H, W) activation, then an output of the same size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.empty(x.shape[0], 64, *x.shape[2:])  # 64 channels
        hidden.fill_(1.0)
        return hidden[:, :3] + x  # output (B, 3, H, W) while hidden is still alive


def test_cpu_peak_matches_the_tensors_the_pass_allocates() -> None:
    x = torch.rand(1, 3, 64, 64)
    result = measure_peak_memory(Allocates(), x)
    expected = (64 + 3) * 64 * 64 * 4  # hidden and output live together
    assert result.peak_memory_mb * MIB == pytest.approx(expected, rel=0.02)
    # the total adds what was live before: here only the input (no parameters)
    assert (result.peak_memory_total_mb - result.peak_memory_mb) * MIB == x.numel() * 4
    assert result.method == memory_module.CPU_METHOD


def test_cpu_peak_grows_with_the_input_size() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 3, 3, padding=1)).eval()
    peaks = [measure_peak_memory(model, torch.rand(1, 3, s, s)).peak_memory_mb for s in (32, 64, 128)]
    assert peaks[0] < peaks[1] < peaks[2]
    # activations scale with the area: 4x per doubling of the side (allow for small fixed buffers)
    assert peaks[2] / peaks[1] == pytest.approx(4.0, rel=0.25)
    # at least one 32-channel float32 feature map is alive at the peak
    assert peaks[2] * MIB >= 32 * 128 * 128 * 4


def test_cpu_peak_counts_parameters_in_the_total_only() -> None:
    model = nn.Linear(256, 256)  # 257 KiB of weights
    x = torch.rand(8, 256)
    result = measure_peak_memory(model, x)
    held = sum(p.numel() for p in model.parameters()) * 4 + x.numel() * 4
    assert (result.peak_memory_total_mb - result.peak_memory_mb) * MIB == held
    assert result.peak_memory_mb * MIB == pytest.approx(8 * 256 * 4, rel=0.05)  # the output


def test_cuda_path_reads_the_allocator_statistics_in_order(monkeypatch) -> None:
    """The GPU branch on stand-ins: peak = max_memory_allocated - memory_allocated before the pass."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: log.append("allocated") or 10 * MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: log.append("max") or 35 * MIB)

    class Probe(nn.Module):
        def forward(self, x):
            log.append(f"forward benchmark={torch.backends.cudnn.benchmark}")
            return x

    before = torch.backends.cudnn.benchmark
    result = memory_module._cuda_peak(Probe(), torch.rand(2), torch.float32)
    # same cuDNN autotuning as the timed passes, restored afterwards
    assert log == ["synchronize", "reset", "allocated", "forward benchmark=True", "synchronize", "max"]
    assert torch.backends.cudnn.benchmark == before
    assert (result.peak_memory_mb, result.peak_memory_total_mb) == (25.0, 35.0)
    assert result.method == memory_module.CUDA_METHOD


def test_stderr_is_restored_after_the_quiet_window(capfd) -> None:
    import os

    with memory_module._quiet_stderr():
        os.write(2, b"hidden\n")
    os.write(2, b"visible\n")
    captured = capfd.readouterr()
    assert "visible" in captured.err and "hidden" not in captured.err
