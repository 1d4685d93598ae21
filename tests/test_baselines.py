"""Efficient-SR baselines: build at the tiny size, count like fvcore / ptflops, bicubic start, train."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.baselines import (
    BaselineUnavailable,
    UnknownBaseline,
    available_baselines,
    baseline_label,
    baseline_names,
    build_baseline,
    deploy_baseline,
    registry,
)
from ehrsr.profiling import count_macs

pytest.importorskip("spandrel", reason="the baselines extra (spandrel) builds most of these")

# Counted at 64x64 to keep the tests fast; the MACs of these networks grow with the pixel count
# (x16 for 256x256, run_search.py's --profile-size default; RLFN's pooled attention branch makes
# it approximate there), so the tiny-space range is checked on 16x the 64x64 count.
PROFILE_SHAPE = (1, 3, 64, 64)
TO_PROFILE_SIZE = 16
# MACs range spanned by 40 random tiny-space configurations at 256x256 (docs/baselines.md)
TINY_SPACE_MACS = (0.49e9, 4.10e9)
# OmniSR's narrowest width is one 32-channel attention head; it lands just above the range
ABOVE_TINY_RANGE = {"OmniSR"}


def _fvcore_total(model: nn.Module, shape: tuple[int, ...]) -> int:
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, torch.rand(shape))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


@pytest.mark.parametrize("name", baseline_names())
def test_tiny_builds_and_counts_like_fvcore(name: str) -> None:
    from fvcore.nn import parameter_count

    model = deploy_baseline(build_baseline(name, 4, "tiny"))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 24)).shape == (1, 3, 64, 96)
    count = count_macs(model, PROFILE_SHAPE)
    assert count.params_deploy == parameter_count(model)[""] == sum(p.numel() for p in model.parameters())
    assert count.macs == count.macs_ptflops  # our two counters agree exactly
    if name == "OmniSR":
        # plain fvcore's layer-norm handler asserts on OmniSR's 6-D tensors (docs/profiling.md)
        with pytest.raises(AssertionError):
            _fvcore_total(model, PROFILE_SHAPE)
    else:
        assert count.macs == _fvcore_total(model, PROFILE_SHAPE)  # the NTIRE recipe, as is
    low, high = TINY_SPACE_MACS
    macs_at_profile_size = count.macs * TO_PROFILE_SIZE
    if name in ABOVE_TINY_RANGE:
        assert high < macs_at_profile_size < 1.2 * high
    else:
        assert low <= macs_at_profile_size <= high


@pytest.mark.parametrize("name", ["SPAN", "PLKSR"])
def test_plain_ptflops_equals_our_count_plus_bias_adds(name: str) -> None:
    # ptflops' aten backend also counts one add per output element of a biased convolution;
    # on these conv-only networks that is the whole difference to the fvcore convention
    from ptflops import get_model_complexity_info

    model = deploy_baseline(build_baseline(name, 4, "tiny"))
    bias_adds = 0

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal bias_adds
        if module.bias is not None:
            bias_adds += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(PROFILE_SHAPE))
    for handle in handles:
        handle.remove()
    macs_ptflops, _ = get_model_complexity_info(
        model, PROFILE_SHAPE[1:], as_strings=False, backend="aten", print_per_layer_stat=False, verbose=False
    )
    assert macs_ptflops == count_macs(model, PROFILE_SHAPE).macs + bias_adds


@pytest.mark.parametrize("name", baseline_names())
def test_bicubic_skip_starts_as_bicubic_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, 3, "tiny", bicubic_skip=True).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, F.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False))
    assert baseline_label(name, True) == f"{name} (+bicubic skip)"


@pytest.mark.parametrize("name", ["SPAN", "RLFN"])
def test_a_few_training_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, 2, "tiny", bicubic_skip=True)
    lr_patch = torch.rand(4, 3, 20, 20)  # RLFN's ESA pools 7x7 after a stride-2 conv: inputs >= 15 px
    hr_patch = (F.interpolate(lr_patch, scale_factor=2, mode="nearest") * 0.8 + 0.1).clamp(0, 1)
    # 5e-4: SPAN scales its input by 255, so 2e-3 overshoots on the first step (docs/baselines.md)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    losses = []
    for _ in range(6):
        loss = F.l1_loss(model(lr_patch), hr_patch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the zero-initialised last layer learns from the first step


def test_span_deploy_form_fuses_reparameterised_convs() -> None:
    torch.manual_seed(0)
    model = build_baseline("SPAN", 4, "tiny").eval()
    deployed = deploy_baseline(model)
    assert not any(type(m).__name__ == "Conv3XC" for m in deployed.modules())
    assert any(type(m).__name__ == "Conv3XC" for m in model.modules())  # the original is untouched
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)


def test_unknown_names_and_sizes_list_the_valid_ones() -> None:
    with pytest.raises(UnknownBaseline, match="valid: SPAN, SAFMN, PLKSR, RLFN, OmniSR, DITN"):
        build_baseline("EDSR", 4)
    with pytest.raises(UnknownBaseline, match="valid: tiny, full"):
        build_baseline("SPAN", 4, "huge")  # type: ignore[arg-type]
    assert isinstance(build_baseline("span", 2), nn.Module)  # names are case-insensitive


def test_without_spandrel_only_our_own_baselines_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_spandrel_missing_reason", lambda: "spandrel is not installed (test)")
    infos = {info.name: info for info in available_baselines()}
    assert infos["RLFN"].available and not infos["RLFN"].needs_spandrel
    assert not infos["SPAN"].available and infos["SPAN"].needs_spandrel
    assert "spandrel is not installed" in infos["SPAN"].reason
    with pytest.raises(BaselineUnavailable, match="spandrel"):
        build_baseline("SPAN", 4)
    assert isinstance(build_baseline("RLFN", 4), nn.Module)


def test_full_sizes_are_the_published_configurations() -> None:
    # parameter counts of the published configurations at x4 (docs/baselines.md)
    span = build_baseline("SPAN", 4, "full")
    assert span.upsampler[0].in_channels == 48
    rlfn = deploy_baseline(build_baseline("RLFN", 4, "full"))
    assert sum(p.numel() for p in rlfn.parameters()) == 317_218  # NTIRE 2024 ESR baseline: 0.317 M
    safmn = build_baseline("SAFMN", 4, "full")
    assert len(safmn.feats) == 8 and safmn.to_feat.out_channels == 36
