"""The compiled CPU cross-scan (``ehrsr/blocks/scan_kernel.c``): it is what the SSMB runs by default,
its results do not depend on the thread count, it is built for the CPU it runs on where the compiler
allows and portably where not, and when it cannot be used (switched off, no compiler, a failed
build) the SSMB falls back to PyTorch with the same results and says why. Value and gradient
equality with the reference for every input is in ``tests/test_cross_scan.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ehrsr.blocks import SSMBlock, scan_kernel
from ehrsr.blocks import ssm as ssm_module
from tests.test_cross_scan import cross_inputs, values_and_grads

# skipped only where no C compiler is found (the fallback tests below still run there); where one
# is found, a kernel that does not build fails test_the_kernel_builds_wherever_a_compiler_is_found
needs_kernel = pytest.mark.skipif(not scan_kernel.available() and not scan_kernel.buildable_here(),
                                  reason=f"the kernel is not built here: {scan_kernel.reason()}")


def test_the_kernel_builds_wherever_a_compiler_is_found() -> None:
    if scan_kernel.buildable_here():
        assert scan_kernel.available(), scan_kernel.reason()
    else:
        assert not scan_kernel.available() and scan_kernel.reason()


@needs_kernel
def test_the_op_runs_the_kernel_by_default_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("forward", "backward"):
        real = getattr(scan_kernel, name)
        monkeypatch.setattr(scan_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(ssm_module, "cross_scan_reference", lambda *a, **k: pytest.fail("PyTorch scan used"))
    assert ssm_module.SCAN_KERNEL == "auto"
    block = SSMBlock(8, d_state=4, directions=2)
    block(torch.randn(2, 8, 6, 5)).square().sum().backward()
    assert calls == ["forward", "backward"]
    assert all(p.grad is not None for p in block.parameters())


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_the_thread_count(threads: int) -> None:
    inputs = cross_inputs(3, 7, 5, 40, 2, 5, 2, seed=0)  # 3 x 2 x 3 work items (batch, direction, channel block)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_and_grads(torch.ops.ehrsr.cross_scan, inputs)
        torch.set_num_threads(threads)
        many = values_and_grads(torch.ops.ehrsr.cross_scan, inputs)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # each work item writes its own slab; the sums over slabs run in order


def test_supports_only_cpu_float32_and_float64_within_the_lane_buffers() -> None:
    inputs = cross_inputs(1, 2, 3, 4, 2, 3, 1, seed=0)
    assert scan_kernel.supports(*inputs) == scan_kernel.available()
    assert not scan_kernel.supports(*[t.to(torch.bfloat16) for t in inputs])
    mixed = [*inputs[:4], inputs[4].float(), inputs[5]]
    assert not scan_kernel.supports(*mixed)
    too_many_states = cross_inputs(1, 2, 3, 4, 1, scan_kernel.MAX_STATE + 1, 1, seed=0)
    assert not scan_kernel.supports(*too_many_states)


SCRIPT = textwrap.dedent(
    """
    import torch
    from ehrsr.blocks import cross_scan_reference, scan_kernel, selective_scan_sequential
    gen = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "generator": gen}
    tokens = torch.randn(1, 3, 5, 4, **f64).requires_grad_()
    inputs = [tokens, torch.randn(1, 3, 5, 2 * 7, **f64), torch.randn(2, 4, 1, **f64), torch.randn(2, 4, **f64),
              -torch.rand(2, 4, 3, **f64), torch.randn(2, 4, **f64)]
    y = torch.ops.ehrsr.cross_scan(*inputs)
    y.sum().backward()
    torch.testing.assert_close(y, cross_scan_reference(*inputs, scan=selective_scan_sequential))
    assert tokens.grad is not None
    print("available", scan_kernel.available())
    print("reason", scan_kernel.reason())
    """
)


def _run(tmp_path: Path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("EHRSR_SCAN_KERNEL", "CC")}
    environment.update({"EHRSR_CACHE": str(tmp_path / "cache"), **env})
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_switched_off_by_the_environment_uses_the_pytorch_scan(tmp_path: Path) -> None:
    out = _run(tmp_path, EHRSR_SCAN_KERNEL="torch")
    assert "available False" in out and "reason EHRSR_SCAN_KERNEL=torch" in out
    assert not (tmp_path / "cache" / "kernels").exists()  # nothing was compiled


def test_without_a_compiler_the_scan_falls_back_and_says_why(tmp_path: Path) -> None:
    out = _run(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert "available False" in out and "no C compiler" in out


def test_a_failed_build_falls_back_and_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'error: no luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _run(tmp_path, CC=str(broken))
    assert "available False" in out and "could not be built" in out and "error: no luck" in out
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left


@needs_kernel
def test_a_compiler_refusing_the_native_target_gets_a_portable_build(tmp_path: Path) -> None:
    real = subprocess.run(["sh", "-c", "command -v \"${CC:-cc}\""], capture_output=True, text=True, check=True).stdout.strip()
    picky = tmp_path / "picky-cc"
    picky.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -march=native ] && exit 1; done\nexec {real} \"$@\"\n")
    picky.chmod(0o755)
    out = _run(tmp_path, CC=str(picky))
    assert "available True" in out
    assert len(list((tmp_path / "cache" / "kernels").glob("scan-*.so"))) == 1


@needs_kernel
def test_built_once_into_the_cache_and_reused(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "available True" in out
    built = list((tmp_path / "cache" / "kernels").glob("scan-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "available True" in _run(tmp_path)
    assert built[0].stat().st_mtime_ns == stamp  # the second process loaded it, did not rebuild
