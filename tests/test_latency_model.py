"""Per-device latency models: file format, refusals, composition, unit coverage, a real calibration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrsr.config import EHRSRConfig
from ehrsr.profiling import latency_model as lm
from ehrsr.profiling.latency_model import (
    FORMAT_VERSION,
    LatencyModel,
    LatencyModelError,
    LatencyTarget,
    calibrate,
    enumerate_units,
    sample_configs,
    space_fingerprint,
    unit_module,
    units_of,
)
from ehrsr.search.space import SearchSpace, load_space, space_from_text

SMALL = EHRSRConfig.from_dict({"width": 8, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1})
TWO_WIDTHS = """
model:
  width: {choices: [8, 24]}
  block_type: naf
  msg.levels: 0
  trunk_blocks: {low: 1, high: 3}
training: {patch_size: 16, batch_size: 2, lr: 1.0e-3, min_steps: 2, eta: 2, max_steps: 4,
           seconds_per_trial_estimate: 1}
"""
TARGET = LatencyTarget("edge", "cpu", "torch", 1, "float32", (32, 32))


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return load_space("tiny")


def _hand_model(space: SearchSpace, config: EHRSRConfig, costs: dict[str, float], scale: float = 1.0,
                offset: float = 0.0) -> LatencyModel:
    units = {u.key: {"latency_ms": costs[u.key]} for u in units_of(config, TARGET.input_hw)}
    return LatencyModel(TARGET, space_fingerprint(space), units, scale, offset)


def test_prediction_is_the_corrected_sum_of_unit_costs(tiny):
    config = EHRSRConfig.from_dict({"width": 8, "msg": {"levels": 1, "depths": [2]}, "trunk_blocks": 2,
                                    "wab": {"enabled": True, "heads": 2, "window_size": 4}})
    units = units_of(config, TARGET.input_hw)
    keys = sorted({u.key for u in units})
    costs = {key: 0.5 + i for i, key in enumerate(keys)}
    expected_sum = sum(costs[u.key] for u in units)  # a repeated key counts once per occurrence
    assert len(units) > len(keys)  # the two encoder blocks share one key here
    model = _hand_model(tiny, config, costs, scale=1.5, offset=2.0)
    prediction = model.predict(config)
    assert prediction.covered and prediction.missing_units == ()
    assert prediction.units_sum_ms == pytest.approx(expected_sum)
    assert prediction.latency_ms == pytest.approx(1.5 * expected_sum + 2.0)


def test_missing_unit_is_reported_and_gives_no_latency(tiny):
    config = SMALL
    model = _hand_model(tiny, config, {u.key: 1.0 for u in units_of(config, TARGET.input_hw)})
    other = config.replace(repmix={"enabled": True, "kernel_size": 5})
    prediction = model.predict(other)
    assert not prediction.covered and prediction.latency_ms is None
    assert len(prediction.missing_units) == 1 and prediction.missing_units[0].startswith("repmix(C=8,H=32,W=32,kernel=5")
    # another input size is another set of units
    assert not model.predict(config, (64, 64)).covered


def test_units_mirror_the_network(tiny):
    """Every unit exists in the deploy form, takes its recorded shapes, and the units chain
    through the network: timing them separately runs the same modules the network runs."""
    for config in sample_configs(tiny, 6, seed=3):
        deploy = lm._deploy(config)
        listed = {u.path for u in units_of(config, (20, 28))}
        for unit in units_of(config, (20, 28)):
            module = unit_module(deploy, unit)
            with torch.inference_mode():
                module(*[torch.rand(s) for s in unit.input_shapes])
        # every non-identity leaf-parent of the network is covered by some unit path
        for name in ("down", "encoders", "up", "fusions", "decoders"):
            for i, _ in enumerate(getattr(deploy, name)):
                if name in ("encoders", "decoders") and len(getattr(deploy, name)[i]) == 0:
                    continue
                assert any(p.startswith(f"{name}.{i}") for p in listed), (name, i, config)
        for i, block in enumerate(deploy.trunk):
            for sub in ("conv", "wab", "ssm", "fsb", "moe", "repmix"):
                if not isinstance(getattr(block, sub), torch.nn.Identity):
                    assert f"trunk.{i}.{sub}" in listed


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_enumeration_covers_every_sampled_configuration(name):
    space = load_space(name)
    catalogue = enumerate_units(space, (128, 128), seed=0)
    for config in sample_configs(space, 200, seed=12345):  # another seed than the enumeration's
        missing = {u.key for u in units_of(config, (128, 128))} - set(catalogue)
        assert not missing, (config, missing)


def test_file_round_trip_and_refusals(tmp_path: Path, tiny):
    config = SMALL
    model = _hand_model(tiny, config, {u.key: 1.25 for u in units_of(config, TARGET.input_hw)}, 1.1, 0.3)
    model.accuracy = lm.Accuracy(5, 4.0, 9.0, 0.97)
    path = tmp_path / "edge.json"
    model.save(path)
    loaded = LatencyModel.load(path, space=tiny, device=TARGET)
    assert loaded.units == model.units and loaded.target == TARGET and loaded.accuracy == model.accuracy
    assert loaded.predict(config).latency_ms == pytest.approx(model.predict(config).latency_ms)

    full = load_space("full")
    with pytest.raises(LatencyModelError, match="calibrated for search space 'tiny'"):
        LatencyModel.load(path, space=full)
    with pytest.raises(LatencyModelError, match="threads 1, not 2"):
        LatencyModel.load(path, device=LatencyTarget.from_profile(TARGET, threads=2))
    with pytest.raises(LatencyModelError, match="runtime 'torch', not 'onnxruntime'"):
        LatencyModel.load(path, device=LatencyTarget.from_profile(TARGET, runtime="onnxruntime"))
    with pytest.raises(LatencyModelError, match="calibrated on"):
        LatencyModel.load(path, hardware="some other CPU")

    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyModelError, match=f"format version {FORMAT_VERSION + 1}"):
        LatencyModel.load(path)
    data["format_version"] = FORMAT_VERSION
    del data["units"]
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyModelError, match="corrupt latency model: missing field 'units'"):
        LatencyModel.load(path)
    path.write_text("{not json")
    with pytest.raises(LatencyModelError, match="not valid JSON"):
        LatencyModel.load(path)
    with pytest.raises(LatencyModelError, match="cannot read latency model"):
        LatencyModel.load(tmp_path / "absent.json")
    assert issubclass(LatencyModelError, ValueError)


class _QuietCanary:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def calibrate(self) -> float:
        return 1.0

    def check(self):
        from ehrsr.profiling.canary import CanaryReading

        return CanaryReading(1.0, 1.0, 1.0, False)


def test_profile_settings_reach_the_timing(tmp_path: Path, monkeypatch):
    """A DeviceProfile-like object's runtime, threads, dtype and input size, and the clock, reach
    ``time_model``."""

    class Profile:
        name, kind, threads, dtype, runtime = "edge", "cpu", 2, "float32", "torch"

        def lr_input_size(self, scale: int) -> tuple[int, int]:
            return (24, 16)

    seen = []

    def spy(module, runtime, shapes, threads, *, dtype, budget_s, clock):
        seen.append((runtime, threads, dtype, shapes, clock))
        from ehrsr.profiling.latency import LatencyStats

        return LatencyStats(1.0, 1.0, 1.0, (1.0,), 0, 1, dtype, "spy")

    monkeypatch.setattr(lm, "time_model", spy)
    monkeypatch.setattr(lm, "Canary", _QuietCanary)  # a busy machine would time a batch twice
    space = space_from_text(TWO_WIDTHS, name="two-widths")  # 6 units: enumeration is instant
    model = calibrate(space, Profile(), tmp_path / "m.json", max_units=3, progress=False,
                      enumeration_patience=200)
    assert not model.complete and len(model.units) == 3
    assert {(r, t, d, c) for r, t, d, _, c in seen} == {("torch", 2, "float32", "wall")}
    assert seen[0][3][0] == (1, 3, 24, 16)  # the stem sees the profile's input size
    assert model.target.input_hw == (24, 16) and model.target.threads == 2
    # resume keeps what was timed and times only the rest
    seen.clear()
    calibrate(space, Profile(), tmp_path / "m.json", max_units=2, progress=False, enumeration_patience=200)
    assert len(seen) == 2 and len(LatencyModel.read(tmp_path / "m.json").units) == 5
    with pytest.raises(LatencyModelError, match="calibration did not finish"):
        LatencyModel.load(tmp_path / "m.json")
    # the CPU clock of a one-thread calibration reaches the timing the same way
    seen.clear()
    calibrate(space, Profile(), tmp_path / "cpu.json", threads=1, clock="cpu", max_units=2, progress=False,
              enumeration_patience=200)
    assert [(t, c) for _, t, _, _, c in seen] == [(1, "cpu"), (1, "cpu")]


def test_small_real_calibration_ranks_clearly_different_sizes(tmp_path: Path):
    """A real calibration of a one-point space (a handful of units, seconds) predicts a small, a
    medium and a large configuration in the right order, each within a factor of two."""
    space = space_from_text(TWO_WIDTHS, name="two-widths")
    target = LatencyTarget("here", "cpu", "torch", 1, "float32", (48, 48))
    model = calibrate(space, target, tmp_path / "m.json", n_fit=3, n_holdout=3, progress=False, enumeration_patience=200,
                      unit_budget_s=0.02, network_budget_s=0.05)
    assert model.complete and model.accuracy is not None and len(model.units) == 2 + 2 + 2  # stem, naf, head
    reloaded = LatencyModel.load(tmp_path / "m.json", space=space, device=target)
    small = SMALL
    large = small.replace(width=24, trunk_blocks=3)
    medium = small.replace(width=24, trunk_blocks=1)
    predicted = [reloaded.predict(c).latency_ms for c in (small, medium, large)]
    assert predicted[0] < predicted[1] < predicted[2]
    measured = [lm.measure_network(c, target, budget_s=0.05) for c in (small, large)]
    assert measured[0] < measured[1]
    for p, m in zip((predicted[0], predicted[2]), measured, strict=True):
        assert 0.5 < p / m < 2.0


def test_onnxruntime_calibration_times_units_inside_whole_networks(tmp_path: Path):
    """onnxruntime's ``graph`` unit timing: whole networks profiled, node times charged to units
    (the fusions across units included), each key's cost the median of its occurrences; resumable."""
    pytest.importorskip("onnxruntime")
    space = space_from_text(TWO_WIDTHS, name="two-widths")
    target = LatencyTarget("ort", "cpu", "onnxruntime", 1, "float32", (16, 16))
    path = tmp_path / "ort.json"
    options = dict(n_fit=3, n_holdout=2, progress=False, enumeration_patience=200, network_budget_s=0.02,
                   unit_timing="graph")
    partial = calibrate(space, target, path, max_units=1, **options)  # stops after the first network
    first = json.loads(path.read_text())["graph_networks"]
    assert not partial.complete and len(first) == 1 and 0 < len(partial.units) < 6
    model = calibrate(space, target, path, **options)  # resumes
    data = json.loads(path.read_text())
    assert model.complete and data["protocol"]["unit_timing"] == "graph"
    networks = data["graph_networks"]
    assert networks[0] == first[0]  # kept from the first run, not profiled again
    occurrences: dict[str, list[float]] = {}
    for network in networks:
        assert sum(ms for _, _, ms in network["units"]) + network["glue_ms"] == pytest.approx(network["graph_ms"])
        assert network["glue_ms"] == 0.0 and network["passes"] >= 5
        for _, key, ms in network["units"]:
            occurrences.setdefault(key, []).append(ms)
    assert set(occurrences) == set(model.units) and len(model.units) == 6
    for key, values in occurrences.items():
        assert len(values) >= lm.GRAPH_OBSERVATIONS  # this space lets every key occur twice
        assert model.units[key]["latency_ms"] == pytest.approx(float(np.median(values)))
        assert model.units[key]["observations"] == len(values)
    loaded = LatencyModel.load(path, space=space, device=target)
    assert loaded.predict(SMALL).covered and loaded.predict(SMALL).latency_ms > 0
    with pytest.raises(ValueError, match="for the onnxruntime runtime only"):
        calibrate(space, TARGET, tmp_path / "torch.json", **options)  # unit_timing="graph"
    with pytest.raises(LatencyModelError, match="another space or device settings"):
        calibrate(space, target, path, **{**options, "unit_timing": "isolated"})  # a resume must time units alike


