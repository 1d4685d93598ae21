"""Deployment picks: the best-quality Pareto configuration that meets a device's limits, measured
on that device.

Latency and memory are properties of the device, so the candidates (``study.best_trials``) are
re-profiled on the machine ``pick_deployment`` runs on, with ``ehrsr.profiling.profile_model``, at
the device profile's input size, dtype and thread count; nothing is copied from the search.
Quality (PSNR, SSIM, LPIPS) is the study's measurement of the brief-trained weights (float32, the
search's validation data); it does not depend on the device.

Device profiles live in ``ehrsr/search_spaces/devices.yaml`` (``docs/reports.md`` documents the format)::

    profiles:
      laptop-cpu-256:
        kind: cpu                 # cpu | cuda
        threads: 4                # CPU threads (cpu only)
        dtype: float32            # float32 | float16 | bfloat16 (autocast)
        input_size: [256, 256]    # LR input H, W; or output_size: [1080, 1920] (divided by the scale)
        max_latency_ms: 250       # limits; leave out (or null) for no limit
        max_memory_mb: 1024
        max_params: 2000000

The pick writes ``deploy/<profile>.json`` (configuration, measured cost, quality, where and when
it was measured, every candidate's measurements) and ``deploy/<profile>.safetensors``: the fused
weights (``ehrsr.reparameterize`` of the brief-trained model). ``load_deployed_model`` rebuilds
the fused network from the two. Optionally an ONNX export, checked against PyTorch on one input.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import ehrsr
from ehrsr.config import EHRSRConfig
from ehrsr.model import build_model
from ehrsr.reparam import reparameterize
from ehrsr.reports._study import ObjectiveInfo, StudyInfo
from ehrsr.resources import devices_file

__all__ = [
    "DEVICES_PATH",
    "LIMIT_METRICS",
    "DeploymentError",
    "DeploymentPick",
    "DeviceProfile",
    "DeviceProfileError",
    "MeasuredCandidate",
    "check_device_available",
    "choose_candidate",
    "export_onnx",
    "load_deployed_model",
    "load_device_profiles",
    "load_trained_model",
    "pick_deployment",
    "profiles_for_device",
]

DEVICES_PATH = devices_file()
"""The shipped device profiles (package data, ``ehrsr/search_spaces/devices.yaml``)."""

LIMIT_METRICS: dict[str, str] = {
    "max_latency_ms": "latency_ms",
    "max_memory_mb": "peak_memory_mb",
    "max_params": "params_deploy",
}
"""Each limit of a device profile and the measured metric it bounds."""

_DTYPES = ("float32", "float16", "bfloat16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a file name: deploy/<name>.json
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on one float32 input for the export to pass


class DeviceProfileError(ValueError):
    """A device profile is invalid, unknown, or cannot run on this machine (no CUDA)."""


class DeploymentError(Exception):
    """No candidate meets the profile's limits. ``limit`` names the limit that excludes the
    closest candidate (``trial``); the CLI turns this into exit status 2."""

    def __init__(self, message: str, *, profile: str, limit: str | None = None, trial: int | None = None):
        super().__init__(message)
        self.profile = profile
        self.limit = limit
        self.trial = trial


# ---------------------------------------------------------------------------------------------
# device profiles


@dataclass(frozen=True)
class DeviceProfile:
    """Where a model will run and what it may cost there."""

    name: str
    kind: str  # "cuda" or "cpu"
    dtype: str = "float32"  # float16 / bfloat16: autocast, as deployed GPUs usually run
    threads: int | None = None  # CPU threads (None: torch's default); ignored on cuda
    input_size: tuple[int, int] | None = None  # LR input (H, W)
    output_size: tuple[int, int] | None = None  # or the output (H, W); input = output / scale
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None  # MiB beyond weights and input, one pass (profile_model)
    max_params: float | None = None  # deploy-form parameters
    warmup: int | None = None  # untimed passes (None: profile_model plans them)
    repeats: int | None = None  # timed passes (None: profile_model plans them)
    description: str = ""

    def lr_input_size(self, scale: int) -> tuple[int, int]:
        """The (H, W) of the model's input: ``input_size``, or ``output_size`` divided by ``scale``
        (which must divide it: 1080p output at x4 is a 270x480 input, at x3 360x640)."""
        if self.input_size is not None:
            return self.input_size
        assert self.output_size is not None
        height, width = self.output_size
        if height % scale or width % scale:
            raise DeviceProfileError(
                f"device profile {self.name!r}: output_size {height}x{width} is not a multiple of the "
                f"study's scale x{scale}; give input_size instead"
            )
        return height // scale, width // scale

    def limits(self) -> dict[str, float]:
        """The limits that are set, by name."""
        return {name: float(getattr(self, name)) for name in LIMIT_METRICS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("input_size", "output_size"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


_PROFILE_KEYS = tuple(f.name for f in fields(DeviceProfile) if f.name != "name")


def _parse_profile(name: Any, data: Any, source: str) -> DeviceProfile:
    where = f"{source}: profile {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeviceProfileError(
            f"{source}: profile name {name!r} must be letters, digits, '-', '_' or '.' (it names deploy/<name>.json)"
        )
    if not isinstance(data, dict):
        raise DeviceProfileError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_PROFILE_KEYS))
    if unknown:
        raise DeviceProfileError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(_PROFILE_KEYS)}"
        )
    if "kind" not in data:
        raise DeviceProfileError(f"{where}: 'kind' is required (cpu or cuda)")
    kind = data["kind"]
    if kind not in ("cpu", "cuda"):
        raise DeviceProfileError(f"{where}: kind must be 'cpu' or 'cuda', got {kind!r}")
    dtype = data.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise DeviceProfileError(f"{where}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")

    def integer(key: str, minimum: int) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DeviceProfileError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    def size(key: str) -> tuple[int, int] | None:
        value = data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            raise DeviceProfileError(f"{where}: {key} must be [height, width] in pixels, got {value!r}")
        return int(value[0]), int(value[1])

    def limit(key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise DeviceProfileError(f"{where}: {key} must be a positive number or null, got {value!r}")
        return float(value)

    input_size, output_size = size("input_size"), size("output_size")
    if (input_size is None) == (output_size is None):
        raise DeviceProfileError(
            f"{where}: give exactly one of input_size (LR input H, W) and output_size (output H, W)"
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise DeviceProfileError(f"{where}: description must be text, got {description!r}")
    threads = integer("threads", 1)
    if threads is not None and kind == "cuda":
        raise DeviceProfileError(f"{where}: threads applies to cpu profiles only (kind is cuda)")
    return DeviceProfile(
        name=name,
        kind=kind,
        dtype=dtype,
        threads=threads,
        input_size=input_size,
        output_size=output_size,
        max_latency_ms=limit("max_latency_ms"),
        max_memory_mb=limit("max_memory_mb"),
        max_params=limit("max_params"),
        warmup=integer("warmup", 0),
        repeats=integer("repeats", 1),
        description=description,
    )


def load_device_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Read and validate a devices file (default: the shipped ``ehrsr/search_spaces/devices.yaml``).

    The file holds ``profiles:`` (a mapping of profile names to fields) and an optional
    ``description:``. Unknown keys, wrong types and impossible values raise
    ``DeviceProfileError`` naming the file, the profile and the field.
    """
    path = Path(path) if path is not None else DEVICES_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeviceProfileError(f"cannot read device profiles {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeviceProfileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "profiles" not in data:
        raise DeviceProfileError(f"{path}: expected a mapping with a 'profiles' key")
    unknown = sorted(set(data) - {"profiles", "description"})
    if unknown:
        raise DeviceProfileError(f"{path}: unknown top-level keys {unknown}; valid keys: profiles, description")
    profiles = data["profiles"]
    if not isinstance(profiles, dict) or not profiles:
        raise DeviceProfileError(f"{path}: 'profiles' must be a non-empty mapping of name -> fields")
    return {name: _parse_profile(name, fields_, str(path)) for name, fields_ in profiles.items()}


def _resolve_profile(profile: DeviceProfile | str, devices_path: str | Path | None) -> DeviceProfile:
    if isinstance(profile, DeviceProfile):
        return profile
    profiles = load_device_profiles(devices_path)
    if profile not in profiles:
        raise DeviceProfileError(
            f"unknown device profile {profile!r}; profiles in {devices_path or DEVICES_PATH}: {', '.join(profiles)}"
        )
    return profiles[profile]


def check_device_available(profile: DeviceProfile) -> None:
    """A cuda profile needs CUDA on this machine (latency is measured here, never copied)."""
    if profile.kind == "cuda" and not torch.cuda.is_available():
        raise DeviceProfileError(
            f"device profile {profile.name!r} is for a CUDA GPU, but this machine ({platform.node()}) has "
            "no usable CUDA device (torch.cuda.is_available() is False); run deploy on the target GPU "
            "machine, or choose a cpu profile"
        )


def profiles_for_device(profiles: Mapping[str, DeviceProfile], device_kind: str) -> list[str]:
    """Names of the profiles a search that ran on ``device_kind`` should pick for at its end
    (those of the same kind: a GPU search picks for GPU profiles, a CPU search for CPU ones)."""
    return [name for name, p in profiles.items() if p.kind == device_kind]


# ---------------------------------------------------------------------------------------------
# models


def load_trained_model(config: EHRSRConfig | Mapping[str, Any], weights_path: str | Path) -> nn.Module:
    """The training-form network of a trial: ``build_model(config)`` with its safetensors weights
    (strict: every tensor must match)."""
    config = config if isinstance(config, EHRSRConfig) else EHRSRConfig.from_dict(dict(config))
    model = build_model(config)
    path = Path(weights_path)
    try:
        state = load_file(str(path))
    except (OSError, ValueError) as exc:  # safetensors raises its own error types (SafetensorError)
        raise ValueError(f"cannot read weights {path}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {path} do not fit the trial's configuration: {exc}") from None
    return model.eval()


def load_deployed_model(pick_json: str | Path) -> nn.Module:
    """The fused network of a deployment pick: ``reparameterize(build_model(config))`` with the
    pick's safetensors weights loaded (strict), in eval mode."""
    pick_json = Path(pick_json)
    data = json.loads(pick_json.read_text())
    deploy = reparameterize(build_model(EHRSRConfig.from_dict(data["config"])))
    state = load_file(str(pick_json.parent / data["weights"]))
    deploy.load_state_dict(state, strict=True)
    return deploy.eval()


def _fused_state(deploy: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store an independent copy of each
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in deploy.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# choosing


@dataclass(frozen=True)
class MeasuredCandidate:
    """One Pareto trial re-profiled on this machine."""

    trial: int
    config: dict[str, Any]
    quality: dict[str, float | None]  # psnr / ssim / lpips from the study
    measured: dict[str, Any]  # latency_ms, latency_ms_p10/p90, peak_memory_mb, params_deploy, macs, ...
    violations: dict[str, tuple[float | None, float]]  # limit -> (measured, limit)

    @property
    def feasible(self) -> bool:
        return not self.violations

    def excess(self) -> float:
        """Sum over violated limits of measured / limit - 1 (how far outside the limits it is)."""
        total = 0.0
        for value, limit in self.violations.values():
            total += math.inf if value is None else value / limit - 1.0
        return total


def _violations(measured: Mapping[str, Any], limits: Mapping[str, float]) -> dict[str, tuple[float | None, float]]:
    out = {}
    for name, limit in limits.items():
        value = measured.get(LIMIT_METRICS[name])
        if value is None or not value <= limit:  # unmeasured cannot be shown to fit
            out[name] = (None if value is None else float(value), float(limit))
    return out


def _quality_text(candidate: MeasuredCandidate, quality: ObjectiveInfo) -> str:
    value = candidate.quality.get(quality.metric_key)
    if value is None:
        return f"{quality.label} not measured"
    return f"{quality.label} {value:.4g}{' dB' if quality.metric_key == 'psnr' else ''}"


def _limit_text(name: str, measured: float | None, limit: float) -> str:
    unit = {"max_latency_ms": " ms", "max_memory_mb": " MiB", "max_params": ""}[name]
    shown = "not measured" if measured is None else f"{measured:.4g}{unit} measured"
    return f"{name} ({shown} > {limit:.4g}{unit} limit)"


def choose_candidate(
    candidates: Sequence[MeasuredCandidate], profile: DeviceProfile, quality: ObjectiveInfo
) -> MeasuredCandidate:
    """The feasible candidate of best quality (ties: lower latency, then lower trial number).

    When none is feasible, raise ``DeploymentError`` naming the closest candidate (smallest total
    relative excess over its limits) and the limit it exceeds most.
    """
    if not candidates:
        raise DeploymentError(f"no candidates to choose from for profile {profile.name!r}", profile=profile.name)
    feasible = [c for c in candidates if c.feasible]
    if feasible:
        worst = -math.inf if quality.maximize else math.inf

        def key(c: MeasuredCandidate) -> tuple[float, float, int]:
            value = c.quality.get(quality.metric_key)
            score = worst if value is None else float(value)
            latency = c.measured.get("latency_ms")
            return (-score if quality.maximize else score, math.inf if latency is None else latency, c.trial)

        return min(feasible, key=key)
    closest = min(candidates, key=lambda c: (c.excess(), c.trial))
    ratios = {
        name: (math.inf if value is None else value / limit) for name, (value, limit) in closest.violations.items()
    }
    worst_limit = max(ratios, key=lambda n: ratios[n])
    exceeded = " and ".join(_limit_text(n, *closest.violations[n]) for n in sorted(ratios, key=lambda n: -ratios[n]))
    raise DeploymentError(
        f"no Pareto candidate meets device profile {profile.name!r} ({len(candidates)} measured on "
        f"{closest.measured.get('device', 'this machine')}): the closest, trial {closest.trial} "
        f"({_quality_text(closest, quality)}), exceeds {exceeded}",
        profile=profile.name,
        limit=worst_limit,
        trial=closest.trial,
    )


# ---------------------------------------------------------------------------------------------
# the pick


@dataclass
class DeploymentPick:
    """What ``pick_deployment`` chose and wrote."""

    profile: DeviceProfile
    trial: int
    config: dict[str, Any]
    quality: dict[str, float | None]
    measured: dict[str, Any]
    json_path: Path
    weights_path: Path
    onnx: dict[str, Any] | None
    candidates: list[MeasuredCandidate] = field(repr=False)
    skipped: dict[int, str] = field(default_factory=dict)  # Pareto trials not measured, and why


def _measure(model: nn.Module, profile: DeviceProfile, input_hw: tuple[int, int], in_channels: int) -> dict[str, Any]:
    from ehrsr.profiling import profile_model  # fvcore / ptflops, imported only when measuring

    threads, note = cpu_threads_for(profile)
    result = profile_model(
        model,
        (1, in_channels, *input_hw),
        device=profile.kind,
        dtype=profile.dtype,
        warmup=profile.warmup,
        repeats=profile.repeats,
        threads=threads,
    )
    data = result.to_dict()
    keep = (
        "latency_ms", "latency_ms_p10", "latency_ms_p90", "peak_memory_mb", "params", "params_deploy",
        "macs", "device", "dtype", "threads", "warmup", "repeats", "input_shape", "memory_method",
    )
    measured = {k: data[k] for k in keep if k in data}
    if note:
        measured["note"] = note
    return measured


def cpu_threads_for(profile: DeviceProfile, cores: int | None = None) -> tuple[int | None, str | None]:
    """Threads to time a CPU profile with, and a note when this machine cannot honour it.

    More threads than cores makes every pass wait on descheduled threads (timings several times
    too slow), so a profile asking for more threads than this machine has is timed with one thread
    per core and the pick says so; run ``deploy`` on the target device for the real figure."""
    if profile.kind != "cpu" or profile.threads is None:
        return None, None
    cores = cores or os.cpu_count() or 1
    if profile.threads <= cores:
        return profile.threads, None
    return cores, (
        f"profile {profile.name!r} asks for {profile.threads} threads but this machine has {cores} cores: "
        f"timed with {cores} threads"
    )


def pick_deployment(
    study: optuna.Study,
    profile: DeviceProfile | str,
    out_dir: str | Path,
    *,
    weights_root: str | Path,
    onnx: bool = False,
    devices_path: str | Path | None = None,
    progress: bool = True,
) -> DeploymentPick:
    """Re-profile the study's Pareto trials on this machine for ``profile`` and write the pick.

    ``out_dir`` is the study's report folder: the pick goes to ``out_dir/deploy/<profile>.json``
    and ``.safetensors`` (and ``.onnx`` with ``onnx=True``). ``weights_root`` is the folder the
    trials' ``weights`` paths are relative to (``reports/<study>/``). Quality is the study's first
    quality objective (PSNR unless the study optimises SSIM or LPIPS first).

    Raises ``DeviceProfileError`` (unknown or invalid profile, a cuda profile without CUDA) and
    ``DeploymentError`` (no trial meets the limits: names the limit excluding the closest one).
    """
    profile = _resolve_profile(profile, devices_path)
    check_device_available(profile)
    info = StudyInfo.from_study(study)
    quality = info.quality_objective
    input_hw = profile.lr_input_size(info.scale)
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        raise DeploymentError(
            f"study {study.study_name!r} has no finished feasible trial, so no deployment candidate",
            profile=profile.name,
        )
    weights_root = Path(weights_root)
    limits = profile.limits()
    candidates: list[MeasuredCandidate] = []
    skipped: dict[int, str] = {}
    for trial in front:
        config = trial.user_attrs.get("config")
        weights = trial.user_attrs.get("weights")
        if not config or not weights:
            skipped[trial.number] = "the trial records no configuration or weights file"
            continue
        path = weights_root / weights
        if not path.is_file():
            skipped[trial.number] = f"weights file {path} is missing"
            continue
        try:
            model = load_trained_model(config, path)
        except ValueError as exc:  # a damaged file must not hide the other candidates
            skipped[trial.number] = str(exc)
            continue
        if progress:
            print(f"[deploy {profile.name}] profiling trial {trial.number} at {input_hw[0]}x{input_hw[1]} "
                  f"on {profile.kind} ({profile.dtype})", file=sys.stderr)
        try:
            measured = _measure(model, profile, input_hw, model.config.in_channels)
        except torch.cuda.OutOfMemoryError:
            # too big for this device at this size: it cannot be deployed here, the others may be
            del model
            torch.cuda.empty_cache()
            skipped[trial.number] = f"out of GPU memory at {input_hw[0]}x{input_hw[1]} ({profile.dtype})"
            continue
        metrics = trial.user_attrs.get("metrics") or {}
        candidates.append(
            MeasuredCandidate(
                trial=trial.number,
                config=dict(config),
                quality={k: metrics.get(k) for k in ("psnr", "ssim", "lpips")},
                measured=measured,
                violations=_violations(measured, limits),
            )
        )
    if not candidates:
        reasons = "; ".join(f"trial {n}: {why}" for n, why in skipped.items())
        raise DeploymentError(
            f"none of the {len(front)} Pareto trials of {study.study_name!r} can be deployed: {reasons}",
            profile=profile.name,
        )
    chosen = choose_candidate(candidates, profile, quality)

    deploy_dir = Path(out_dir) / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    model = load_trained_model(chosen.config, weights_root / front_weights(front, chosen.trial))
    deploy = reparameterize(model)
    weights_path = deploy_dir / f"{profile.name}.safetensors"
    save_file(
        _fused_state(deploy),
        str(weights_path),
        metadata={"format": "pt", "form": "deploy (ehrsr.reparameterize)", "trial": str(chosen.trial),
                  "config": json.dumps(chosen.config)},
    )
    onnx_result = None
    if onnx:
        onnx_result = export_onnx(deploy, (1, model.config.in_channels, *input_hw), deploy_dir / f"{profile.name}.onnx")
        if progress:
            state = onnx_result.get("error") or onnx_result.get("numeric_check")
            print(f"[deploy {profile.name}] ONNX: {state}", file=sys.stderr)

    json_path = deploy_dir / f"{profile.name}.json"
    record = {
        "profile": profile.to_dict(),
        "study": study.study_name,
        "trial": chosen.trial,
        "config": chosen.config,
        "train": next(t for t in front if t.number == chosen.trial).user_attrs.get("train"),
        "quality": {
            **chosen.quality,
            "objective": quality.name,
            "conventions": {k: v for k, v in info.conventions.items() if k in ("psnr", "ssim", "lpips")},
            "measured_in": "the search (brief training, float32)",
        },
        "measured": chosen.measured,
        "limits": limits,
        "where": {
            "device": chosen.measured.get("device"),
            "device_kind": profile.kind,
            "host": platform.node(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ehrsr_version": ehrsr.__version__,
            "torch_version": torch.__version__,
        },
        "weights": weights_path.name,
        "weights_form": "deploy: fused by ehrsr.reparameterize; load with ehrsr.reports.load_deployed_model",
        "onnx": onnx_result,
        "candidates": [
            {
                "trial": c.trial,
                "quality": c.quality,
                "measured": {k: c.measured.get(k) for k in ("latency_ms", "peak_memory_mb", "params_deploy", "macs")},
                "violations": {k: {"measured": v, "limit": lim} for k, (v, lim) in c.violations.items()},
            }
            for c in candidates
        ],
        "skipped": {str(k): v for k, v in skipped.items()},
        "next_step": (
            "These weights come from the search's brief training: train this configuration fully "
            "(long schedule, full training set) before deploying it."
        ),
    }
    json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return DeploymentPick(
        profile=profile,
        trial=chosen.trial,
        config=chosen.config,
        quality=chosen.quality,
        measured=chosen.measured,
        json_path=json_path,
        weights_path=weights_path,
        onnx=onnx_result,
        candidates=candidates,
        skipped=skipped,
    )


def front_weights(front: Sequence[optuna.trial.FrozenTrial], number: int) -> str:
    return next(t for t in front if t.number == number).user_attrs["weights"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    model: nn.Module, input_shape: Sequence[int], path: str | Path, *, exporter: str | None = None
) -> dict[str, Any]:
    """Export ``model`` (deploy form, float32, CPU) at a fixed ``input_shape`` and check it.

    ``exporter``: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``),
    ``"torchscript"`` (the tracing exporter), or None: dynamo when ``onnxscript`` is installed,
    else TorchScript. The shape is fixed because the network pads its input to size multiples
    computed in Python, which tracing records as constants. The file
    is validated with ``onnx.checker``; with ``onnxruntime`` installed it is also run on one
    seeded random input and compared with PyTorch (pass: max abs difference <= 1e-4). Returns a
    dict for the pick's JSON; a failed export is reported there (``error``), not raised, since
    the PyTorch pick stays valid.
    """
    import onnx  # the 'onnx' extra

    path = Path(path)
    result: dict[str, Any] = {"path": path.name, "input_shape": list(input_shape), "opset": None}
    model = model.to("cpu").float().eval()
    example = torch.rand(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    if exporter is None:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)

            # the dynamo exporter first; the tracing one when dynamo cannot convert an operator
            candidates = ["dynamo", "torchscript"]
        except ImportError:
            candidates = ["torchscript"]
    elif exporter in ("dynamo", "torchscript"):
        candidates = [exporter]
    else:
        raise ValueError(f"exporter must be 'dynamo', 'torchscript' or None (automatic), got {exporter!r}")
    errors = []
    for exporter in candidates:
        dynamo = exporter == "dynamo"
        result["exporter"] = exporter
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17)
            break
        except Exception as exc:
            # the exporters put whole graphs in their messages: keep the line that names the operator
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            named = [line for line in lines if "not supported" in line or "translating node" in line
                     or "unrecognized namespace" in line or "Failed to export" in line]
            message = (named or lines or [type(exc).__name__])[0]
            errors.append(f"{exporter}: export failed ({type(exc).__name__}): {message[:400]}")
            path.unlink(missing_ok=True)
    else:
        result["error"] = "; ".join(errors)
        return result
    if errors:
        result["fallback"] = errors[0]
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        result["checker"] = "passed"
        result["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    except Exception as exc:
        result["checker"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    try:
        import onnxruntime
    except ImportError:
        result["numeric_check"] = "skipped: needs onnxruntime (pip install onnxruntime)"
        return result
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})[:1]
    with torch.inference_mode():
        torch_out = model(example).numpy()
    diff = float(abs(onnx_out - torch_out).max())
    result["max_abs_diff"] = diff
    result["numeric_check"] = "passed" if diff <= ONNX_TOLERANCE else f"failed (max abs diff {diff:.3g} > {ONNX_TOLERANCE})"
    return result

