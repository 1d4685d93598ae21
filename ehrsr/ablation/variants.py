"""The variants of a controlled ablation (what papers call an ablation).

Fix a reference configuration (the knee of the Pareto front by default) and derive

* the reference itself;
* the reference with each of its modules switched off (leave-one-out, ``-wab``);
* the conv-only baseline (the reference with every module off);
* the baseline with each module the search space can switch on added back (add-one-in, ``+wab``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ehrsr.config import MODULE_TOGGLES, EHRSRConfig
from ehrsr.errors import UserError
from ehrsr.study_schema import STUDY, StudyInfo

__all__ = ["AblationError", "Variant", "build_variants", "module_settings_from_space"]


class AblationError(UserError, ValueError):
    """The controlled ablation cannot start (no reference, a bad ``--reference``, ...)."""


@dataclass(frozen=True)
class Variant:
    """One configuration of the controlled ablation."""

    name: str  # "reference", "baseline", "-wab", "+ssm"
    kind: str  # "reference" | "baseline" | "leave-one-out" | "add-one-in"
    module: str | None  # the module switched (None for reference and baseline)
    config: EHRSRConfig | None  # None when the configuration is invalid (see ``refused``)
    same_as: str | None = None  # another variant with the identical configuration: its runs count
    refused: str | None = None  # why the configuration could not be built

    @property
    def compare_to(self) -> str | None:
        """The variant this one's deltas are taken against."""
        if self.kind == "reference":
            return None
        return "baseline" if self.kind == "add-one-in" else "reference"

    @property
    def runnable(self) -> bool:
        return self.config is not None and self.same_as is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "module": self.module,
            "config": self.config.to_dict() if self.config is not None else None,
            "same_as": self.same_as,
            "refused": self.refused,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        config = data.get("config")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            module=data.get("module"),
            config=EHRSRConfig.from_dict(config) if config is not None else None,
            same_as=data.get("same_as"),
            refused=data.get("refused"),
        )


def build_variants(
    reference: EHRSRConfig,
    switchable: Sequence[str],
    module_settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Variant]:
    """The variants of a controlled ablation of ``reference``.

    Leave-one-out: one per module the reference has on. Add-one-in: one per module in
    ``switchable`` (the modules the search space can switch on), added to the baseline with the
    reference's own settings for that module when the reference uses it, else with
    ``module_settings[module]`` (the space's middle values) when they fit the reference (e.g. the
    heads divide its width), else with the values the reference's configuration holds for the
    switched-off module (the space's fixed values or the configuration defaults).
    A variant whose configuration equals an earlier one's is marked ``same_as`` it (its runs are
    shared, never repeated); one that cannot be built is kept with ``refused`` set.
    """
    unknown = sorted(set(switchable) - set(MODULE_TOGGLES))
    if unknown:
        raise ValueError(f"unknown modules {unknown}; modules are {', '.join(MODULE_TOGGLES)}")
    settings = dict(module_settings or {})
    baseline = reference.replace(**{m: {"enabled": False} for m in MODULE_TOGGLES})
    variants: list[Variant] = []

    def add(name: str, kind: str, module: str | None, config: EHRSRConfig | None, refused: str | None = None) -> None:
        same = None
        if config is not None:
            same = next((v.name for v in variants if v.runnable and v.config == config), None)
        variants.append(Variant(name, kind, module, config, same, refused))

    add("reference", "reference", None, reference)
    add("baseline", "baseline", None, baseline)
    for module in reference.enabled_modules():
        add(f"-{module}", "leave-one-out", module, reference.replace(**{module: {"enabled": False}}))
    reference_on = set(reference.enabled_modules())
    for module in MODULE_TOGGLES:
        if module not in switchable:
            continue
        candidates: list[dict[str, Any]] = []
        if module in reference_on:
            candidates.append(reference.to_dict()[module])
        else:
            if module in settings:
                candidates.append({**settings[module], "enabled": True})
            candidates.append({"enabled": True})  # the reference's own (switched-off) section
        config, errors = None, []
        for section in candidates:
            try:
                config = baseline.replace(**{module: section})
                break
            except ValueError as exc:
                errors.append(str(exc))
        add(f"+{module}", "add-one-in", module, config, None if config is not None else "; ".join(errors))
    return variants


def module_settings_from_space(study: optuna.Study) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Modules the study's search space can switch on, and the settings each gets in the space's
    ``all-modules`` reference configuration (its middle values), read from the space text stored
    in ``study.user_attrs[STUDY.space]``."""
    from ehrsr.search.space import space_from_text  # the search package, imported when needed

    space_attr = study.user_attrs.get(STUDY.space) or {}
    text = space_attr.get("yaml")
    if not text:
        raise AblationError(
            f"study {study.study_name!r} stores no search space (user_attrs['space']['yaml']); "
            "cannot tell which modules the add-one-in rows should add"
        )
    space = space_from_text(text, name=str(space_attr.get("name", "<study space>")))
    switchable = [m for m, state in space.toggles().items() if state in ("searched", "on")]
    settings: dict[str, dict[str, Any]] = {}
    all_on = space.reference_params().get("all-modules")
    if all_on is not None:
        sampled = space.config_from_params(all_on, scale=StudyInfo.from_study(study).scale)
        if sampled.config is not None:
            data = sampled.config.to_dict()
            settings = {m: data[m] for m in switchable}
    return switchable, settings