def test_a_network_profiled_on_a_busy_machine_is_profiled_again_from_the_same_export(tmp_path: Path, monkeypatch):
    from ehrsr.profiling.canary import CanaryReading
    from ehrsr.profiling.onnx_graph import GraphAttribution

    class Busy(_QuietCanary):
        def check(self) -> CanaryReading:
            return CanaryReading(2.0, 1.0, 2.0, True)

    exports: list[Path] = []
    profiled: list[Path] = []

    def export(model, shapes, path):
        exports.append(Path(path))
        Path(path).write_text("onnx")
        return Path(path)

    def profile(path, shapes, unit_paths, threads, *, budget_s):
        profiled.append(Path(path))
        ms = 3.0 if len(profiled) == 1 else 1.0  # the second profile of the network is the faster
        paths = list(unit_paths)
        return GraphAttribution({p: ms for p in paths}, 0.0, ms * len(paths), ms * len(paths) + 1, 5,
                                dict.fromkeys(paths, "x"))

    monkeypatch.setattr(lm, "export_scoped", export)
    monkeypatch.setattr(lm, "profile_units", profile)
    monkeypatch.setattr(lm, "Canary", Busy)
    space = space_from_text(TWO_WIDTHS, name="two-widths")
    target = LatencyTarget("ort", "cpu", "onnxruntime", 1, "float32", (16, 16))
    model = calibrate(space, target, tmp_path / "ort.json", max_units=1, progress=False, enumeration_patience=200,
                      unit_timing="graph")
    assert len(exports) == 1 and profiled == [exports[0], exports[0]]  # exported once, profiled twice
    network = json.loads((tmp_path / "ort.json").read_text())["graph_networks"]
    assert len(network) == 1 and {ms for _, _, ms in network[0]["units"]} == {1.0}
    assert all(entry["latency_ms"] == 1.0 for entry in model.units.values())
    assert model.extra["canary"]["ratios"] == [2.0, 2.0]


