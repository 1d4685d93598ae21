"""The ``proxy`` section of a space: how well its trial protocol ranks like long training.

``benchmarks/proxy_fidelity.py`` trains configurations of a space far longer (as ``run_search.py
train`` trains a pick) and measures how well the space's brief trial ranks them: Kendall's tau and
Spearman's rho with 95 % bootstrap intervals, the regret of the proxy's best configuration and the
recall of the reference's three best (docs/proxy_fidelity.md). The numbers belong to the space's
training section and to the data they were measured on, so they live in the space file::

    proxy:
      kendall: [0.82, 0.61, 0.95]        # value, 95 % interval
      spearman: [0.93, 0.78, 0.99]
      configurations: 18
      regret_db: 0.0
      top3_recall: 0.67
      measured_on: {task: sr, scale: 4, data: builtin}
      trial: {max_steps: 972, batch_size: 8, patch_size: 32, lr: 2.0e-3}
      reference: "2400 steps as `train --pick` trains, batch 8, 32 px, mean of 2 seeds"

``trial`` is the trial protocol that was measured; the space's ``training`` section must train
exactly so (a fixed ``lr``), or loading the space fails: numbers measured on another protocol do
not carry over. A study whose task and data are those of ``measured_on`` starts with this
verdict; any other study has to measure its own (the in-study proxy-fidelity check).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.stats import TRUST_TAU_LOW

__all__ = ["ProxyAgreement", "parse_proxy"]

_KEYS = ("kendall", "spearman", "configurations", "regret_db", "top3_recall", "measured_on", "trial", "reference")
_MEASURED_ON = ("task", "scale", "data")
_TRIAL = ("max_steps", "batch_size", "patch_size", "lr")


@dataclass(frozen=True)
class ProxyAgreement:
    """Rank agreement of a space's trial protocol with long training, as measured by the benchmark."""

    kendall: float
    kendall_low: float
    kendall_high: float
    spearman: float
    spearman_low: float
    spearman_high: float
    configurations: int
    regret_db: float
    top3_recall: float
    task: str
    scale: int
    data: str  # "builtin": the built-in sample images
    reference: str
    max_steps: int  # the measured trial protocol
    batch_size: int
    patch_size: int
    lr: float

    @property
    def trusted(self) -> bool:
        """Whether the lower end of tau's interval clears ``TRUST_TAU_LOW``."""
        return self.kendall_low > TRUST_TAU_LOW

    def applies_to(self, task: Mapping[str, Any], train_data: str | None, val_data: str | None) -> bool:
        """Whether a study of this task and data is the one the numbers were measured on."""
        builtin = train_data is None and val_data is None
        return (task.get("task") == self.task and int(task.get("scale", 0)) == self.scale
                and (self.data == "builtin") == builtin and not _degraded(task))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def protocol_differences(self, max_steps: int, batch_size: int, patch_size: int, lr: float | None) -> list[str]:
        """Where a space's trial protocol (``lr`` None: searched) is not the measured one."""
        out = [f"{name} {given} (measured at {measured})"
               for name, given, measured in (("max_steps", max_steps, self.max_steps),
                                             ("batch_size", batch_size, self.batch_size),
                                             ("patch_size", patch_size, self.patch_size)) if given != measured]
        if lr is None:
            out.append(f"lr searched (measured fixed at {self.lr:g})")
        elif not math.isclose(lr, self.lr, rel_tol=1e-9):
            out.append(f"lr {lr:g} (measured at {self.lr:g})")
        return out


def _degraded(task: Mapping[str, Any]) -> bool:
    return bool(task.get("noise_sigma")) or bool(task.get("blur_sigma")) or task.get("jpeg_quality") is not None


def parse_proxy(section: Any, error: Callable[[tuple[str, ...], str], SearchSpaceError]) -> ProxyAgreement:
    """Validate the ``proxy`` section (``error(keys, message)`` makes the located error)."""
    if not isinstance(section, dict):
        raise error(("proxy",), f"must be a mapping with keys {', '.join(_KEYS)}")
    for key in section:
        if key not in _KEYS:
            raise error(("proxy", str(key)), f"unknown key; valid keys: {', '.join(_KEYS)}")
    for key in _KEYS:
        if key not in section:
            raise error(("proxy",), f"missing '{key}'")

    def triple(key: str, low: float, high: float) -> tuple[float, float, float]:
        value = section[key]
        if not (isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value)):
            raise error(("proxy", key), f"must be [value, interval low, interval high], got {value!r}")
        v, lo, hi = (float(x) for x in value)
        if not (low <= lo <= v <= hi <= high):
            raise error(("proxy", key), f"needs {low} <= low <= value <= high <= {high}, got {value!r}")
        return v, lo, hi

    def number(key: str, low: float, high: float) -> float:
        value = section[key]
        if not _number(value) or not low <= float(value) <= high:
            raise error(("proxy", key), f"must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    kendall, spearman = triple("kendall", -1.0, 1.0), triple("spearman", -1.0, 1.0)
    configurations = section["configurations"]
    if isinstance(configurations, bool) or not isinstance(configurations, int) or configurations < 4:
        raise error(("proxy", "configurations"), f"must be an integer >= 4, got {configurations!r}")
    measured = section["measured_on"]
    if not isinstance(measured, dict) or set(measured) != set(_MEASURED_ON):
        raise error(("proxy", "measured_on"), f"must be a mapping with keys {', '.join(_MEASURED_ON)}")
    if not isinstance(section["reference"], str) or not section["reference"].strip():
        raise error(("proxy", "reference"), "must be text saying what the long training was")
    trial = section["trial"]
    if not isinstance(trial, dict) or set(trial) != set(_TRIAL):
        raise error(("proxy", "trial"), f"must be a mapping with keys {', '.join(_TRIAL)} (the measured protocol)")
    for key in _TRIAL:
        value = trial[key]
        whole = key != "lr"
        if not _number(value) or value <= 0 or (whole and not isinstance(value, int)):
            raise error(("proxy", "trial", key), f"must be a positive {'integer' if whole else 'number'}, got {value!r}")
    return ProxyAgreement(
        *kendall, *spearman, configurations, number("regret_db", 0.0, math.inf), number("top3_recall", 0.0, 1.0),
        str(measured["task"]), int(measured["scale"]), str(measured["data"]), section["reference"].strip(),
        int(trial["max_steps"]), int(trial["batch_size"]), int(trial["patch_size"]), float(trial["lr"]),
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
