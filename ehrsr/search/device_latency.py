"""Latency on other devices during a search, predicted by their latency models (docs/latency_models.md).

A search runs on one machine and deploys elsewhere: FBNet (Wu et al., CVPR 2019) and Once-for-All
(Cai et al., ICLR 2020) predict the target's latency from a table measured on the target once.
``--objectives psnr,latency@edge-strict`` and ``--max-latency-ms edge-strict=50`` name a device
profile whose ``latency_model`` file was written by ``run_search.py calibrate`` on that device.
At study start ``load_device_latencies`` loads each named profile's model and refuses (one line,
``SearchError``) a profile without one or a model made for another space or other settings. Per
trial ``predict_device_latencies`` adds the stored unit costs (well under 0.1 s); a configuration
with a unit the file lacks is measured on this machine instead, next to a canary reading, and
recorded as measured (the documented fallback of ``latency_for_profile``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ehrsr.config import EHRSRConfig
from ehrsr.errors import UserError
from ehrsr.study_schema import DEVICE_LATENCY_PREFIX

__all__ = [
    "DeviceLatency",
    "DeviceLatencyError",
    "DeviceLatencyResult",
    "load_device_latencies",
    "measure_device_latencies",
    "parse_latency_limits",
    "predict_device_latencies",
]

LOCAL = "this machine"
"""Key of this machine's own (measured) latency in the trial's ``latency_sources`` attribute."""


class DeviceLatencyError(UserError, ValueError):
    """A device latency objective or limit that cannot be used (no profile, no model, refused model)."""


@dataclass(frozen=True)
class DeviceLatency:
    """One device profile whose latency a search predicts: what travels in the study's context."""

    name: str  # device profile name
    target: dict[str, Any]  # LatencyTarget.to_dict() of the profile
    model_path: str
    max_latency_ms: float | None = None
    accuracy: dict[str, Any] | None = None  # the file's held-out accuracy (Accuracy as a dict)

    @property
    def metric_key(self) -> str:
        return DEVICE_LATENCY_PREFIX + self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceLatency:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def load(self) -> tuple[Any, Any]:
        """(LatencyModel, LatencyTarget); the space was checked when the study started."""
        from ehrsr.profiling.latency_model import LatencyModel, LatencyTarget

        target = LatencyTarget(**{**self.target, "input_hw": tuple(self.target["input_hw"])})
        return LatencyModel.load(self.model_path, device=target), target


def parse_latency_limits(values: list[str] | None) -> tuple[float | None, dict[str, float]]:
    """``--max-latency-ms`` values: a bare number (this machine) and ``NAME=MS`` (device profile NAME,
    predicted). ``DeviceLatencyError`` for anything else or a repeated name."""
    local: float | None = None
    devices: dict[str, float] = {}
    for text in values or []:
        name, eq, number = text.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            raise DeviceLatencyError(
                f"--max-latency-ms {text!r}: give milliseconds (50) or PROFILE=milliseconds (edge-strict=50)"
            ) from None
        if not value > 0 or value == float("inf"):
            raise DeviceLatencyError(f"--max-latency-ms {text!r}: the limit must be a positive number")
        if not eq:
            if local is not None:
                raise DeviceLatencyError("--max-latency-ms for this machine is given twice")
            local = value
            continue
        name = name.strip()
        if not name or name in devices:
            raise DeviceLatencyError(f"--max-latency-ms {text!r}: {'no profile name' if not name else 'profile given twice'}")
        devices[name] = value
    return local, devices