def test_latency_for_profile_predicts_when_covered_and_measures_otherwise(tiny):
    from ehrsr.profiling.canary import Canary, CanaryReading

    class Quiet(Canary):
        def check(self) -> CanaryReading:
            return CanaryReading(1.0, 1.0, 1.05, False)

    model = _hand_model(tiny, SMALL, {u.key: 2.0 for u in units_of(SMALL, TARGET.input_hw)})
    measured = []

    def measure(config, target):
        measured.append((config, target))
        return 42.0

    record = lm.latency_for_profile(SMALL, TARGET, model, canary=Quiet(), measure=measure)
    assert record.source == "predicted" and record.latency_ms == pytest.approx(model.predict(SMALL).latency_ms)
    assert measured == []
    other = SMALL.replace(fsb={"enabled": True})
    record = lm.latency_for_profile(other, TARGET, model, canary=Quiet(), measure=measure)
    assert record.source == "measured" and record.latency_ms == 42.0 and measured == [(other, TARGET)]
    assert record.missing_units and record.missing_units[0].startswith("fsb(") and record.canary_ratio == 1.05
    assert record.to_dict()["missing_units"] == list(record.missing_units)
    # no model at all: measured
    assert lm.latency_for_profile(SMALL, TARGET, None, canary=Quiet(), measure=measure).source == "measured"


