"""Deployment picks from predicted latency when the pick is not made on the target device.

A device profile with a ``latency_model`` (calibrated on that device, docs/latency_models.md) lets
``deploy`` pick on any machine: when this machine is not the device the model was calibrated on
(another CPU / GPU), or the device kind is not available here (a cuda profile without CUDA), the
Pareto candidates' latencies are *predicted* and the pick says so. On the device itself the
candidates are measured as always, the predictions are kept beside the measurements, and the pick
records whether choosing from the predictions would have picked another trial.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ehrsr.config import EHRSRConfig
from ehrsr.deploy.profiles import DeviceProfile, DeviceProfileError
from ehrsr.study_schema import STUDY

__all__ = ["LatencyPlan", "plan_latency"]


@dataclass(frozen=True)
class _StoredSpace:
    """The search space as the study stored it (name and YAML text: what the model's check hashes)."""

    name: str
    source_text: str


def this_hardware(kind: str) -> str | None:
    """The CPU model, or the GPU name (None without CUDA), as latency model files record it."""
    from ehrsr.profiling.latency import cpu_name

    if kind == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return cpu_name()


@dataclass(frozen=True)
class LatencyPlan:
    """How a pick gets its latencies: ``measured`` here, or ``predicted`` by the profile's model."""

    mode: str  # "measured" | "predicted"
    why: str
    model: Any = None  # ehrsr.profiling.latency_model.LatencyModel or None (profile without a model)
    model_path: str | None = None

    def predict(self, config: dict[str, Any], input_hw: tuple[int, int]) -> float | None:
        """Predicted latency (ms) of a stored configuration, None without a model or when a unit is
        missing (then the pick cannot be made from predictions for it)."""
        if self.model is None:
            return None
        return self.model.predict(EHRSRConfig.from_dict(config), input_hw).latency_ms

    def to_dict(self) -> dict[str, Any]:
        accuracy = asdict(self.model.accuracy) if self.model is not None and self.model.accuracy else None
        hardware = self.model.device.get("hardware") if self.model is not None else None
        return {"mode": self.mode, "why": self.why, "model": self.model_path, "model_hardware": hardware,
                "accuracy": accuracy}


def plan_latency(profile: DeviceProfile, study_attrs: dict[str, Any]) -> LatencyPlan:
    """Measure here (the profile has no model, or this machine is the model's device) or predict
    (another machine, or the device kind is missing here). A model that does not fit the study's
    space or the profile raises ``DeviceProfileError`` (one line)."""
    from ehrsr.profiling.latency_model import LatencyModel, LatencyModelError

    if profile.latency_model is None:
        return LatencyPlan("measured", "the profile has no latency model: measured on this machine")
    stored = study_attrs.get(STUDY.space) or {}
    space = _StoredSpace(str(stored.get("name")), str(stored.get("yaml"))) if stored.get("yaml") else None
    try:
        model = LatencyModel.load(profile.latency_model, space=space, device=profile)
    except LatencyModelError as exc:
        raise DeviceProfileError(f"device profile {profile.name!r}: {exc}") from None
    here = this_hardware(profile.kind)
    if here is None:
        why = f"this machine has no {profile.kind.upper()} device: latencies predicted by the profile's latency model"
        return LatencyPlan("predicted", why, model, profile.latency_model)
    calibrated_on = model.device.get("hardware")
    if calibrated_on != here:
        why = (f"hardware mismatch: the latency model was calibrated on {calibrated_on!r}, this machine is "
               f"{here!r}: latencies predicted, not measured")
        return LatencyPlan("predicted", why, model, profile.latency_model)
    why = f"on the device the latency model was calibrated on ({here}): measured here, predictions kept beside"
    return LatencyPlan("measured", why, model, profile.latency_model)