def load_device_latencies(
    names: list[str], limits: Mapping[str, float], space: Any, profiles: Mapping[str, Any],
    devices_file: str | Path | None = None,
) -> list[DeviceLatency]:
    """Load the latency model of every profile named by an objective (``names``) or a limit, in
    that order; refuse (``DeviceLatencyError``, one line) an unknown profile, a profile without a
    ``latency_model`` and a model ``LatencyModel.load`` refuses (another space, other settings...).
    ``profiles``: the loaded device profiles (``ehrsr.deploy.load_device_profiles``; deploy sits
    above search, so the caller loads them)."""
    from ehrsr.profiling.latency_model import LatencyModel, LatencyModelError, LatencyTarget

    wanted = list(dict.fromkeys([*names, *limits]))
    out = []
    for name in wanted:
        if name not in profiles:
            raise DeviceLatencyError(
                f"latency@{name}: no device profile {name!r} in {devices_file or 'the shipped devices.yaml'} "
                f"(profiles: {', '.join(profiles)})"
            )
        profile = profiles[name]
        if profile.latency_model is None:
            raise DeviceLatencyError(
                f"latency@{name}: device profile {name!r} has no latency_model; run `run_search.py calibrate "
                f"--device-profile {name} --space {space.name}` on that device and set latency_model in the devices file"
            )
        try:
            model = LatencyModel.load(profile.latency_model, space=space, device=profile)
        except LatencyModelError as exc:
            raise DeviceLatencyError(f"latency@{name}: {exc}") from None
        accuracy = asdict(model.accuracy) if model.accuracy is not None else None
        target = LatencyTarget.from_profile(profile, scale=model.target.scale)
        out.append(DeviceLatency(name, target.to_dict(), str(Path(profile.latency_model).resolve()),
                                 limits.get(name), accuracy))
    return out


@dataclass
class DeviceLatencyResult:
    """A configuration's latency on each device profile, and where each number came from."""

    metrics: dict[str, float] = field(default_factory=dict)  # latency_ms@NAME -> ms
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # NAME -> LatencyRecord + model info
    refusal: str | None = None  # why the configuration exceeds a device limit, or None


def measure_device_latencies(
    module: Any, in_channels: int, devices: list[tuple[DeviceLatency, Any, Any]], *, canary: Any = None,
) -> DeviceLatencyResult:
    """``predict_device_latencies`` for a network no latency model covers (a hand-designed
    baseline): each profile's latency measured on this machine with that profile's runtime,
    threads and input size, recorded as ``measured`` (a different device from the profile's when
    the search machine is not the target: the report says so). Limits refuse as for a trial."""
    from ehrsr.profiling.latency_model import measure_module_for_profile

    result = DeviceLatencyResult()
    for spec, _, target in devices:
        record = measure_module_for_profile(module, in_channels, target, canary=canary)
        result.metrics[spec.metric_key] = record.latency_ms
        result.sources[spec.name] = {**record.to_dict(), "model": None, "accuracy": None}
        if result.refusal is None and spec.max_latency_ms is not None and record.latency_ms > spec.max_latency_ms:
            result.refusal = (
                f"latency on {spec.name} {record.latency_ms:.1f} ms (measured here) > --max-latency-ms "
                f"{spec.name}={spec.max_latency_ms:g}"
            )
    return result


def predict_device_latencies(
    config: EHRSRConfig, devices: list[tuple[DeviceLatency, Any, Any]], *, canary: Any = None,
) -> DeviceLatencyResult:
    """Predict (or, for missing units, measure here: ``latency_for_profile``) ``config``'s latency on
    every device; ``devices``: (DeviceLatency, LatencyModel, LatencyTarget) as ``DeviceLatency.load``
    returns them. The first exceeded limit refuses the configuration."""
    from ehrsr.profiling.latency_model import latency_for_profile

    result = DeviceLatencyResult()
    for spec, model, target in devices:
        record = latency_for_profile(config, target, model, canary=canary)
        result.metrics[spec.metric_key] = record.latency_ms
        result.sources[spec.name] = {**record.to_dict(), "model": spec.model_path, "accuracy": spec.accuracy}
        if result.refusal is None and spec.max_latency_ms is not None and record.latency_ms > spec.max_latency_ms:
            result.refusal = (
                f"latency on {spec.name} {record.latency_ms:.1f} ms ({record.source}) > --max-latency-ms "
                f"{spec.name}={spec.max_latency_ms:g}"
            )
    return result
