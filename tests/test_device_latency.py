"""Per-device latency models in the search, calibrate, deploy and the reports (docs/latency_models.md).

The latency models here are written by hand (unit costs chosen by the test) instead of calibrated,
so every predicted number is known exactly and the tests run in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ehrsr.cli import main
from ehrsr.config import EHRSRConfig
from ehrsr.profiling.latency_model import (
    Accuracy,
    LatencyModel,
    LatencyTarget,
    enumerate_units,
    sample_configs,
    space_fingerprint,
    units_of,
)
from ehrsr.search.space import load_space
from ehrsr.study_schema import CANARY_ATTR, LATENCY_SOURCES_ATTR

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")
HW = (16, 16)
BUSY_LOOP = "import time\nprint('ready', flush=True)\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


def _unit_cost(key: str) -> float:
    """Hand-made unit costs: wide units are expensive, so the micro space's predictions spread."""
    return 4.0 if "C=8" in key else 0.5


def _hand_model(space, target: LatencyTarget, *, drop: str | None = None, accuracy=(12, 7.5, 15.0, 0.93)) -> LatencyModel:
    keys = enumerate_units(space, target.input_hw, patience=300)
    units = {key: {"latency_ms": _unit_cost(key)} for key in keys if drop is None or drop not in key}
    return LatencyModel(target, space_fingerprint(space), units, 1.5, 0.25, Accuracy(*accuracy))


def _devices_file(tmp_path: Path, space, *, drop: str | None = None) -> Path:
    """Two CPU profiles with hand-made latency models for ``space`` at 16x16 (one thread, two threads)."""
    for name, threads in (("edge-test", 1), ("other-test", 2)):
        target = LatencyTarget(name, "cpu", "torch", threads, "float32", HW)
        _hand_model(space, target, drop=drop).save(tmp_path / "models" / f"{name}.json")
    path = tmp_path / "devices.yaml"
    path.write_text(
        "profiles:\n"
        "  edge-test:\n    kind: cpu\n    threads: 1\n    input_size: [16, 16]\n    latency_model: models/edge-test.json\n"
        "  other-test:\n    kind: cpu\n    threads: 2\n    input_size: [16, 16]\n    latency_model: models/other-test.json\n"
        "  no-model:\n    kind: cpu\n    threads: 1\n    input_size: [16, 16]\n"
    )
    return path


def _predicted(space, config: EHRSRConfig) -> float:
    return 1.5 * sum(_unit_cost(u.key) for u in units_of(config, HW)) + 0.25


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


def _search_args(tmp_path: Path, devices: Path, name: str) -> list[str]:
    return ["--space", MICRO, "--out-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "c"),
            "--profile-size", "16", "--study-name", name, "--quiet", "--devices-file", str(devices),
            "--profile-seconds", "0.000001", "--ablation-share", "0"]


