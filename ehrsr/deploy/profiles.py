"""Device profiles: the target devices a deployment pick is made for (docs/reports.md).

Device profiles live in ``ehrsr/search_spaces/devices.yaml``::

    profiles:
      laptop-cpu-256:
        kind: cpu                 # cpu | cuda
        threads: 4                # CPU threads (cpu only)
        dtype: float32            # float32 | float16 | bfloat16 (autocast)
        input_size: [256, 256]    # LR input H, W; or output_size: [1080, 1920] (divided by the scale)
        max_latency_ms: 250       # limits; leave out (or null) for no limit
        max_memory_mb: 1024
        max_params: 2000000
        runtime: torch            # torch (default) | onnxruntime (cpu, float32: the exported ONNX model)
        latency_model: laptop.latency.json   # optional: a calibrated latency model, relative to this
                                             # file (docs/latency_models.md); lets a search predict
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ehrsr.errors import UserError
from ehrsr.profiling.onnx_runtime import check_timing_settings
from ehrsr.resources import devices_file

__all__ = [
    "DEVICES_PATH",
    "LIMIT_METRICS",
    "DeviceProfile",
    "DeviceProfileError",
    "check_device_available",
    "load_device_profiles",
    "profiles_for_device",
    "resolve_profile",
]

DEVICES_PATH = devices_file()
"""The shipped device profiles."""

LIMIT_METRICS: dict[str, str] = {
    "max_latency_ms": "latency_ms",
    "max_memory_mb": "peak_memory_mb",
    "max_params": "params_deploy",
}
"""Each limit of a device profile and the measured metric it bounds."""

_DTYPES = ("float32", "float16", "bfloat16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a file name: deploy/<name>.json


class DeviceProfileError(UserError, ValueError):
    """A device profile is invalid, unknown, or cannot run on this machine (no CUDA)."""



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
    runtime: str = "torch"  # "torch" (PyTorch eager) or "onnxruntime" (CPU EP, float32)
    latency_model: str | None = None  # latency model file (resolved against the devices file's folder)

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
    runtime = data.get("runtime", "torch")
    try:
        check_timing_settings(runtime, kind=kind, dtype=dtype)
    except ValueError as exc:
        raise DeviceProfileError(f"{where}: {exc}") from None
    latency_model = data.get("latency_model")
    if latency_model is not None:
        if not isinstance(latency_model, str) or not latency_model.strip():
            raise DeviceProfileError(f"{where}: latency_model must be a file path, got {latency_model!r}")
        # relative to the devices file, so a file and its models move together
        latency_model = str(Path(source).parent / latency_model) if not Path(latency_model).is_absolute() else latency_model
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
        runtime=runtime,
        latency_model=latency_model,
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
        raise DeviceProfileError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict) or "profiles" not in data:
        raise DeviceProfileError(f"{path}: expected a mapping with a 'profiles' key")
    unknown = sorted(set(data) - {"profiles", "description"})
    if unknown:
        raise DeviceProfileError(f"{path}: unknown top-level keys {unknown}; valid keys: profiles, description")
    profiles = data["profiles"]
    if not isinstance(profiles, dict) or not profiles:
        raise DeviceProfileError(f"{path}: 'profiles' must be a non-empty mapping of name -> fields")
    return {name: _parse_profile(name, fields_, str(path)) for name, fields_ in profiles.items()}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the parser's problem and the (1-based) line and column it was found at."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def resolve_profile(profile: DeviceProfile | str, devices_path: str | Path | None) -> DeviceProfile:
    """``profile`` itself, or the profile of that name in ``devices_path`` (default: the shipped file)."""
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
    (those of the same kind: a GPU search picks for GPU profiles, a CPU search for CPU ones).
    onnxruntime profiles are left to an explicit ``deploy --device-profile``: each candidate is
    exported to ONNX before it is timed (seconds to a minute a network), too slow for every search."""
    return [name for name, p in profiles.items() if p.kind == device_kind and p.runtime == "torch"]


