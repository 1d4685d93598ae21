"""Parsing ``--objectives``; the objectives themselves are defined in ``ehrsr.study_schema``."""

from __future__ import annotations

from ehrsr.study_schema import DEFAULT_OBJECTIVES, OBJECTIVES, Objective

__all__ = ["DEFAULT_OBJECTIVES", "OBJECTIVES", "Objective", "parse_objectives"]


def parse_objectives(text: str | list[str] | tuple[str, ...]) -> list[Objective]:
    """``"psnr,latency"`` -> objectives; unknown or repeated names raise ``ValueError``."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--objectives needs at least one of: {', '.join(OBJECTIVES)}")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r}; choose from: {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"objective listed twice in {','.join(names)!r}")
    if not any(OBJECTIVES[n].kind == "quality" for n in names):
        raise ValueError("--objectives needs a quality objective (psnr, ssim or lpips): nothing is trained otherwise")
    return [OBJECTIVES[n] for n in names]
