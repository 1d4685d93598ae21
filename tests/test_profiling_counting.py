"""Counting the real EHR-SR network: every module on, several configurations, both counters.

Inputs are small (at most 48x48) to keep the file fast; counts scale with the input, the rules do
not depend on it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.profiling import count_macs
from ehrsr.profiling.counting import DEPLOY_EHRSR

ALL_ON = {
    "wab": {"enabled": True, "heads": 2, "window_size": 4},
    "ssm": {"enabled": True, "directions": 4, "d_state": 4},
    "fsb": {"enabled": True},
    "moe": {"enabled": True, "capacity_factor": 1.0},
    "repmix": {"enabled": True, "kernel_size": 7},
    "noise": {"enabled": True, "eval_mode": "seeded"},
}

CONFIGS = {
    # every module on, U-Net with concat skips, attention gates and PixelUnshuffle down-sampling
    "x4_levels2_concat": (
        {"width": 16, "msg": {"levels": 2, "depths": [1, 1], "skip_fusion": "concat", "attention_gate": True,
                              "downsample": "unshuffle"}, **ALL_ON},
        (1, 3, 48, 48),
    ),
    # gated blocks, trunk in the decoder at level 0, top-1 routing, odd input size (padding paths)
    "x2_gated_trunk_level0": (
        {"width": 8, "scale": 2, "block_type": "gated", "trunk_level": 0, "msg": {"levels": 1, "depths": [1]},
         **ALL_ON, "moe": {"enabled": True, "n_experts": 2, "top_k": 1},
         "ssm": {"enabled": True, "directions": 1, "d_state": 8}},
        (1, 3, 22, 26),
    ),
    # restoration (scale 1), no MSG levels, batch of 2, three trunk blocks (shifted windows)
    "x1_restoration_batch2": (
        {"width": 8, "scale": 1, "trunk_blocks": 3, "msg": {"levels": 0, "depths": []}, **ALL_ON},
        (2, 3, 16, 16),
    ),
    # x3, three levels, zero-noise eval mode
    "x3_levels3": (
        {"width": 8, "scale": 3, "msg": {"levels": 3, "depths": [1, 1, 1]}, **ALL_ON,
         "noise": {"enabled": True, "eval_mode": "zero"}},
        (1, 3, 32, 40),
    ),
}


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    data, shape = CONFIGS[name]
    torch.manual_seed(0)
    return build_model(EHRSRConfig.from_dict(data)), shape


@pytest.fixture(scope="module", params=list(CONFIGS))
def counted(request):
    model, shape = _model(request.param)
    return request.param, model, count_macs(model, shape)


def test_counters_agree_within_one_percent(counted) -> None:
    name, _, result = counted
    assert result.macs > 0
    assert result.relative_difference <= 0.01, (name, result.macs, result.macs_ptflops)
    # per family too: a compensating error in two families would hide behind the total
    for family, macs in result.by_operator.items():
        other = result.by_operator_ptflops.get(family, 0)
        assert abs(macs - other) <= 0.01 * macs, (name, family, macs, other)


def test_no_unsupported_operator_in_ehrsr(counted) -> None:
    name, _, result = counted
    assert result.unsupported_ops == {}, (name, result.unsupported_ops)


def test_every_module_family_is_priced(counted) -> None:
    name, _, result = counted
    # WAB -> attention, SSMB -> selective_scan, FSB -> fft, global residual -> upsample (scale > 1),
    # NAF's simplified channel attention -> pool (gated blocks have none)
    config = EHRSRConfig.from_dict(CONFIGS[name][0])
    expected = {"conv", "linear", "norm", "attention", "selective_scan", "fft"}
    if config.scale > 1:
        expected.add("upsample")
    if config.block_type == "naf":
        expected.add("pool")
    assert expected <= set(result.by_operator), (name, result.by_operator)


def test_repmix_deploy_form_has_fewer_parameters(counted) -> None:
    name, model, result = counted
    assert result.deploy_form == DEPLOY_EHRSR
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.params_deploy == sum(p.numel() for p in reparameterize(model).parameters())
    assert result.params_deploy < result.params, name


def test_counts_are_for_the_deploy_form_and_leave_the_model_untouched() -> None:
    model, shape = _model("x2_gated_trunk_level0")
    model.train()
    before = copy.deepcopy(model.state_dict())
    result = count_macs(model, shape)
    deploy_result = count_macs(reparameterize(model), shape)
    # counting the model equals counting its deploy copy: fused convs, not the training branches
    assert (result.macs, result.macs_ptflops, result.params_deploy) == (
        deploy_result.macs, deploy_result.macs_ptflops, deploy_result.params_deploy)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deploy_parameters_all_reach_the_data_path() -> None:
    """The data-path tracking used for generic modules finds every deploy parameter of EHR-SR
    (seeded noise makes the noise scales take part), including those used only through
    weights-only work: the attention bias table (gathered) and A_log (exponentiated)."""
    from ehrsr.profiling.counting import _count_ptflops, _data_path_parameters

    model, shape = _model("x4_levels2_concat")
    deploy = reparameterize(model)
    tally = _count_ptflops(deploy, torch.rand(shape))
    assert _data_path_parameters(deploy, tally.used_storages) == sum(p.numel() for p in deploy.parameters())


def test_macs_grow_with_the_input_area() -> None:
    model, _ = _model("x1_restoration_batch2")
    small = count_macs(model, (1, 3, 8, 8))
    large = count_macs(model, (1, 3, 16, 16))
    # per-pixel convs scale with the area; windowed attention and scans scale with it too here
    assert 3.5 * small.by_operator["conv"] < large.by_operator["conv"] <= 4 * small.by_operator["conv"] + 1
    assert large.macs > 3.5 * small.macs


def test_wrong_input_shape_for_ehrsr_is_rejected_before_counting() -> None:
    model, _ = _model("x3_levels3")
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        count_macs(model, (1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        count_macs(model, (3, 32, 32))


def test_count_macs_works_under_no_grad_and_inference_mode() -> None:
    model, _ = _model("x2_gated_trunk_level0")
    shape = (1, 3, 12, 10)
    reference = count_macs(model, shape)
    with torch.no_grad():
        assert count_macs(model, shape).macs == reference.macs
    with torch.inference_mode():
        assert count_macs(model, shape).macs_ptflops == reference.macs_ptflops


def test_spandrel_span_matches_the_published_ntire_figures() -> None:
    """SPAN (28 channels, x4), the NTIRE 2026 ESR baseline: 0.151 M parameters and 9.83 G fvcore
    FLOPs at 256x256 (NTIRE 2026 ESR README). spandrel's SPAN keeps its training branches beside
    ``eval_conv``; params_deploy must count only what the eval forward uses. Counted at 64x64
    (every conv keeps the resolution, so MACs scale exactly with the pixel count)."""
    span_module = pytest.importorskip(
        "spandrel.architectures.SPAN.__arch.span", reason="the SPAN reference needs the optional 'baselines' extra (spandrel)"
    )
    model = span_module.SPAN(num_in_ch=3, num_out_ch=3, feature_channels=28, upscale=4).eval()
    result = count_macs(model, (1, 3, 64, 64))
    assert round(result.params_deploy / 1e6, 3) == 0.151
    assert result.params > 5 * result.params_deploy  # training branches are not deploy parameters
    assert round(result.macs * 16 / 1e9, 2) == 9.83
    assert result.macs_ptflops == result.macs
    assert result.macs_constant > 0  # the per-forward kernel fusion, seen by ptflops, left out
    assert result.unsupported_ops == {}
