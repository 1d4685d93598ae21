"""The selective-scan op's PyTorch backwards against the reference loop's autograd: the recompute
under autograd and the hand-written adjoint scan (``ssm.SCAN_BACKWARD``). The op serves the SSMB's
cross-scan where the compiled CPU kernel is not used (``tests/test_cross_scan.py`` tests both)."""

from __future__ import annotations

import pytest
import torch

from ehrsr.blocks import selective_scan_sequential
from ehrsr.blocks import ssm as ssm_module


def _inputs(b: int, d: int, n: int, length: int, groups: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bc = (b, groups, n, length) if groups > 1 else (b, n, length)
    f64 = {"dtype": torch.float64, "generator": gen}
    return [
        torch.randn(b, d, length, **f64),  # u
        torch.nn.functional.softplus(torch.randn(b, d, length, **f64)),  # delta
        -torch.exp(torch.randn(d, n, **f64)),  # A
        torch.randn(*bc, **f64),  # B
        torch.randn(*bc, **f64),  # C
        torch.randn(d, **f64),  # D
    ]


NAMES = ("u", "delta", "A", "B", "C", "D")
MODES = ("recompute", "adjoint")


def use(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the op's backward through ``mode``."""
    monkeypatch.setattr(ssm_module, "SCAN_BACKWARD", mode)


# groups = scan directions stacked along the channels (1, 2, 4); lengths odd, shorter and longer
# than a chunk, and a multiple of it
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 7, 33, 65, 127])
@pytest.mark.parametrize("mode", MODES)
def test_op_gradients_equal_reference_autograd(groups: int, length: int, mode: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    inputs = _inputs(2, 4 * groups, 3, length, groups, seed=length + groups)
    ref = [t.clone().requires_grad_() for t in inputs]
    fast = [t.clone().requires_grad_() for t in inputs]
    y_ref = selective_scan_sequential(*ref)
    y_fast = torch.ops.ehrsr.selective_scan(*fast)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-10, rtol=1e-10)
    weight = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y_ref * weight).sum().backward()
    (y_fast * weight).sum().backward()
    for name, r, f in zip(NAMES, ref, fast):
        assert f.grad is not None, name
        torch.testing.assert_close(f.grad, r.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_adjoint_backward_does_not_recompute_under_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    # the recompute formula re-runs selective_scan_parallel under autograd; the adjoint must not
    use("adjoint", monkeypatch)
    inputs = [t.requires_grad_() for t in _inputs(1, 4, 2, 20, 1, seed=0)]
    y = torch.ops.ehrsr.selective_scan(*inputs)
    calls = []
    real = ssm_module.selective_scan_parallel
    monkeypatch.setattr(ssm_module, "selective_scan_parallel", lambda *a, **k: calls.append(1) or real(*a, **k))
    y.sum().backward()
    assert calls == [] and all(t.grad is not None for t in inputs)
    # and the default does recompute (the faster formula on CPU, measured: see ssm.SCAN_BACKWARD)
    monkeypatch.setattr(ssm_module, "SCAN_BACKWARD", "recompute")
    y = torch.ops.ehrsr.selective_scan(*inputs)
    calls.clear()
    y.sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_custom_op(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    inputs = [t.requires_grad_() for t in _inputs(1, 4, 2, 9, 2, seed=3)]
    assert torch.autograd.gradcheck(torch.ops.ehrsr.selective_scan, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_float32_gradients_close_to_float64(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(mode, monkeypatch)
    inputs = _inputs(1, 8, 4, 300, 2, seed=5)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
        torch.ops.ehrsr.selective_scan(*xs).square().sum().backward()
        grads[dtype] = [x.grad.double() for x in xs]
    for name, g64, g32 in zip(NAMES, grads[torch.float64], grads[torch.float32]):
        scale = g64.abs().max().clamp_min(1.0)
        assert ((g32 - g64).abs().max() / scale).item() < 1e-4, name


def test_channel_slabs_give_the_same_values_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # the adjoint processes large inputs in slabs of channels to bound memory; force several slabs
    use("adjoint", monkeypatch)
    inputs = _inputs(2, 12, 3, 41, 2, seed=9)
    results = {}
    for slab in (ssm_module.SLAB_ELEMENTS, 2 * 3 * 41):  # one slab; then about one channel per slab
        monkeypatch.setattr(ssm_module, "SLAB_ELEMENTS", slab)
        xs = [t.clone().requires_grad_() for t in inputs]
        y = torch.ops.ehrsr.selective_scan(*xs)
        y.square().sum().backward()
        results[slab] = [ssm_module._materialised_forward(*inputs)] + [x.grad for x in xs]
    assert len(ssm_module._slabs(ssm_module._ScanShapes(inputs[0], inputs[2], inputs[3]))) > 1
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # the materialised states the adjoint works on give the reference loop's output
    torch.testing.assert_close(results[2 * 3 * 41][0], selective_scan_sequential(*inputs), atol=1e-10, rtol=1e-10)
