"""Deployment: device profiles, candidate selection on the device, measuring, exports
(safetensors of the fused network, ONNX). ``docs/reports.md`` describes the files a pick writes.
"""

from __future__ import annotations

from ehrsr.deploy.export import (
    ONNX_TOLERANCE,
    OnnxExport,
    export_onnx,
    export_onnx_dynamic,
    load_deployed_model,
    load_trained_model,
    tiled_onnx_inference,
)
from ehrsr.deploy.pick import (
    DeploymentError,
    DeploymentPick,
    MeasuredCandidate,
    choose_candidate,
    cpu_threads_for,
    pick_deployment,
)
from ehrsr.deploy.profiles import (
    DEVICES_PATH,
    LIMIT_METRICS,
    DeviceProfile,
    DeviceProfileError,
    check_device_available,
    load_device_profiles,
    profiles_for_device,
)

__all__ = [
    "DEVICES_PATH",
    "LIMIT_METRICS",
    "ONNX_TOLERANCE",
    "DeploymentError",
    "DeploymentPick",
    "DeviceProfile",
    "DeviceProfileError",
    "MeasuredCandidate",
    "OnnxExport",
    "check_device_available",
    "choose_candidate",
    "cpu_threads_for",
    "export_onnx",
    "export_onnx_dynamic",
    "load_deployed_model",
    "load_device_profiles",
    "load_trained_model",
    "pick_deployment",
    "profiles_for_device",
    "tiled_onnx_inference",
]
