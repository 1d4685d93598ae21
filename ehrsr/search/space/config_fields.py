"""Reflection over ``EHRSRConfig``: which dotted field names a space may set, of which kind, with
which defaults, and how flat parameter values become nested config data (``docs/search_spaces.md``).

Nothing here is written per field: adding a field to the config adds it to every space's
vocabulary.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from ehrsr.config import EHRSRConfig

__all__ = [
    "CONFIG_DEFAULTS",
    "CONFIG_FIELDS",
    "MAX_LEVELS",
    "SPACE_ONLY_FIELDS",
    "TASK_FIELDS",
    "Refused",
    "config_dict",
    "default_value",
    "field_kind",
    "valid_model_keys",
]

TASK_FIELDS = ("scale", "in_channels", "out_channels")  # set by the task on the command line
MAX_LEVELS = 3  # EHRSRConfig accepts msg.levels in 0..3


def _reflect_config_fields() -> dict[str, Any]:
    """Dotted EHRSRConfig field name -> type hint (sections flattened one level deep)."""
    fields: dict[str, Any] = {}
    hints = typing.get_type_hints(EHRSRConfig)
    for f in dataclasses.fields(EHRSRConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub_hints = typing.get_type_hints(hint)
            for g in dataclasses.fields(hint):
                fields[f"{f.name}.{g.name}"] = sub_hints[g.name]
        else:
            fields[f.name] = hint
    return fields


CONFIG_FIELDS = _reflect_config_fields()
CONFIG_DEFAULTS = EHRSRConfig()
SPACE_ONLY_FIELDS: dict[str, Any] = {"trunk_level_offset": int}


def valid_model_keys() -> list[str]:
    return [k for k in CONFIG_FIELDS if k not in TASK_FIELDS] + list(SPACE_ONLY_FIELDS)


def field_kind(hint: Any) -> str:
    """'bool', 'int', 'float', 'literal', 'int-tuple' (or 'other') for a field's type hint."""
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "literal"
    if origin is tuple:
        return "int-tuple"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return field_kind(inner[0])
    return "other"


def default_value(name: str) -> Any:
    section, _, leaf = name.partition(".")
    if leaf:
        return getattr(getattr(CONFIG_DEFAULTS, section), leaf)
    return getattr(CONFIG_DEFAULTS, section)


class Refused(Exception):
    """Values that the space itself cannot turn into a configuration."""


def config_dict(values: dict[str, Any], scale: int) -> dict[str, Any]:
    """Nested EHRSRConfig data from flat parameter values (fills per-level depths and trunk level)."""
    data: dict[str, Any] = {"scale": scale}
    levels = values.get("msg.levels", CONFIG_DEFAULTS.msg.levels)
    for name, value in values.items():
        if name not in CONFIG_FIELDS or name == "msg.depths":
            continue  # lr / weight_decay train; trunk_level_offset, msg.depth<i>, msg.depths: below
        section, _, leaf = name.partition(".")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[name] = value
    if "msg.depths" in values:  # a fixed list (validated against a fixed msg.levels)
        depths = list(values["msg.depths"])
    else:
        # the config's own default is one block per level
        depths = [values.get(f"msg.depth{i}", 1) for i in range(1, levels + 1)]
    data.setdefault("msg", {})["depths"] = depths
    offset = values.get("trunk_level_offset")
    if offset is not None:
        if offset > levels:
            raise Refused(f"trunk_level_offset {offset} exceeds msg.levels {levels}")
        data["trunk_level"] = None if offset == 0 else levels - offset
    return data