def test_correction_fit_recovers_a_linear_law_and_never_goes_negative():
    a, b = lm._fit_correction([1.0, 2.0, 3.0, 4.0], [2.5, 4.5, 6.5, 8.5])
    assert a == pytest.approx(2.0) and b == pytest.approx(0.5)
    a, b = lm._fit_correction([1.0, 2.0, 3.0], [1.0, 3.0, 5.0])  # free fit would need b = -1
    assert b == 0.0 and 1.0 < a < 2.5


def test_clock_and_runtime_refusals_come_from_one_helper(tmp_path: Path, tiny):
    """``check_timing_settings`` holds the rules; timing, targets, calibration and device profiles
    all refuse through it, with its words."""
    from ehrsr.deploy.profiles import DeviceProfileError, load_device_profiles
    from ehrsr.profiling.onnx_runtime import check_timing_settings, time_model

    check_timing_settings("torch", clock="cpu", threads=1)  # the settings that can be timed pass
    check_timing_settings("onnxruntime", threads=4)
    check_timing_settings("torch", kind="cuda", dtype="float16")
    refusals = {
        "runtime must be one of torch, onnxruntime, got 'tvm'": dict(runtime="tvm"),
        "needs kind cpu and dtype float32 (got kind cuda, dtype float32)": dict(runtime="onnxruntime", kind="cuda"),
        "needs kind cpu and dtype float32 (got kind cpu, dtype float16)": dict(runtime="onnxruntime", dtype="float16"),
        "clock must be one of wall, cpu, got 'sundial'": dict(runtime="torch", clock="sundial"),
        "clock 'cpu' measures latency with one thread only, got threads=2": dict(runtime="torch", clock="cpu", threads=2),
        "clock 'cpu' is for the torch runtime only": dict(runtime="onnxruntime", clock="cpu", threads=1),
    }
    for message, settings in refusals.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            check_timing_settings(**settings)

    one_thread = "clock 'cpu' measures latency with one thread only"
    with pytest.raises(ValueError, match=one_thread):
        time_model(torch.nn.Identity(), "torch", (1, 3, 8, 8), 2, clock="cpu")
    with pytest.raises(ValueError, match=one_thread):
        calibrate(tiny, LatencyTarget.from_profile(TARGET, threads=2), tmp_path / "m.json", clock="cpu")
    with pytest.raises(ValueError, match="torch runtime only"):
        time_model(torch.nn.Identity(), "onnxruntime", (1, 3, 8, 8), 1, clock="cpu")
    with pytest.raises(ValueError, match="torch runtime only"):
        calibrate(tiny, LatencyTarget.from_profile(TARGET, threads=1, runtime="onnxruntime"), tmp_path / "m.json",
                  clock="cpu")
    with pytest.raises(ValueError, match="needs kind cpu and dtype float32"):
        LatencyTarget("g", "cuda", "onnxruntime", None, "float32", (8, 8)).validate()
    with pytest.raises(ValueError, match="needs kind cpu and dtype float32"):
        time_model(torch.nn.Identity(), "onnxruntime", (1, 3, 8, 8), 1, dtype="bfloat16")
    devices = tmp_path / "d.yaml"
    devices.write_text("profiles:\n  g:\n    kind: cpu\n    dtype: float16\n    runtime: onnxruntime\n"
                       "    input_size: [8, 8]\n")
    with pytest.raises(DeviceProfileError, match=r"g.*needs kind cpu and dtype float32"):
        load_device_profiles(devices)
    assert not (tmp_path / "m.json").exists()  # refused before anything is written
    stats = time_model(torch.nn.Conv2d(3, 3, 3), "torch", (1, 3, 16, 16), 1, clock="cpu", warmup=1, repeats=5)
    assert stats.repeats == 5 and stats.latency_ms >= 0 and "cpu clock" in stats.device


