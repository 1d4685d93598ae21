"""Parsing ``--objectives``; the objectives themselves are defined in ``ehrsr.study_schema``."""

from __future__ import annotations

from ehrsr.study_schema import DEFAULT_OBJECTIVES, OBJECTIVES, Objective, resolve_objective

__all__ = ["DEFAULT_OBJECTIVES", "OBJECTIVES", "Objective", "parse_objectives"]


def parse_objectives(text: str | list[str] | tuple[str, ...]) -> list[Objective]:
    """``"psnr,latency"`` -> objectives; unknown or repeated names raise ``ValueError``.

    ``latency@NAME`` is the latency on device profile NAME, predicted by that profile's latency
    model (metric ``latency_ms@NAME``, docs/latency_models.md); the profile name keeps its case."""
    names = [_normalise(n) for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--objectives needs at least one of: {', '.join(OBJECTIVES)}")
    objectives = []
    for name in names:
        objectives.append(resolve_objective(name))
    if len(set(names)) != len(names):
        raise ValueError(f"objective listed twice in {','.join(names)!r}")
    if not any(o.kind == "quality" for o in objectives):
        raise ValueError("--objectives needs a quality objective (psnr, ssim or lpips): nothing is trained otherwise")
    return objectives


def _normalise(name: str) -> str:
    base, at, profile = name.strip().partition("@")
    return f"{base.strip().lower()}{at}{profile.strip()}"
