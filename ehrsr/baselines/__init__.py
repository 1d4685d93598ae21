"""Hand-designed efficient-SR baselines (SPAN, SAFMN, PLKSR, RLFN, OmniSR, DITN) for the Pareto fronts.

``build_baseline(name, scale, size_class, bicubic_skip)`` builds one; ``available_baselines()``
says which need spandrel; ``deploy_baseline`` gives the form to profile. See ``docs/baselines.md``.
"""

from __future__ import annotations

from ehrsr.baselines.registry import (
    SIZE_CLASSES,
    BaselineInfo,
    BaselineUnavailable,
    UnknownBaseline,
    available_baselines,
    baseline_label,
    baseline_names,
    baselines_off,
    build_baseline,
    deploy_baseline,
)
from ehrsr.baselines.rlfn import RLFN
from ehrsr.baselines.skip import BicubicSkip, bicubic_upsample

__all__ = [
    "RLFN",
    "SIZE_CLASSES",
    "BaselineInfo",
    "BaselineUnavailable",
    "BicubicSkip",
    "UnknownBaseline",
    "available_baselines",
    "baseline_label",
    "baseline_names",
    "baselines_off",
    "bicubic_upsample",
    "build_baseline",
    "deploy_baseline",
]