def test_search_with_predicted_latency_objective_and_limit(tmp_path: Path) -> None:
    space = load_space(MICRO)
    devices = _devices_file(tmp_path, space)
    predictions = sorted({_predicted(space, c) for c in sample_configs(space, 200, seed=1)})
    limit = predictions[len(predictions) // 2]  # about half of the micro space is over it
    code = main([*_search_args(tmp_path, devices, "dev"), "--budget", "trials=8", "--sampler", "random",
                 "--objectives", "psnr,latency@edge-test", "--max-latency-ms", f"other-test={limit}"])
    assert code == 0
    study = _study(tmp_path / "reports", "dev")
    assert study.user_attrs["objectives"] == ["psnr", "latency@edge-test"]
    models = study.user_attrs["latency_models"]
    assert set(models) == {"edge-test", "other-test"} and models["edge-test"]["accuracy"]["median_abs_pct_error"] == 7.5
    refused = complete = 0
    for trial in study.trials:
        config = EHRSRConfig.from_dict(trial.user_attrs["config"])
        metrics = trial.user_attrs["metrics"]
        sources = trial.user_attrs[LATENCY_SOURCES_ATTR]
        expected = _predicted(space, config)
        assert metrics["latency_ms@other-test"] == pytest.approx(expected)
        assert sources["other-test"]["source"] == "predicted"
        assert sources["other-test"]["model"].endswith("other-test.json")
        if expected > limit:
            refused += 1
            assert trial.user_attrs["status"] == "refused" and "latency on other-test" in trial.user_attrs["reason"]
            assert "charged_seconds" not in trial.user_attrs  # refused before training
            continue
        assert metrics["latency_ms@edge-test"] == pytest.approx(expected)  # same unit costs, same correction
        # only predicted latencies are objectives: nothing was timed on this machine
        assert metrics["latency_ms"] is None and "this machine" not in sources and CANARY_ATTR not in trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            complete += 1
            assert trial.values[1] == pytest.approx(expected)
    assert refused and complete
    # the report marks predicted numbers and states the model's accuracy per device
    assert main(["report", "--study-name", "dev", "--out-dir", str(tmp_path / "reports"), "--quiet"]) == 0
    report = (tmp_path / "reports" / "dev" / "report.md").read_text()
    assert "latency on edge-test, predicted (ms)" in report
    assert "edge-test" in report and "7.5" in report and "0.93" in report


def test_missing_unit_falls_back_to_measuring_here(tmp_path: Path) -> None:
    space = load_space(MICRO)
    devices = _devices_file(tmp_path, space, drop="fsb(")
    code = main([*_search_args(tmp_path, devices, "fb"), "--budget", "trials=4", "--sampler", "random",
                 "--objectives", "psnr,latency,latency@edge-test"])
    assert code == 0
    study = _study(tmp_path / "reports", "fb")
    seen = set()
    for trial in study.trials:
        config = EHRSRConfig.from_dict(trial.user_attrs["config"])
        source = trial.user_attrs[LATENCY_SOURCES_ATTR]["edge-test"]
        if config.fsb.enabled:
            assert source["source"] == "measured" and any(k.startswith("fsb(") for k in source["missing_units"])
            assert source["canary_ratio"] is not None and source["canary_ratio"] > 0
        else:
            assert source["source"] == "predicted" and source["missing_units"] == []
        seen.add(source["source"])
        # `latency` (this machine) is an objective: measured next to a canary reading
        assert trial.user_attrs["metrics"]["latency_ms"] > 0
        assert trial.user_attrs[LATENCY_SOURCES_ATTR]["this machine"]["source"] == "measured"
        if "cost_from_trial" not in trial.user_attrs:  # a revisited configuration reuses its cost, untimed
            assert trial.user_attrs[CANARY_ATTR]["ratio"] > 0
    assert seen == {"measured", "predicted"}


@pytest.mark.parametrize(
    ("objectives", "extra", "message"),
    [
        ("psnr,latency@no-model", [], "has no latency_model"),
        ("psnr,latency@nowhere", [], "no device profile 'nowhere'"),
        ("psnr,latency@edge-test", ["--space", "tiny"], "calibrated for search space 'micro'"),
        ("psnr", ["--max-latency-ms", "edge-test=abc"], "give milliseconds"),
    ],
)
def test_refusals_exit_2_before_the_study_exists(objectives, extra, message, tmp_path: Path, capsys) -> None:
    devices = _devices_file(tmp_path, load_space(MICRO))
    code = main([*_search_args(tmp_path, devices, "bad"), "--budget", "trials=1", "--objectives", objectives, *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    db = tmp_path / "reports" / "bad" / "study.db"
    assert not db.exists() or "bad" not in optuna.get_all_study_names(f"sqlite:///{db}")


def test_devices_yaml_syntax_error_names_the_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "devices.yaml"
    bad.write_text("profiles:\n  edge:\n    kind: cpu\n    input_size: [16, 16\n    threads: 1\n")
    from ehrsr.deploy import DeviceProfileError, load_device_profiles

    with pytest.raises(DeviceProfileError, match=r"line \d+, column \d+"):
        load_device_profiles(bad)
    code = main(["--objectives", "psnr,latency@edge", "--devices-file", str(bad), "--out-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "line 5" in err[0], err


def test_profile_runtime_and_latency_model_fields(tmp_path: Path) -> None:
    from ehrsr.deploy import DeviceProfileError, load_device_profiles

    shipped = load_device_profiles()
    assert shipped["laptop-cpu-onnx"].runtime == "onnxruntime" and shipped["edge-strict"].runtime == "torch"
    path = tmp_path / "d.yaml"
    path.write_text("profiles:\n  g:\n    kind: cuda\n    runtime: onnxruntime\n    input_size: [8, 8]\n")
    with pytest.raises(DeviceProfileError, match="needs kind cpu and dtype float32"):
        load_device_profiles(path)
    path.write_text("profiles:\n  c:\n    kind: cpu\n    runtime: tvm\n    input_size: [8, 8]\n")
    with pytest.raises(DeviceProfileError, match="runtime must be one of torch, onnxruntime"):
        load_device_profiles(path)
    path.write_text("profiles:\n  c:\n    kind: cpu\n    input_size: [8, 8]\n    latency_model: m/c.json\n")
    assert load_device_profiles(path)["c"].latency_model == str(tmp_path / "m" / "c.json")


def test_calibrate_subcommand_writes_a_loadable_model(tmp_path: Path, monkeypatch, capsys) -> None:
    """A real calibration of the micro space at 8x8, with every timing replaced by a spy that
    counts the calls and returns a cost proportional to the module's parameters."""
    import ehrsr.profiling.latency_model as lm
    from ehrsr.profiling.latency import LatencyStats

    space_file = Path(MICRO)
    calls: list[str] = []

    def fake_time_model(model, runtime, input_shapes, threads=None, **kwargs):
        calls.append(runtime)
        ms = 0.1 + sum(p.numel() for p in model.parameters()) / 1000
        return LatencyStats(ms, ms, ms, (ms,) * 5, 1, 5, "float32", "cpu (fake)")

    monkeypatch.setattr(lm, "time_model", fake_time_model)
    devices = tmp_path / "devices.yaml"
    devices.write_text("profiles:\n  tinydev:\n    kind: cpu\n    threads: 1\n    input_size: [8, 8]\n")
    out = tmp_path / "tinydev.json"
    code = main(["calibrate", "--device-profile", "tinydev", "--space", str(space_file), "--out", str(out),
                 "--devices-file", str(devices), "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert str(out) in printed and "held-out accuracy" in printed and "Spearman" in printed
    model = LatencyModel.load(out, space=load_space(str(space_file)),
                              device=LatencyTarget("tinydev", "cpu", "torch", 1, "float32", (8, 8)))
    assert calls and set(calls) == {"torch"} and model.accuracy is not None and len(model.units) > 0
    # the spy's costs add up exactly, so the fitted model predicts the held-out networks well
    assert model.accuracy.n > 0 and model.accuracy.median_abs_pct_error < 25
    # bad input: one line, exit 2
    assert main(["calibrate", "--device-profile", "nope", "--space", str(space_file), "--devices-file", str(devices)]) == 2
    assert "unknown device profile 'nope'" in capsys.readouterr().err
    # the CPU clock is refused for onnxruntime (its passes did not repeat in CPU time)
    devices.write_text("profiles:\n  ortdev:\n    kind: cpu\n    runtime: onnxruntime\n    threads: 1\n"
                       "    input_size: [8, 8]\n")
    assert main(["calibrate", "--device-profile", "ortdev", "--space", str(space_file), "--devices-file",
                 str(devices), "--clock", "cpu", "--out", str(tmp_path / "ort.json")]) == 2
    err = capsys.readouterr().err
    assert "calibrate ortdev with --clock cpu: clock 'cpu' is for the torch runtime only" in err
    # --unit-timing reaches the calibration (isolated by default); graph is for onnxruntime only
    asked: list[str] = []
    real_calibrate = lm.calibrate

    def spy(*args, unit_timing=None, **kwargs):
        asked.append(unit_timing)
        return SimpleNamespace(units={}, accuracy=None)

    monkeypatch.setattr(lm, "calibrate", spy)
    for extra in ([], ["--unit-timing", "graph"]):
        assert main(["calibrate", "--device-profile", "ortdev", "--space", str(space_file), "--devices-file",
                     str(devices), "--out", str(tmp_path / "ort.json"), "--quiet", *extra]) == 0
    assert asked == ["isolated", "graph"]
    monkeypatch.setattr(lm, "calibrate", real_calibrate)
    devices.write_text("profiles:\n  tinydev:\n    kind: cpu\n    threads: 1\n    input_size: [8, 8]\n")
    assert main(["calibrate", "--device-profile", "tinydev", "--space", str(space_file), "--devices-file",
                 str(devices), "--out", str(tmp_path / "t2.json"), "--unit-timing", "graph"]) == 2
    assert "calibrate tinydev: unit timing 'graph' reads onnxruntime's profiler" in capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ort.json").exists()


def test_canary_ratio_stored_with_the_local_latency_rises_under_load(tmp_path: Path) -> None:
    """The same run context measures one configuration on a quiet machine and then under an
    artificial CPU load: the canary ratio stored with the second is higher and flagged."""
    from ehrsr.search.runner import RunContext, measure_cost_checked
    from ehrsr.study_schema import OBJECTIVES

    ctx = RunContext(train_set=None, val_set=None, objectives=[OBJECTIVES["psnr"], OBJECTIVES["latency"]],
                     profile_shape=(1, 3, 16, 16), threads=1, profile_seconds=0.02, canary_checked=True)
    from ehrsr.model import build_model

    model = build_model(EHRSRConfig.from_dict({"width": 4, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1}))
    _, quiet = measure_cost_checked(model, ctx, None)
    n_busy = 6 * (os.cpu_count() or 1)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True) for _ in range(n_busy)]
    try:
        for process in busy:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        _, loaded = measure_cost_checked(model, ctx, None)
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()
    assert quiet is not None and loaded is not None
    assert loaded["quiet_ms"] == quiet["quiet_ms"]  # one quiet reference per search process
    assert loaded["ratio"] > quiet["ratio"] + 0.25 and loaded["contended"] and loaded["attempts"] == 2


def test_deploy_records_predicted_and_measured_side_by_side(tmp_path: Path) -> None:
    torch.manual_seed(0)
    space = load_space(MICRO)
    devices = _devices_file(tmp_path, space)
    assert main([*_search_args(tmp_path, devices, "dep"), "--budget", "trials=4", "--objectives",
                 "psnr,latency@edge-test", "--no-early-stopping"]) == 0
    import json

    # edge-test's model was "calibrated" on another machine (hardware differs): the pick uses predictions
    data = json.loads((tmp_path / "models" / "edge-test.json").read_text())
    data["device"]["hardware"] = "some other CPU"
    (tmp_path / "models" / "edge-test.json").write_text(json.dumps(data))
    code = main(["deploy", "--study-name", "dep", "--out-dir", str(tmp_path / "reports"), "--device-profile",
                 "edge-test", "--devices-file", str(devices), "--quiet"])
    assert code == 0
    pick = json.loads((tmp_path / "reports" / "dep" / "deploy" / "edge-test.json").read_text())
    assert pick["latency"]["mode"] == "predicted"
    assert "hardware" in pick["latency"]["why"]
    study = _study(tmp_path / "reports", "dep")
    for candidate in pick["candidates"]:
        config = EHRSRConfig.from_dict(study.trials[candidate["trial"]].user_attrs["config"])
        assert candidate["latency_ms_predicted"] == pytest.approx(_predicted(space, config))
        assert candidate["latency_ms_measured"] is None
    # on the device (same hardware): measured again, both numbers kept, and whether the pick changed
    from ehrsr.profiling.latency import cpu_name

    data["device"]["hardware"] = cpu_name()
    (tmp_path / "models" / "edge-test.json").write_text(json.dumps(data))
    assert main(["deploy", "--study-name", "dep", "--out-dir", str(tmp_path / "reports"), "--device-profile",
                 "edge-test", "--devices-file", str(devices), "--quiet"]) == 0
    pick = json.loads((tmp_path / "reports" / "dep" / "deploy" / "edge-test.json").read_text())
    assert pick["latency"]["mode"] == "measured"
    assert isinstance(pick["latency"]["pick_changed"], bool)
    for candidate in pick["candidates"]:
        assert candidate["latency_ms_measured"] > 0 and candidate["latency_ms_predicted"] > 0


def test_onnxruntime_profile_times_through_onnxruntime(monkeypatch) -> None:
    """A profile with ``runtime: onnxruntime`` reaches ``time_model`` with that runtime and its
    threads, and the pick's latency is that timing (spy: no export needed)."""
    import ehrsr.profiling.onnx_runtime as ort_module
    from ehrsr.deploy.pick import _measure
    from ehrsr.deploy.profiles import DeviceProfile
    from ehrsr.model import build_model
    from ehrsr.profiling.latency import LatencyStats

    seen: list[tuple] = []

    def spy(model, runtime, input_shapes, threads=None, **kwargs):
        seen.append((runtime, tuple(input_shapes), threads))
        return LatencyStats(7.25, 7.0, 7.5, (7.25,) * 5, 2, 5, "float32", "cpu (spy)")

    monkeypatch.setattr(ort_module, "time_model", spy)
    profile = DeviceProfile("ort", "cpu", threads=1, input_size=(16, 16), runtime="onnxruntime")
    model = build_model(EHRSRConfig.from_dict({"width": 4, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1}))
    measured = _measure(model, profile, (16, 16), 3)
    assert seen == [("onnxruntime", (1, 3, 16, 16), 1)]
    assert measured["latency_ms"] == 7.25 and measured["runtime"] == "onnxruntime" and measured["repeats"] == 5


def test_baselines_in_a_predicted_latency_study_are_measured_per_profile(tmp_path: Path) -> None:
    # a hand-designed baseline has no EHR-SR configuration, so no latency model can predict it: its
    # latency on each profile is measured here (it once ended "diverged" with no value at all)
    from ehrsr.baselines import available_baselines
    from ehrsr.reports.baselines import baseline_runs

    space = load_space(MICRO)
    devices = _devices_file(tmp_path, space)
    assert main([*_search_args(tmp_path, devices, "bl"), "--budget", "trials=2", "--sampler", "random",
                 "--objectives", "psnr,latency@edge-test", "--max-latency-ms", "other-test=1000",
                 "--baselines", "none", "--fidelity-share", "0"]) == 0
    name = next(i.name for i in available_baselines() if i.available)
    assert main(["baselines", "--study-name", "bl", "--out-dir", str(tmp_path / "reports"),
                 "--baselines", name, "--quiet"]) == 0
    runs = baseline_runs(_study(tmp_path / "reports", "bl"))
    assert runs and all(r.status == "complete" for r in runs)
    for run in runs:
        assert run.metrics["latency_ms@edge-test"] > 0
        assert run.metrics["latency_ms@other-test"] > 0  # the limits' profile too
