"""A search's MAC counts summed from cached unit counts (``ehrsr.profiling.unit_counts``) equal
``count_macs``'s fvcore figures, for configurations of both shipped spaces; each unit is traced
once per process; MoE-TX with a capacity limit and non-EHR-SR models are counted whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ehrsr.model import build_model
from ehrsr.profiling import count_macs
from ehrsr.profiling import unit_counts as unit_counts_module
from ehrsr.profiling.latency_model import sample_configs
from ehrsr.profiling.unit_counts import UnitMacCounter
from ehrsr.search.space import load_space

SHAPE = (1, 3, 40, 56)  # not a multiple of the windows or levels: padding is part of the units


def _configs(space: str, n: int, *, moe: bool) -> list:
    found = []
    for config in sample_configs(load_space(space), 400, seed=11):
        if config.moe.enabled == moe:
            found.append(config)
        if len(found) == n:
            return found
    raise AssertionError(f"fewer than {n} configurations with moe={moe} in {space}")


@pytest.mark.parametrize("space", ["tiny", "full"])
@pytest.mark.parametrize("moe", [False, True])
def test_unit_sums_equal_whole_network_counts(space: str, moe: bool) -> None:
    counter = UnitMacCounter()
    for config in _configs(space, 4, moe=moe):
        assert config.moe.capacity_factor == 0  # the shipped spaces route without a capacity limit
        torch.manual_seed(0)
        model = build_model(config)
        whole = count_macs(model, SHAPE)
        summed = counter.count(model, SHAPE)
        assert summed.macs == whole.macs > 0, config
        assert summed.macs_constant == whole.macs_constant
        assert summed.params == whole.params and summed.params_deploy == whole.params_deploy
        assert summed.by_operator == {k: v for k, v in whole.by_operator.items() if v}
        assert summed.unsupported_ops == whole.unsupported_ops == {}
        assert summed.macs_ptflops is None and summed.input_shape == SHAPE
    assert counter.reused_units > 0  # units repeat across configurations and inside one network


def test_each_unit_is_traced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = UnitMacCounter()
    config = _configs("tiny", 1, moe=False)[0]
    first = counter.count(build_model(config), SHAPE)
    traced = []
    real = unit_counts_module.count_fvcore
    monkeypatch.setattr(unit_counts_module, "count_fvcore", lambda *a: traced.append(1) or real(*a))
    again = counter.count(build_model(config), SHAPE)
    assert traced == [] and again == first
    bigger = (1, 3, 64, 64)  # other resolutions are other units
    assert counter.count(build_model(config), bigger).macs == count_macs(build_model(config), bigger).macs
    assert traced


def test_moe_with_a_capacity_and_other_models_are_counted_whole() -> None:
    counter = UnitMacCounter()
    config = _configs("tiny", 1, moe=True)[0]
    assert counter.eligible(build_model(config), SHAPE)
    capped = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=1.25))
    capped_model = build_model(capped)
    assert not counter.eligible(capped_model, SHAPE)
    counted = counter.count(capped_model, SHAPE)
    assert counted.macs_ptflops is not None and counted.macs == count_macs(capped_model, SHAPE).macs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert not counter.eligible(conv, SHAPE)
    assert counter.count(conv, SHAPE).macs == 3 * 8 * 9 * 40 * 56
    assert not counter.eligible(build_model(config), (2, 3, 40, 56))
    assert counter.counted_units == 0
