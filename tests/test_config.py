"""EHRSRConfig: validation with clear messages, exact dict / JSON / YAML round trips."""

from __future__ import annotations

import json

import pytest
import yaml

from ehrsr import MODULE_TOGGLES, EHRSRConfig


def _everything_on() -> EHRSRConfig:
    return EHRSRConfig.from_dict(
        {
            "scale": 3,
            "width": 24,
            "block_type": "gated",
            "msg": {"levels": 3, "depths": [1, 0, 2], "skip_fusion": "concat", "attention_gate": True},
            "trunk_level": 1,
            **{name: {"enabled": True} for name in MODULE_TOGGLES},
            "moe": {"enabled": True, "n_experts": 3, "top_k": 1, "capacity_factor": 1.25},
            "drop_path": 0.1,
        }
    )


@pytest.mark.parametrize("cfg", [EHRSRConfig(), _everything_on()], ids=["default", "everything-on"])
def test_round_trips_are_exact(cfg: EHRSRConfig) -> None:
    data = cfg.to_dict()
    assert EHRSRConfig.from_dict(data) == cfg
    assert EHRSRConfig.from_dict(data).to_dict() == data
    assert EHRSRConfig.from_json(cfg.to_json()) == cfg
    assert EHRSRConfig.from_yaml(cfg.to_yaml()) == cfg
    # the serialised forms are plain data, readable by any JSON / YAML tool
    assert json.loads(cfg.to_json()) == data
    assert yaml.safe_load(cfg.to_yaml()) == data


def test_file_round_trip(tmp_path) -> None:
    cfg = _everything_on()
    for name in ("cfg.json", "cfg.yaml"):
        cfg.save(tmp_path / name)
        assert EHRSRConfig.load(tmp_path / name) == cfg


def test_partial_dict_uses_defaults_and_is_frozen() -> None:
    cfg = EHRSRConfig.from_dict({"width": 48, "wab": {"enabled": True}})
    assert cfg.width == 48 and cfg.wab.enabled and cfg.wab.window_size == 8 and cfg.scale == 4
    with pytest.raises(AttributeError):
        cfg.width = 8  # type: ignore[misc]
    assert cfg.enabled_modules() == ("wab",)
    assert cfg.trunk_width == 48 * 4  # default trunk at the lowest of 2 levels


def test_unknown_keys_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown configuration key 'widht'.*valid keys: scale, in_channels"):
        EHRSRConfig.from_dict({"widht": 32})
    with pytest.raises(ValueError, match=r"'moe.topk' in 'moe'; valid keys: enabled, n_experts, top_k"):
        EHRSRConfig.from_dict({"moe": {"topk": 1}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"scale": 5}, "scale"),
        ({"scale": 0}, "scale"),
        ({"moe": {"n_experts": 2, "top_k": 3}}, "moe.top_k"),
        ({"moe": {"n_experts": 5}}, "moe.n_experts"),
        ({"moe": {"capacity_factor": 0.5}}, "moe.capacity_factor"),
        ({"msg": {"levels": 4, "depths": [1, 1, 1, 1]}}, "msg.levels"),
        ({"msg": {"levels": 3}}, "msg.depths"),
        ({"trunk_level": 3}, "trunk_level"),
        ({"wab": {"heads": 5}}, "wab.heads"),
        ({"ssm": {"directions": 3}}, "ssm.directions"),
        ({"repmix": {"kernel_size": 12}}, "repmix.kernel_size"),
        ({"repmix": {"kernel_size": 19}}, "repmix.kernel_size"),
        ({"repmix": {"partial_ratio": 0.0}}, "repmix.partial_ratio"),
        ({"fsb": {"cutoff": 1.0}}, "fsb.cutoff"),
        ({"block_type": "resnet"}, "block_type"),
        ({"msg": {"skip_fusion": "mul"}}, "msg.skip_fusion"),
        ({"noise": {"eval_mode": "random"}}, "noise.eval_mode"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"width": "wide"}, "width"),
        ({"wab": {"enabled": "yes"}}, "wab.enabled"),
        ({"msg": {"depths": 2}}, "msg.depths"),
        ({"moe": 3}, "moe"),
        ({"out_channels": 1}, "out_channels"),
    ],
)
def test_impossible_values_raise_naming_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        EHRSRConfig.from_dict(data)
    assert field in str(info.value)


def test_integral_floats_are_accepted_as_ints() -> None:
    # YAML / Optuna sometimes deliver 32.0 for an int; a whole number is unambiguous
    assert EHRSRConfig.from_dict({"width": 32.0}).width == 32
    with pytest.raises(ValueError, match="width must be an integer"):
        EHRSRConfig.from_dict({"width": 32.5})


def test_malformed_text_and_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        EHRSRConfig.from_yaml("width: [32\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        EHRSRConfig.from_json("{width: 32}")
    with pytest.raises(ValueError, match="must be a mapping"):
        EHRSRConfig.from_yaml("- 1\n- 2\n")
    with pytest.raises(ValueError, match="cannot read configuration"):
        EHRSRConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scale: 7\n")
    with pytest.raises(ValueError, match=r"bad.yaml: scale must be"):
        EHRSRConfig.load(bad)


def test_replace_merges_nested_sections() -> None:
    cfg = EHRSRConfig().replace(moe={"enabled": True, "top_k": 1}, width=16)
    assert cfg.moe.enabled and cfg.moe.top_k == 1 and cfg.moe.n_experts == 4 and cfg.width == 16
    with pytest.raises(ValueError, match=r"moe\.top_k"):
        cfg.replace(moe={"n_experts": 2, "top_k": 3})
