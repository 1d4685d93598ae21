"""The SSMB's cross-scan (``ssm.cross_scan``: per-direction dt projection and softplus, the scans of
all directions, the D skip and the sum back in row-major order) as the op ``torch.ops.ehrsr.cross_scan``:
the compiled CPU kernel (``ehrsr/blocks/scan_kernel.c``) and the op's PyTorch fallback, against the
PyTorch reference around the sequential loop (``cross_scan_reference``), values and every gradient, in
float64 for 1, 2 and 4 directions at odd sizes, and ``gradcheck`` on the op. Building the kernel and
falling back without it: ``tests/test_scan_kernel.py``."""

from __future__ import annotations

import pytest
import torch

from ehrsr.blocks import (
    SSMBlock,
    cross_scan_reference,
    scan_kernel,
    selective_scan_parallel,
    selective_scan_sequential,
)
from ehrsr.blocks import ssm as ssm_module

NAMES = ("tokens", "proj", "dt_weight", "dt_bias", "A", "D")
MODES = ("kernel", "torch", "torch-adjoint")


def use(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the op through ``mode``: the compiled kernel, or its PyTorch fallback (``SCAN_KERNEL =
    "torch"``) whose backward differentiates the chunked scan or runs the scan op's adjoint."""
    if mode == "kernel":
        if not scan_kernel.available():
            # only an environment without a compiler may skip; a broken build fails
            # (tests/test_scan_kernel.py::test_the_kernel_builds_wherever_a_compiler_is_found)
            assert not scan_kernel.buildable_here(), scan_kernel.reason()
            pytest.skip(f"the kernel is not built here: {scan_kernel.reason()}")
        monkeypatch.setattr(ssm_module, "SCAN_KERNEL", "auto")
    else:
        monkeypatch.setattr(ssm_module, "SCAN_KERNEL", "torch")
        monkeypatch.setattr(ssm_module, "SCAN_BACKWARD", "adjoint" if mode == "torch-adjoint" else "recompute")


def cross_inputs(bsz: int, height: int, width: int, channels: int, directions: int, d_state: int, rank: int,
                 seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": dtype, "generator": gen}
    return [
        torch.randn(bsz, height, width, channels, **kw),  # tokens
        torch.randn(bsz, height, width, directions * (rank + 2 * d_state), **kw),  # dt inputs, B, C
        0.5 * torch.randn(directions, channels, rank, **kw),  # dt_weight
        torch.randn(directions, channels, **kw) - 1.0,  # dt_bias: delta = softplus(...) around 0.3
        -torch.exp(torch.randn(directions, channels, d_state, **kw)),  # A < 0
        torch.randn(directions, channels, **kw),  # D
    ]


def values_and_grads(fn, inputs: list[torch.Tensor], weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    xs = [t.clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    if weight is None:
        weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * weight).sum().backward()
    return [y.detach()] + [x.grad for x in xs]


def reference(*inputs: torch.Tensor) -> torch.Tensor:
    return cross_scan_reference(*inputs, scan=selective_scan_sequential)


# 19 channels: two full blocks of 8 float64 lanes and a partial one
@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 3)])
@pytest.mark.parametrize("mode", MODES)
def test_values_and_gradients_equal_the_reference(directions: int, hw: tuple[int, int], mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    inputs = cross_inputs(2, *hw, 19, directions, 3, 2, seed=directions * 100 + hw[0])
    expected = values_and_grads(reference, inputs)
    got = values_and_grads(torch.ops.ehrsr.cross_scan, inputs)
    torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
    for name, g, e in zip(NAMES, got[1:], expected[1:]):
        assert g is not None and g.shape == e.shape, name
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("directions", [1, 2, 4])
def test_kernel_backward_across_segments_equals_the_reference(directions: int, dtype: torch.dtype,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # 29 x 31 = 899 tokens with 24 states: the kernel's backward replays the steps in segments from
    # checkpoints of the state. The reference runs the chunked scan under autograd in float64 here
    # (the loop is too slow at this length; the two agree: tests/test_blocks.py)
    use("kernel", monkeypatch)
    assert 2 * scan_kernel.segment_steps(dtype, 24) < 29 * 31  # several segments
    inputs = cross_inputs(1, 29, 31, 19, directions, 24, 2, seed=directions)
    weight = torch.randn(1, 29, 31, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = values_and_grads(lambda *a: cross_scan_reference(*a, scan=selective_scan_parallel), inputs, weight)
    got = values_and_grads(torch.ops.ehrsr.cross_scan, [t.to(dtype) for t in inputs], weight.to(dtype))
    tolerance = 1e-9 if dtype == torch.float64 else 2e-5
    for name, g, e in zip(("y", *NAMES), got, expected):
        scale = e.abs().max().clamp_min(1.0)
        assert ((g.double() - e).abs().max() / scale).item() < tolerance, name


@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_cross_scan_op(directions: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    inputs = [t.requires_grad_() for t in cross_inputs(1, 3, 5, 3, directions, 2, 1, seed=7 + directions)]
    assert torch.autograd.gradcheck(torch.ops.ehrsr.cross_scan, inputs, eps=1e-6, atol=1e-6)


def test_softplus_branches_match_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    # dt_bias spread so that z = dt_b + dt_w . dt crosses 0, the threshold 20 (above it softplus(z)
    # = z) and the kernel's exp range (|z| > 87)
    use("kernel", monkeypatch)
    inputs = cross_inputs(1, 4, 5, 24, 2, 3, 1, seed=3)
    inputs[3] = torch.linspace(-100.0, 100.0, 48, dtype=torch.float64).view(2, 24)
    expected = values_and_grads(reference, inputs)
    got = values_and_grads(torch.ops.ehrsr.cross_scan, inputs)
    for name, g, e in zip(("y", *NAMES), got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_float32_is_close_to_float64(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 runs the kernel's vector exp and softplus at float precision (16 lanes, 32 channels)
    use(mode, monkeypatch)
    inputs = cross_inputs(2, 17, 13, 32, 2, 8, 2, seed=5)
    weight = torch.randn(2, 17, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = values_and_grads(reference, inputs, weight)
    single = values_and_grads(torch.ops.ehrsr.cross_scan, [t.float() for t in inputs], weight.float())
    for name, s, e in zip(("y", *NAMES), single, exact):
        scale = e.abs().max().clamp_min(1.0)
        assert ((s.double() - e).abs().max() / scale).item() < 2e-5, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("directions", [1, 2, 4])
def test_block_gradients_equal_sequential_reference(directions: int, mode: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    torch.manual_seed(directions)
    block = SSMBlock(6, d_state=3, directions=directions).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    grads, outputs = {}, {}
    for impl in ("parallel", "sequential"):
        block.zero_grad(set_to_none=True)
        block.scan_impl = impl
        outputs[impl] = block(x)
        outputs[impl].square().sum().backward()
        grads[impl] = {k: p.grad.clone() for k, p in block.named_parameters()}
    torch.testing.assert_close(outputs["parallel"], outputs["sequential"], atol=1e-10, rtol=1e-10)
    for name, g in grads["sequential"].items():
        torch.testing.assert_close(grads["parallel"][name], g, atol=1e-8, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_block_scans_all_directions_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ssm_module.cross_scan
    monkeypatch.setattr(ssm_module, "cross_scan", lambda *a, **k: calls.append([t.shape for t in a]) or real(*a, **k))
    SSMBlock(6, d_state=3, directions=4)(torch.randn(1, 6, 4, 5))
    # tokens (B, H, W, E), proj (B, H, W, K (R + 2N)) with R = 1, dt_weight, dt_bias, A (K, E, N), D
    assert calls == [[(1, 4, 5, 6), (1, 4, 5, 28), (4, 6, 1), (4, 6), (4, 6, 3), (4, 6)]]
    # the PyTorch fallback stacks the directions along the channels into one selective scan
    monkeypatch.setattr(ssm_module, "SCAN_KERNEL", "torch")
    scans = []
    real_scan = torch.ops.ehrsr.selective_scan
    monkeypatch.setattr(ssm_module.torch.ops.ehrsr, "selective_scan", lambda *a: scans.append(a[3].shape) or real_scan(*a))
    SSMBlock(6, d_state=3, directions=4)(torch.randn(1, 6, 4, 5))
    assert scans == [torch.Size([1, 4, 3, 20])]  # B: (batch, directions, d_state, length)


def test_exportable_scan_equals_the_loop() -> None:
    # the form exporters see (one torch scan op, an ONNX Scan node), run eagerly here
    inputs = cross_inputs(1, 3, 4, 5, 2, 3, 1, seed=11)
    exportable = cross_scan_reference(*inputs, scan=ssm_module.selective_scan_exportable)
    torch.testing.assert_close(exportable, reference(*inputs), atol=1e-12, rtol=1e-12)


def test_bad_shapes_are_refused() -> None:
    inputs = cross_inputs(1, 3, 4, 5, 2, 3, 1, seed=0)
    with pytest.raises(ValueError, match="cross_scan expects"):
        torch.ops.ehrsr.cross_scan(inputs[0], inputs[1][..., :-1], *inputs[2:])
    with pytest.raises(ValueError, match="cross_scan expects"):
        cross_scan_reference(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4][:, :, :2], inputs[5])
