"""Device profiles and deployment picks: validation, the choice, the written weights, ONNX."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch
from safetensors.torch import load_file, save_file

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.deploy import (
    DEVICES_PATH,
    DeploymentError,
    DeviceProfile,
    DeviceProfileError,
    MeasuredCandidate,
    choose_candidate,
    export_onnx,
    load_deployed_model,
    load_device_profiles,
    load_trained_model,
    pick_deployment,
    profiles_for_device,
)
from ehrsr.deploy.pick import _violations
from ehrsr.study_schema import metric_info
from tests.model_helpers import randomize_head
from tests.reports_study import study_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# Pareto candidates: better PSNR costs more latency (the study's objectives), so all are on the front
FRONT = [
    ({"width": 8}, 26.50, 2.0),
    ({"width": 12, "repmix": {"enabled": True, "kernel_size": 5}}, 26.80, 3.0),
    ({"width": 16, "fsb": {"enabled": True}}, 27.00, 4.0),
    ({"width": 24, "wab": {"enabled": True, "window_size": 4, "heads": 2}}, 27.30, 5.0),
]
COMMON = {"msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1}


def deploy_params(config: EHRSRConfig) -> int:
    """Parameters of the fused (deploy) network, counted independently of the profiler."""
    return sum(p.numel() for p in reparameterize(build_model(config)).parameters())


@pytest.fixture(scope="module")
def deploy_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    study = optuna.create_study(
        study_name="dep", storage=f"sqlite:///{root / 'study.db'}", directions=["maximize", "minimize"]
    )
    for key, value in study_attrs(("psnr", "latency")).items():
        study.set_user_attr(key, value)
    (root / "weights").mkdir()
    configs = []
    torch.manual_seed(0)
    for index, (changes, psnr, latency) in enumerate(FRONT):
        config = EHRSRConfig.from_dict({**COMMON, **changes})
        configs.append(config)
        relative = f"weights/trial_{index}.safetensors"
        model = build_model(config)
        with torch.no_grad():  # non-trivial weights, so fusing and reloading is really tested
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / relative))
        attrs = {
            "config": config.to_dict(), "weights": relative, "status": "complete",
            "metrics": {"psnr": psnr, "ssim": 0.7, "lpips": None, "latency_ms": latency},
            "train": {"lr": 1e-3, "steps": 180, "batch_size": 8, "patch_size": 32, "loss": "l1", "seed": 0},
        }
        study.add_trial(optuna.trial.create_trial(values=[psnr, latency], user_attrs=attrs))
    # on the front but its weights file is gone; and a dominated trial (never a candidate)
    gone = {"config": configs[0].to_dict(), "weights": "weights/missing.safetensors", "metrics": {"psnr": 26.9}}
    study.add_trial(optuna.trial.create_trial(values=[26.9, 3.5], user_attrs=gone))
    worse = {"config": configs[0].to_dict(), "weights": "weights/trial_0.safetensors", "metrics": {"psnr": 26.0}}
    study.add_trial(optuna.trial.create_trial(values=[26.0, 9.0], user_attrs=worse))
    return study, root, configs


def cpu_profile(**limits) -> DeviceProfile:
    return DeviceProfile(name="test-cpu", kind="cpu", threads=1, input_size=(32, 32), warmup=1, repeats=3, **limits)


# ---------------------------------------------------------------------------------------------
# profiles


def test_shipped_profiles_load_and_derive_the_input_size():
    profiles = load_device_profiles()
    assert DEVICES_PATH.name == "devices.yaml"
    assert set(profiles) == {"datacenter-gpu-1080p", "laptop-cpu-256", "edge-strict", "laptop-cpu-onnx"}
    gpu = profiles["datacenter-gpu-1080p"]
    assert gpu.kind == "cuda" and gpu.dtype == "float16" and gpu.output_size == (1080, 1920)
    # 1080p output: 270x480 input at x4, 360x640 at x3, 540x960 at x2, the frame itself at x1
    assert [gpu.lr_input_size(s) for s in (4, 3, 2, 1)] == [(270, 480), (360, 640), (540, 960), (1080, 1920)]
    laptop = profiles["laptop-cpu-256"]
    assert laptop.lr_input_size(4) == (256, 256) and laptop.threads == 4
    edge = profiles["edge-strict"]
    assert edge.limits() == {"max_latency_ms": 50.0, "max_memory_mb": 64.0, "max_params": 100000.0}
    assert profiles_for_device(profiles, "cpu") == ["laptop-cpu-256", "edge-strict"]  # not the onnxruntime one
    assert profiles["laptop-cpu-onnx"].runtime == "onnxruntime" and profiles["laptop-cpu-256"].runtime == "torch"
    assert profiles_for_device(profiles, "cuda") == ["datacenter-gpu-1080p"]
    odd = DeviceProfile(name="odd", kind="cpu", output_size=(1080, 1922))
    with pytest.raises(DeviceProfileError, match="not a multiple of the study's scale x4"):
        odd.lr_input_size(4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "cpu", "input_size": [64, 64], "max_latency": 5}, r"unknown key 'max_latency'; valid keys: kind, dtype"),
        ({"kind": "tpu", "input_size": [64, 64]}, r"kind must be 'cpu' or 'cuda', got 'tpu'"),
        ({"kind": "cpu", "input_size": [64, 64], "dtype": "int8"}, r"dtype must be one of float32, float16, bfloat16"),
        ({"kind": "cpu", "input_size": [64]}, r"input_size must be \[height, width\] in pixels, got \[64\]"),
        ({"kind": "cpu", "input_size": [64, 64], "output_size": [256, 256]}, r"exactly one of input_size"),
        ({"kind": "cpu"}, r"exactly one of input_size"),
        ({"kind": "cpu", "input_size": [64, 64], "max_params": "1M"}, r"max_params must be a positive number or null, got '1M'"),
        ({"kind": "cpu", "input_size": [64, 64], "threads": 0}, r"threads must be an integer >= 1, got 0"),
        ({"kind": "cuda", "input_size": [64, 64], "threads": 4}, r"threads applies to cpu profiles only"),
        ({"input_size": [64, 64]}, r"'kind' is required"),
    ],
)
def test_invalid_profiles_are_refused_naming_file_profile_and_field(tmp_path, fields, message):
    path = tmp_path / "devices.yaml"
    path.write_text(json.dumps({"profiles": {"mine": fields}}))  # JSON is YAML
    with pytest.raises(DeviceProfileError, match=message) as info:
        load_device_profiles(path)
    assert str(path) in str(info.value) and "'mine'" in str(info.value)


def test_profile_files_structure_is_checked(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text("devices: {}\n")
    with pytest.raises(DeviceProfileError, match="expected a mapping with a 'profiles' key"):
        load_device_profiles(path)
    path.write_text("profiles:\n  bad name: {kind: cpu, input_size: [8, 8]}\n")
    with pytest.raises(DeviceProfileError, match="profile name 'bad name'"):
        load_device_profiles(path)
    with pytest.raises(DeviceProfileError, match="cannot read device profiles"):
        load_device_profiles(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------
# choosing (pure)


def candidate(trial, psnr, latency, params, limits):
    measured = {"latency_ms": latency, "params_deploy": params, "peak_memory_mb": 10.0, "device": "Test CPU"}
    return MeasuredCandidate(trial, {}, {"psnr": psnr}, measured, _violations(measured, limits))


def test_choose_candidate_takes_the_best_feasible_quality():
    profile = cpu_profile(max_latency_ms=10.0, max_params=50_000)
    limits = profile.limits()
    cands = [
        candidate(0, 27.5, 12.0, 20_000, limits),  # best PSNR, too slow
        candidate(1, 27.2, 9.0, 40_000, limits),  # best feasible
        candidate(2, 27.2, 8.0, 45_000, limits),  # same PSNR, faster: wins the tie
        candidate(3, 26.0, 1.0, 10_000, limits),
    ]
    assert choose_candidate(cands, profile, metric_info("psnr")).trial == 2
    # LPIPS: lower is better
    lp = [MeasuredCandidate(c.trial, {}, {"lpips": 0.3 - 0.01 * c.trial}, c.measured, c.violations) for c in cands]
    assert choose_candidate(lp, profile, metric_info("lpips")).trial == 3


def test_choose_candidate_names_the_limit_that_excludes_the_closest():
    profile = cpu_profile(max_latency_ms=5.0, max_params=30_000)
    limits = profile.limits()
    cands = [
        candidate(0, 27.5, 12.0, 60_000, limits),  # 140 % + 100 % over
        candidate(1, 27.0, 5.5, 45_000, limits),  # 10 % over in latency, 50 % in params: closest
        candidate(2, 26.0, 20.0, 20_000, limits),  # 300 % over in latency
    ]
    with pytest.raises(DeploymentError) as info:
        choose_candidate(cands, profile, metric_info("psnr"))
    error = info.value
    assert error.trial == 1 and error.limit == "max_params" and error.profile == "test-cpu"
    text = str(error)
    assert "trial 1" in text and "PSNR 27 dB" in text
    assert "max_params (4.5e+04 measured > 3e+04 limit)" in text
    assert "max_latency_ms (5.5 ms measured > 5 ms limit)" in text


# ---------------------------------------------------------------------------------------------
# the pick, measured for real on this CPU


def test_pick_is_the_best_candidate_within_the_limits(deploy_study, tmp_path):
    study, root, configs = deploy_study
    params = [deploy_params(c) for c in configs]
    assert params == sorted(params)  # wider networks, more parameters
    # allow the third candidate but not the fourth: the third has the best PSNR among those allowed
    limit = (params[2] + params[3]) // 2
    pick = pick_deployment(study, cpu_profile(max_params=limit), tmp_path, weights_root=root, progress=False)
    assert pick.trial == 2
    assert pick.measured["params_deploy"] == params[2]  # the profiler agrees with the count
    assert {c.trial for c in pick.candidates} == {0, 1, 2, 3}  # the front, minus the missing weights
    assert set(pick.skipped) == {4} and "missing" in pick.skipped[4]
    assert [c.trial for c in pick.candidates if not c.feasible] == [3]
    assert pick.json_path == tmp_path / "deploy" / "test-cpu.json"

    data = json.loads(pick.json_path.read_text())
    assert data["trial"] == 2 and data["study"] == "dep"
    assert EHRSRConfig.from_dict(data["config"]) == configs[2]
    assert data["quality"]["psnr"] == 27.0
    assert data["measured"]["params_deploy"] == params[2] and data["measured"]["latency_ms"] > 0
    assert data["measured"]["input_shape"] == [1, 3, 32, 32]
    assert data["limits"] == {"max_params": float(limit)}
    where = data["where"]
    assert where["device_kind"] == "cpu" and "1 thread" in where["device"]
    assert where["ehrsr_version"] and where["date"].endswith("+00:00")
    assert data["weights"] == "test-cpu.safetensors" and data["onnx"] is None
    assert "train this configuration fully" in data["next_step"]
    assert len(data["candidates"]) == 4


def test_deployed_weights_load_into_build_model_and_reproduce_outputs(deploy_study, tmp_path):
    study, root, configs = deploy_study
    pick = pick_deployment(study, cpu_profile(), tmp_path, weights_root=root, progress=False)
    assert pick.trial == 3  # no limits: the best PSNR
    trained = load_trained_model(configs[3], root / "weights" / "trial_3.safetensors")
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    # the file holds the fused network: it loads strictly into reparameterize(build_model(config))
    fused = reparameterize(build_model(configs[3]))
    fused.load_state_dict(load_file(str(pick.weights_path)), strict=True)
    with torch.inference_mode():
        expected = reparameterize(trained)(x)
        assert torch.equal(fused(x), expected)
        assert torch.equal(load_deployed_model(pick.json_path)(x), expected)
        # and it computes what the trained (unfused) network computes (invariant 5 of docs/architecture.md)
        assert torch.allclose(trained(x), expected, atol=1e-5)
    unfused = sum(p.numel() for p in trained.parameters())
    assert sum(p.numel() for p in fused.parameters()) < unfused


def test_too_strict_profile_names_the_limit(deploy_study, tmp_path):
    study, root, configs = deploy_study
    smallest = deploy_params(configs[0])
    with pytest.raises(DeploymentError) as info:
        pick_deployment(study, cpu_profile(max_params=smallest // 2), tmp_path, weights_root=root, progress=False)
    assert info.value.limit == "max_params" and info.value.trial == 0
    assert f"max_params ({smallest:.4g} measured > {smallest // 2:.4g} limit)" in str(info.value)
    # the one line also says how to go on with the closest trial (full training does not need a pick)
    assert str(info.value).endswith(
        f"run_search.py train --study-name {study.study_name} --trial 0 --reports-dir {tmp_path.parent}")
    assert not (tmp_path / "deploy" / "test-cpu.json").exists()


def test_cuda_profile_without_cuda_is_a_clear_error(deploy_study, tmp_path, monkeypatch):
    study, root, _ = deploy_study
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceProfileError, match=r"'datacenter-gpu-1080p' is for a CUDA GPU.*no usable CUDA device"):
        pick_deployment(study, "datacenter-gpu-1080p", tmp_path, weights_root=root, progress=False)
    with pytest.raises(DeviceProfileError, match=r"unknown device profile 'phone'; profiles in .*: datacenter-gpu-1080p"):
        pick_deployment(study, "phone", tmp_path, weights_root=root, progress=False)


@pytest.fixture
def onnx_extra() -> None:
    """ONNX export and its numeric check need the optional 'onnx' extra (onnx, onnxruntime); in CI,
    where it is installed, they must import (tests/conftest.py)."""
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason="ONNX export needs the optional 'onnx' extra")


EXPORTERS = ["torchscript", "dynamo"]


def needs_exporter(exporter: str) -> None:
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (the 'onnx' extra)")


needs_onnx = pytest.mark.usefixtures("onnx_extra")


@needs_onnx
def test_pick_onnx_accepts_any_size_and_matches_pytorch(deploy_study, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    study, root, configs = deploy_study
    limit = deploy_params(configs[0]) + 1  # only the conv-only network fits
    pick = pick_deployment(study, cpu_profile(max_params=limit), tmp_path, weights_root=root, onnx=True, progress=False)
    assert pick.trial == 0
    result = pick.onnx
    assert result["dynamic"] is True and result["passed"] is True, result
    # checked at the profile's size and at odd sizes, batch 2 included
    assert {"1x3x32x32", "1x3x61x47", "2x3x61x47"} <= set(result["sizes_checked"])
    assert result["max_abs_diff"] <= 1e-4 and result["blocking_modules"] == {} and result["tiling"] is None
    assert json.loads(pick.json_path.read_text())["onnx"] == result
    # independently: onnxruntime on a 61x47 image against the pick's PyTorch weights
    session = onnxruntime.InferenceSession(str(tmp_path / "deploy" / result["path"]), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 61, 47, generator=torch.Generator().manual_seed(5))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        reference = load_deployed_model(pick.json_path)(x).numpy()
    assert out.shape == reference.shape == (1, 3, 244, 188)
    assert float(abs(out - reference).max()) <= 1e-4


@needs_onnx
def test_pick_onnx_names_a_module_that_blocks_dynamic_sizes(deploy_study, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ehrsr.blocks.frequency import FrequencySeparationBlock

    # simulate a module that cannot be exported with symbolic sizes: FSB keyed by the input size
    # again (the bug once found)
    real_forward = FrequencySeparationBlock.forward

    def forward(self, x):
        # the dynamic export traces a batch of 2, the fixed one a batch of 1
        if torch.compiler.is_exporting() and x.shape[0] != 1:
            raise TypeError("unhashable type: non-nested SymInt (simulated)")
        return real_forward(self, x)

    monkeypatch.setattr(FrequencySeparationBlock, "forward", forward)
    study, root, configs = deploy_study
    limit = deploy_params(configs[2]) + 1  # the FSB network (trial 2) is the best that fits
    pick = pick_deployment(study, cpu_profile(max_params=limit), tmp_path, weights_root=root, onnx=True, progress=False)
    assert pick.trial == 2
    result = json.loads(pick.json_path.read_text())["onnx"]
    assert result["dynamic"] is False and result["fixed_hw"] == [32, 32] and result["passed"] is True
    assert list(result["blocking_modules"]) == ["fsb"] and result["blocking_modules"]["fsb"].startswith("FSBConfig: ")
    assert result["tiling"] == "ehrsr.deploy.export.tiled_onnx_inference"
    assert result["sizes_checked"] == ["1x3x32x32"] and result["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
@needs_onnx
def test_onnx_exporters_match_pytorch_on_a_conv_network(tmp_path, exporter):
    needs_exporter(exporter)
    config = EHRSRConfig.from_dict({**COMMON, "width": 8, "repmix": {"enabled": True, "kernel_size": 5}})
    model = reparameterize(build_model(config))
    result = export_onnx(model, (1, 3, 16, 24), tmp_path / "m.onnx", exporter=exporter)
    assert result["exporter"] == exporter and result["checker"] == "passed", result
    assert result["numeric_check"] == "passed" and result["max_abs_diff"] <= 1e-4


class _RawScan(torch.nn.Module):
    """Calls the selective-scan custom operator directly: no ONNX exporter knows that operator
    (EHR-SR's own SSMB hands exporters the plain-ops scan instead)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        u = x.flatten(2)
        n = 2
        return torch.ops.ehrsr.selective_scan(
            u, u.abs(), -torch.ones(c, n), u[:, :n], u[:, :n], torch.ones(c)
        ).view(b, c, h, w)


@pytest.mark.parametrize("exporter", EXPORTERS)
@needs_onnx
def test_onnx_export_failure_is_reported_not_raised(tmp_path, exporter):
    needs_exporter(exporter)
    result = export_onnx(_RawScan(), (1, 3, 4, 4), tmp_path / "scan.onnx", exporter=exporter)
    assert result["error"].startswith(f"{exporter}: export failed") and "selective_scan" in result["error"]
    assert len(result["error"]) < 600 and not (tmp_path / "scan.onnx").exists()
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(_RawScan(), (1, 3, 4, 4), tmp_path / "x.onnx", exporter="tensorrt")


@needs_onnx
def test_every_module_exports_to_onnx_and_matches_pytorch(tmp_path):
    # WAB falls back to the tracing exporter, FSB and SSMB go through dynamo or tracing
    modules = {m: {"enabled": True} for m in ("wab", "ssm", "fsb", "moe", "repmix", "noise")}
    config = EHRSRConfig.from_dict({**COMMON, "width": 8, **modules, "wab": {"enabled": True, "window_size": 4}})
    model = randomize_head(build_model(config))  # a zero head would make the output the bicubic base
    result = export_onnx(reparameterize(model), (1, 3, 16, 20), tmp_path / "all.onnx")
    assert "error" not in result, result
    assert result["checker"] == "passed"
    assert result["numeric_check"] == "passed" and result["max_abs_diff"] <= 1e-4, result


def test_cpu_profiles_never_oversubscribe_the_cores():
    from ehrsr.deploy import cpu_threads_for

    profile = cpu_profile()
    wide = dataclasses.replace(profile, threads=8)
    assert cpu_threads_for(wide, cores=8) == (8, None)
    threads, note = cpu_threads_for(wide, cores=2)
    assert threads == 2 and "asks for 8 threads" in note and "2 cores" in note
    assert cpu_threads_for(dataclasses.replace(profile, kind="cuda", threads=None), cores=2) == (None, None)
