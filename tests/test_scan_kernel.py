"""The compiled CPU selective scan (``ehrsr/blocks/scan_kernel.c``): it is what the op runs by
default, its results do not depend on the thread count or on how B and C are laid out, and when it
cannot be used (switched off, no compiler, a failed build) the scan falls back to PyTorch with the
same results and says why. Value and gradient equality with the reference loop for every input is
in ``tests/test_scan_backward.py`` (mode "kernel")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ehrsr.blocks import SSMBlock, scan_kernel, selective_scan_sequential
from ehrsr.blocks import ssm as ssm_module

# skipped only where no C compiler is found (the fallback tests below still run there); where one
# is found, a kernel that does not build fails test_the_kernel_builds_wherever_a_compiler_is_found
needs_kernel = pytest.mark.skipif(not scan_kernel.available() and not scan_kernel.buildable_here(),
                                  reason=f"the kernel is not built here: {scan_kernel.reason()}")


def test_the_kernel_builds_wherever_a_compiler_is_found() -> None:
    if scan_kernel.buildable_here():
        assert scan_kernel.available(), scan_kernel.reason()
    else:
        assert not scan_kernel.available() and scan_kernel.reason()


def _inputs(b: int, d: int, n: int, length: int, groups: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(b * 1000 + d * 100 + length + groups)
    kw = {"dtype": dtype, "generator": gen}
    return [
        torch.randn(b, d, length, **kw),
        torch.nn.functional.softplus(torch.randn(b, d, length, **kw)),
        -torch.exp(torch.randn(d, n, **kw)),
        torch.randn(b, groups, n, length, **kw),
        torch.randn(b, groups, n, length, **kw),
        torch.randn(d, **kw),
    ]


def _values_and_grads(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [t.clone().requires_grad_() for t in inputs]
    y = torch.ops.ehrsr.selective_scan(*xs)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
    return [y.detach()] + [x.grad for x in xs]


@needs_kernel
def test_the_op_runs_the_kernel_by_default_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("forward", "backward"):
        real = getattr(scan_kernel, name)
        monkeypatch.setattr(scan_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(ssm_module, "selective_scan_parallel", lambda *a, **k: pytest.fail("PyTorch scan used"))
    assert ssm_module.SCAN_KERNEL == "auto"
    block = SSMBlock(8, d_state=4, directions=2)
    block(torch.randn(2, 8, 6, 5)).square().sum().backward()
    assert calls == ["forward", "backward"]
    assert all(p.grad is not None for p in block.parameters())


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_the_thread_count(threads: int) -> None:
    inputs = _inputs(3, 8, 5, 57, 2)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _values_and_grads(inputs)
        torch.set_num_threads(threads)
        many = _values_and_grads(inputs)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # each sequence and each (batch, group) pair is summed by one thread


@needs_kernel
def test_shared_b_and_c_equal_one_group() -> None:
    # (b, n, L) B and C (shared by all channels) and the same tensors as (b, 1, n, L)
    grouped = _inputs(2, 6, 4, 19, 1)
    shared = [*grouped[:3], grouped[3][:, 0], grouped[4][:, 0], grouped[5]]
    a, b = _values_and_grads(grouped), _values_and_grads(shared)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x.reshape(y.shape), y, atol=0, rtol=0)
    assert b[4].shape == shared[3].shape


@needs_kernel
def test_float32_kernel_matches_the_reference_loop() -> None:
    inputs = _inputs(2, 16, 8, 300, 4, dtype=torch.float32)
    torch.testing.assert_close(scan_kernel.forward(*inputs), selective_scan_sequential(*inputs), atol=1e-4, rtol=1e-4)


def test_supports_only_cpu_float32_and_float64() -> None:
    half = [t.to(torch.bfloat16) for t in _inputs(1, 2, 2, 3, 1)]
    mixed = _inputs(1, 2, 2, 3, 1)
    mixed[2] = mixed[2].float()
    assert not scan_kernel.supports(*half)
    assert not scan_kernel.supports(*mixed)


SCRIPT = textwrap.dedent(
    """
    import torch
    from ehrsr.blocks import scan_kernel, selective_scan_sequential
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 4, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    delta = torch.rand(1, 4, 11, dtype=torch.float64, generator=gen)
    A = -torch.rand(4, 3, dtype=torch.float64, generator=gen)
    B, C = torch.randn(2, 1, 3, 11, dtype=torch.float64, generator=gen).unbind(0)
    D = torch.randn(4, dtype=torch.float64, generator=gen)
    y = torch.ops.ehrsr.selective_scan(u, delta, A, B, C, D)
    y.sum().backward()
    torch.testing.assert_close(y, selective_scan_sequential(u, delta, A, B, C, D))
    assert u.grad is not None
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
def test_built_once_into_the_cache_and_reused(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "available True" in out
    built = list((tmp_path / "cache" / "kernels").glob("scan-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "available True" in _run(tmp_path)
    assert built[0].stat().st_mtime_ns == stamp  # the second process loaded it, did not rebuild
