"""Cost of a model on target hardware: MACs (fvcore, cross-checked by ptflops), parameters,
latency, peak memory and per-device latency models, measured the way the efficient-SR community does
(``docs/profiling.md``).

``profile_model`` does everything; ``count_macs`` only counts (cheap: the search uses it to refuse
over-limit configurations before training). See ``docs/profiling.md`` for the rules and
``docs/latency_models.md`` for latency models (calibrated on a target device, predicted anywhere).
"""

from __future__ import annotations

from ehrsr.profiling.canary import Canary, CanaryReading, measure_with_canary
from ehrsr.profiling.counting import (
    CountingError,
    MacCount,
    count_macs,
    count_parameters,
    deploy_form,
    is_ehrsr_model,
)
from ehrsr.profiling.latency import LatencyStats, cpu_threads, device_name, measure_latency, plan_passes
from ehrsr.profiling.latency_model import (
    LatencyModel,
    LatencyModelError,
    LatencyRecord,
    LatencyTarget,
    Prediction,
    calibrate,
    latency_for_profile,
)
from ehrsr.profiling.memory import PeakMemory, measure_peak_memory
from ehrsr.profiling.onnx_runtime import time_model
from ehrsr.profiling.profile import Profile, profile_model
from ehrsr.profiling.rules import OP_RULES, ZERO_COST_OPS, ZERO_COST_OPS_BY_CATEGORY

__all__ = [
    "OP_RULES",
    "ZERO_COST_OPS",
    "ZERO_COST_OPS_BY_CATEGORY",
    "Canary",
    "CanaryReading",
    "CountingError",
    "LatencyModel",
    "LatencyModelError",
    "LatencyRecord",
    "LatencyStats",
    "LatencyTarget",
    "MacCount",
    "PeakMemory",
    "Prediction",
    "Profile",
    "calibrate",
    "count_macs",
    "count_parameters",
    "cpu_threads",
    "deploy_form",
    "device_name",
    "is_ehrsr_model",
    "latency_for_profile",
    "measure_latency",
    "measure_peak_memory",
    "measure_with_canary",
    "plan_passes",
    "profile_model",
    "time_model",
]
