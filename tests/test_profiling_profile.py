"""profile_model end to end on CPU: the real EHR-SR network (every module on) and a generic module."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.profiling import Profile, count_macs, profile_model
from ehrsr.profiling.counting import DEPLOY_EHRSR, DEPLOY_GENERIC

ALL_ON = EHRSRConfig.from_dict(
    {
        "width": 8,
        "msg": {"levels": 1, "depths": [1]},
        "wab": {"enabled": True, "heads": 2, "window_size": 4},
        "ssm": {"enabled": True, "directions": 2, "d_state": 4},
        "fsb": {"enabled": True},
        "moe": {"enabled": True},
        "repmix": {"enabled": True, "kernel_size": 5},
        "noise": {"enabled": True},
    }
)


@pytest.fixture(scope="module")
def ehrsr_profile() -> tuple[nn.Module, Profile]:
    torch.manual_seed(0)
    model = build_model(ALL_ON)
    return model, profile_model(model, (1, 3, 24, 24), warmup=1, repeats=5, threads=1)


def test_profile_of_ehrsr_has_consistent_fields(ehrsr_profile) -> None:
    model, p = ehrsr_profile
    count = count_macs(model, (1, 3, 24, 24))
    assert (p.macs, p.macs_ptflops, p.params, p.params_deploy) == (
        count.macs, count.macs_ptflops, count.params, count.params_deploy)
    assert p.params_deploy == sum(q.numel() for q in reparameterize(model).parameters()) < p.params
    assert p.unsupported_ops == {}
    assert abs(p.macs - p.macs_ptflops) <= 0.01 * p.macs
    assert p.latency_ms_p10 <= p.latency_ms <= p.latency_ms_p90
    assert (p.warmup, p.repeats, len(p.latency_samples_ms)) == (1, 5, 5)
    assert p.threads == 1 and p.device.endswith("(1 thread)")
    assert p.peak_memory_mb is not None and 0 < p.peak_memory_mb < p.peak_memory_total_mb
    assert p.dtype == "float32" and p.input_shape == p.macs_input_shape == (1, 3, 24, 24)
    assert p.deploy_form == DEPLOY_EHRSR
    assert p.memory_method.startswith("cpu allocator events")


def test_profile_to_dict_is_json_ready(ehrsr_profile) -> None:
    _, p = ehrsr_profile
    data = json.loads(json.dumps(p.to_dict()))
    assert data["macs"] == p.macs
    assert data["input_shape"] == [1, 3, 24, 24]
    assert len(data["latency_samples_ms"]) == p.repeats
    assert set(data) == {f.name for f in Profile.__dataclass_fields__.values()}


def test_macs_can_be_counted_at_another_shape_than_timed() -> None:
    model = build_model(EHRSRConfig(width=8))
    p = profile_model(model, (1, 3, 16, 16), warmup=0, repeats=5, measure_memory=False, macs_input_shape=(1, 3, 32, 32))
    assert p.macs == count_macs(model, (1, 3, 32, 32)).macs
    assert p.macs_input_shape == (1, 3, 32, 32) and p.input_shape == (1, 3, 16, 16)
    assert p.peak_memory_mb is None and p.peak_memory_total_mb is None
    assert p.memory_method.startswith("not measured")


def test_generic_module_is_profiled_as_given_and_left_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(8, 3, 1))
    model.train()
    p = profile_model(model, (1, 3, 16, 16), warmup=0, repeats=5, channels_last=True, threads=1)
    assert p.deploy_form == DEPLOY_GENERIC
    assert p.macs == p.macs_ptflops == 16 * 16 * (3 * 8 * 9 + 8 * 3)
    assert p.params == p.params_deploy == sum(q.numel() for q in model.parameters())
    assert p.channels_last
    # the caller's module keeps its mode and memory format (channels_last ran on a copy)
    assert all(m.training for m in model.modules())
    assert model[0].weight.is_contiguous()


def test_threads_are_restored_after_profiling() -> None:
    before = torch.get_num_threads()
    profile_model(nn.Conv2d(3, 3, 1), (1, 3, 8, 8), warmup=0, repeats=5, threads=1, measure_memory=False)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (1, 3, 0, 8)}, "input_shape"),
        ({"device": "cuda:99" if torch.cuda.is_available() else "cuda"}, "CUDA|cuda"),
        ({"device": "npu"}, "device must be"),
        ({"dtype": "float64"}, "dtype"),
        ({"warmup": -1}, "warmup"),
        ({"repeats": 0}, "repeats"),
        ({"threads": 0}, "threads"),
        ({"channels_last": "yes"}, "channels_last"),
        ({"input_shape": (3, 8, 8), "channels_last": True}, "channels_last needs a 4-D"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message) -> None:
    args = {"input_shape": (1, 3, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        profile_model(nn.Conv2d(3, 3, 1), **args)


def test_an_earlier_count_is_reused_and_must_match() -> None:
    from ehrsr.profiling import counting

    model = build_model(EHRSRConfig(width=8))
    count = count_macs(model, (1, 3, 16, 16))
    calls = []
    original = counting.count_fvcore

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    counting.count_fvcore = spy
    try:
        p = profile_model(model, (1, 3, 16, 16), warmup=0, repeats=5, measure_memory=False, mac_count=count)
    finally:
        counting.count_fvcore = original
    assert calls == []  # not counted again
    assert (p.macs, p.params_deploy) == (count.macs, count.params_deploy)
    with pytest.raises(ValueError, match="mac_count"):
        profile_model(model, (1, 3, 32, 32), warmup=0, repeats=5, mac_count=count)  # other shape