def test_an_older_file_format_is_refused_in_one_line_that_says_to_calibrate_again(tmp_path: Path, tiny):
    model = _hand_model(tiny, SMALL, {u.key: 1.0 for u in units_of(SMALL, TARGET.input_hw)})
    path = tmp_path / "edge.json"
    model.save(path)
    assert LatencyModel.load(path).units == model.units
    data = json.loads(path.read_text())
    for version, why in ((2, "onnxruntime units were timed exported one by one"),
                         (1, "timed without the compiled CPU scan")):
        data["format_version"] = version
        path.write_text(json.dumps(data))
        with pytest.raises(LatencyModelError) as refused:
            LatencyModel.load(path, space=tiny, device=TARGET)
        message = str(refused.value)
        assert "\n" not in message and f"format version {version}" in message and why in message
        assert f"reads version {FORMAT_VERSION}" in message
        assert message.endswith("calibrate again on the device "
                                "(python run_search.py calibrate --device-profile edge --space tiny)")
    assert FORMAT_VERSION == 3


def test_onnxruntime_timing_runs_the_exported_model_with_several_inputs():
    from ehrsr.profiling.onnx_runtime import time_model

    deploy = lm._deploy(EHRSRConfig.from_dict({"width": 8, "trunk_blocks": 1,
                                               "msg": {"levels": 1, "depths": [1], "attention_gate": True}}))
    unit = next(u for u in units_of(deploy.config, (16, 16)) if u.path.startswith("fusions"))
    stats = time_model(unit_module(deploy, unit), "onnxruntime", list(unit.input_shapes), 1, warmup=1, repeats=5)
    assert stats.repeats == 5 and "[onnxruntime]" in stats.device
