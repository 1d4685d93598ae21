"""benchmarks/gpu_check.py on a machine without CUDA, and its pieces that need no GPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check
from ehrsr.search.space import load_space


def test_without_cuda_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no CUDA device" in captured.err


def test_a_failing_section_becomes_a_fail_row() -> None:
    def broken() -> list:
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    rows = gpu_check.run_section("selective scan", broken)
    assert rows == [["selective scan", "", "FAIL: RuntimeError: CUDA error: an illegal memory access"]]
    assert gpu_check.run_section("ok", lambda: [["a", "b", "ok"]]) == [["a", "b", "ok"]]


def test_short_full_space_keeps_the_full_parameters(tmp_path) -> None:
    full = load_space("full")
    short = load_space(str(gpu_check.short_space(tmp_path)))
    assert short.fidelity.max_steps == 60 and short.fidelity.patch_size == 32
    assert short.fidelity.max_steps < full.fidelity.max_steps
    assert short.distributions == full.distributions
