"""The objectives a search can optimise: name, measured metric, direction and unit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_OBJECTIVES", "OBJECTIVES", "Objective", "parse_objectives"]


@dataclass(frozen=True)
class Objective:
    name: str  # what the user types: --objectives psnr,latency
    metric_key: str  # key in a trial's ``metrics`` user attribute
    direction: Literal["maximize", "minimize"]
    label: str  # axis / column label
    unit: str  # "" when unitless
    kind: Literal["quality", "cost"]


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("psnr", "psnr", "maximize", "PSNR", "dB", "quality"),
        Objective("ssim", "ssim", "maximize", "SSIM", "", "quality"),
        Objective("lpips", "lpips", "minimize", "LPIPS", "", "quality"),
        Objective("latency", "latency_ms", "minimize", "latency", "ms", "cost"),
        Objective("macs", "macs", "minimize", "MACs", "", "cost"),
        Objective("params", "params_deploy", "minimize", "parameters (deploy)", "", "cost"),
        Objective("memory", "peak_memory_mb", "minimize", "peak memory", "MiB", "cost"),
    )
}
DEFAULT_OBJECTIVES = ("psnr", "latency")


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
