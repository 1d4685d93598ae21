"""Cost of a model on target hardware: MACs (fvcore, cross-checked by ptflops), parameters,
latency and peak memory, measured the way the efficient-SR community does (``docs/profiling.md``).

``profile_model`` does everything; ``count_macs`` only counts (cheap: the search uses it to refuse
over-limit configurations before training). See ``docs/profiling.md`` for the rules.
"""

from __future__ import annotations

from ehrsr.profiling.counting import (
    CountingError,
    MacCount,
    count_macs,
    count_parameters,
    deploy_form,
    is_ehrsr_model,
)
from ehrsr.profiling.latency import LatencyStats, cpu_threads, device_name, measure_latency, plan_passes
from ehrsr.profiling.memory import PeakMemory, measure_peak_memory
from ehrsr.profiling.profile import Profile, profile_model
from ehrsr.profiling.rules import OP_RULES, ZERO_COST_OPS, ZERO_COST_OPS_BY_CATEGORY

__all__ = [
    "OP_RULES",
    "ZERO_COST_OPS",
    "ZERO_COST_OPS_BY_CATEGORY",
    "CountingError",
    "LatencyStats",
    "MacCount",
    "PeakMemory",
    "Profile",
    "count_macs",
    "count_parameters",
    "cpu_threads",
    "deploy_form",
    "device_name",
    "is_ehrsr_model",
    "measure_latency",
    "measure_peak_memory",
    "plan_passes",
    "profile_model",
]
