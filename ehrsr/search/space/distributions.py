"""The parameters of a space: fixed or searched (an Optuna distribution), optionally conditional,
and the representative values (middle, ends, all choices) that anchors and feasibility checks use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ehrsr.search.space.config_fields import default_value

__all__ = ["Condition", "Entry", "candidate_range", "candidate_values", "in_distribution", "middle_value"]


@dataclass(frozen=True)
class Condition:
    """When a parameter is active: ``param`` is true (a module toggle), or ``param >= at_least``."""

    param: str
    at_least: int | None = None

    def holds(self, values: dict[str, Any]) -> bool:
        value = values.get(self.param, default_value(self.param))
        if self.at_least is None:
            return value is True
        return value >= self.at_least

    def describe(self) -> str:
        return f"{self.param} is true" if self.at_least is None else f"{self.param} >= {self.at_least}"


@dataclass(frozen=True)
class Entry:
    """One parameter of the space: fixed (``distribution`` None) or searched."""

    name: str  # parameter name (dotted config name, msg.depth<i>, trunk_level_offset, lr, ...)
    key: str  # the YAML key it came from, for error messages (msg.depths for msg.depth<i>)
    section: str  # "model" or "training"
    fixed: Any = None
    distribution: BaseDistribution | None = None
    condition: Condition | None = None

    @property
    def searched(self) -> bool:
        return self.distribution is not None


def in_distribution(value: Any, dist: BaseDistribution | None) -> bool:
    if dist is None:
        return True
    if isinstance(dist, CategoricalDistribution):
        return any(value == c and type(value) is type(c) for c in dist.choices) or (
            # ints stored by a JSON storage may come back as floats and vice versa
            isinstance(value, (int, float)) and not isinstance(value, bool) and value in dist.choices
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and float(value) != int(value):
        return False
    return dist.low <= value <= dist.high


def middle_value(dist: BaseDistribution | None) -> Any:
    """A sensible middle value: the middle choice (the first of two middles), the middle of an
    int/float range snapped to its step, or the geometric middle of a log range."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[(len(dist.choices) - 1) // 2]
    if isinstance(dist, IntDistribution):
        if dist.log:
            return min(dist.high, max(dist.low, round(math.sqrt(dist.low * dist.high))))
        n_steps = (dist.high - dist.low) // dist.step
        return dist.low + dist.step * (n_steps // 2)
    assert isinstance(dist, FloatDistribution)
    if dist.log:
        return math.sqrt(dist.low * dist.high)
    if dist.step is not None:
        n_steps = round((dist.high - dist.low) / dist.step)
        return round(dist.low + dist.step * (n_steps // 2), 12)  # 0.3, not 0.30000000000000004
    return (dist.low + dist.high) / 2


def candidate_values(dist: BaseDistribution) -> list[Any]:
    """Values that represent a distribution when checking it against the configuration."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    values = [dist.low, middle_value(dist), dist.high]
    return list(dict.fromkeys(values))


def candidate_range(dist: BaseDistribution | None) -> list[Any]:
    """All values of a small int distribution (msg.levels), or the choices of a categorical."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    return [getattr(dist, "low", None), getattr(dist, "high", None)]
