"""benchmarks/gpu_check.py on a machine without CUDA: its refusal, its pieces, and its rehearsal,
which runs every step of the GPU check on the CPU (the CUDA kernels aside) and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from ehrsr.search.space import load_space

ROOT = Path(__file__).resolve().parents[1]


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


def test_short_full_space_keeps_the_full_parameters(tmp_path: Path) -> None:
    full = load_space("full")
    short = load_space(str(gpu_check.short_space(tmp_path)))
    assert short.fidelity.max_steps == 60 and short.fidelity.patch_size == 32
    assert short.fidelity.max_steps < full.fidelity.max_steps
    assert short.distributions == full.distributions
    rehearsal = load_space(str(gpu_check.short_space(tmp_path, gpu_check.REHEARSAL)))
    assert (rehearsal.fidelity.min_steps, rehearsal.fidelity.max_steps) == gpu_check.REHEARSAL.search_steps
    assert rehearsal.fidelity.batch_size == gpu_check.REHEARSAL.search_batch
    assert rehearsal.distributions == full.distributions


def table_rows(text: str) -> list[list[str]]:
    """The rows of the table ``print_table`` printed (header and separator left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# every section of the real check, in order; the rehearsal times float32 and bfloat16 only
REHEARSED = (
    "full-space sampling", "latency float32", "latency bfloat16", "AMP training conv-only",
    "AMP training all modules", "AMP training SSMB-heavy", "peak memory of the training runs", "patch sampling",
    "scan: mamba_ssm is CUDA-only", "1-trial search, full space, --isolate", "1-trial search, full space, --workers auto",
    "deploy --onnx",
)


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_on_the_cpu_and_prints_the_table() -> None:
    """As CI runs it: ``python benchmarks/gpu_check.py --rehearse`` (one thread, so a busy machine
    does not make it crawl)."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--rehearse"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "GPU check rehearsed on the CPU" in done.stdout
    rows = table_rows(done.stdout)
    assert len(rows) == len(REHEARSED), done.stdout
    for row, label in zip(rows, REHEARSED):
        assert row[0].startswith(label) and row[2].startswith("ok"), row
    deploy = rows[-1][1]
    assert "trial 0" in deploy and "ONNX" in deploy  # one trial: the conv-only anchor is the pick
