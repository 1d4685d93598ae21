"""Feasibility of a space against ``EHRSRConfig``: each fixed value, choice and range end must be
accepted by the config in at least one combination with the other parameters, and both anchor
configurations must build. Values feasible only in some combinations are refused at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optuna.distributions import CategoricalDistribution

from ehrsr.config import EHRSRConfig
from ehrsr.search.space.config_fields import CONFIG_DEFAULTS, Refused, config_dict
from ehrsr.search.space.distributions import Entry, candidate_values, middle_value
from ehrsr.search.space.errors import SearchSpaceError

if TYPE_CHECKING:
    from ehrsr.search.space.sampling import SearchSpace

__all__ = ["check_against_config", "probe"]


def check_against_config(space: SearchSpace, error: Callable[[tuple[str, ...], str], SearchSpaceError]) -> None:
    """Every fixed value and every choice / range end must be accepted by EHRSRConfig in at
    least one combination with the other parameters; then both anchors must build.

    Each value is probed on top of the anchor configuration (middle values, modules on). A
    rejection that names another field is left to that field's own check; one that names
    this field is retried with each other searched parameter moved to each of its candidate
    values, and only a value rejected in every such combination is an error (the rest are
    refused at sampling time, with their reason).
    """
    references = space.reference_params()
    base_params = references.get("all-modules") or references.get("conv-only") or {}
    base = space.resolve(lambda e: base_params.get(e.name, middle_value(e.distribution)))
    searched = [e for e in space.entries if e.searched and e.section == "model"]
    for entry in space.entries:
        if entry.section != "model":
            continue
        candidates = candidate_values(entry.distribution) if entry.searched else [entry.fixed]
        for value in candidates:
            rejection = probe(base, entry, value)
            if rejection is None or not (rejection.startswith(f"{entry.key} ") or rejection.startswith(f"{entry.key}[")):
                continue
            feasible = any(
                probe({**base, other.name: alt}, entry, value) is None
                for other in searched
                if other.name != entry.name
                for alt in candidate_values(other.distribution)
            )
            if not feasible:
                if not entry.searched:
                    what = "value"
                elif isinstance(entry.distribution, CategoricalDistribution):
                    what = "choice"
                else:
                    what = "range end"
                raise error(("model", entry.key), f"{what} {value!r} is rejected: {rejection}")
    for ref_name, params in references.items():
        sampled = space.config_from_params(params)
        if sampled.config is None:
            raise error(
                (), f"the '{ref_name}' reference configuration (middle values) is invalid: {sampled.refused}"
            )


def probe(base: dict[str, Any], entry: Entry, value: Any) -> str | None:
    """Why EHRSRConfig rejects ``base`` with ``entry`` set to ``value`` (its condition forced
    true), or None when it accepts it."""
    values = dict(base)
    values[entry.name] = value
    if entry.condition is not None:
        if entry.condition.at_least is None:
            values[entry.condition.param] = True
        else:
            values[entry.condition.param] = max(values.get(entry.condition.param, 0), entry.condition.at_least)
    try:
        EHRSRConfig.from_dict(config_dict(values, scale=CONFIG_DEFAULTS.scale))
    except (ValueError, Refused) as exc:
        return str(exc)
    return None
