"""``run_search.py calibrate``: write a device profile's latency model on the device itself.

The FBNet idea (Wu et al., CVPR 2019; docs/latency_models.md): time a space's building blocks
once on the target, then predict any configuration's latency there from the table, on any machine.
This module resolves the profile and the space (``ehrsr.search.space.load_space``: profiling sits
below search, so the space is loaded here and passed to ``calibrate``) and runs the calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ehrsr.deploy.profiles import resolve_profile
from ehrsr.errors import UserError

__all__ = ["CalibrationError", "CalibrationResult", "calibrate_profile", "default_model_path"]


class CalibrationError(UserError, ValueError):
    """Calibration cannot start: an unusable output file, clock or space."""


@dataclass(frozen=True)
class CalibrationResult:
    path: Path
    profile: str
    space: str
    units: int
    accuracy: object | None  # ehrsr.profiling.latency_model.Accuracy


def default_model_path(profile: str, space: str) -> Path:
    """``latency_models/<profile>.<space>.latency.json`` (relative to the working folder)."""
    return Path("latency_models") / f"{profile}.{space}.latency.json"


def calibrate_profile(
    profile_name: str,
    space_name: str,
    out_path: str | Path | None = None,
    *,
    devices_path: str | Path | None = None,
    clock: str = "wall",
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **calibrate_kwargs: object,
) -> CalibrationResult:
    """Calibrate the latency model of device profile ``profile_name`` for search space
    ``space_name`` on this machine (the target) and write it to ``out_path``.

    ``calibrate_kwargs`` reach ``ehrsr.profiling.latency_model.calibrate`` as they are
    (``unit_timing``; tests pass ``max_units``, ``n_fit``...). Bad input raises a ``UserError``
    (one line)."""
    from ehrsr.profiling.latency_model import LatencyModelError, calibrate
    from ehrsr.profiling.onnx_runtime import check_timing_settings
    from ehrsr.search.space import load_space

    profile = resolve_profile(profile_name, devices_path)
    space = load_space(space_name)
    try:
        check_timing_settings(profile.runtime, clock=clock, threads=profile.threads, kind=profile.kind,
                              dtype=profile.dtype)
    except ValueError as exc:
        raise CalibrationError(f"calibrate {profile.name} with --clock {clock}: {exc}") from None
    path = Path(out_path) if out_path is not None else default_model_path(profile.name, space.name)
    if path.exists() and path.is_dir():
        raise CalibrationError(f"--out {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"--out {path}: cannot create its folder: {exc.strerror}") from None
    try:
        model = calibrate(space, profile, path, clock=clock, resume=resume, progress=progress, log=log,
                          **calibrate_kwargs)
    except (LatencyModelError, ValueError) as exc:
        raise CalibrationError(f"calibrate {profile.name}: {exc}") from None
    return CalibrationResult(path, profile.name, space.name, len(model.units), model.accuracy)
