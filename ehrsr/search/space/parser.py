"""YAML text -> ``SearchSpace``: every key checked, every error located as ``<file>:<line>: key:
message`` (line numbers from PyYAML's node marks; duplicated keys rejected), values turned into
fixed values or Optuna distributions by the kind of the config field they set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ehrsr.config import MODULE_TOGGLES
from ehrsr.search.space.agreement import parse_proxy
from ehrsr.search.space.config_fields import (
    CONFIG_DEFAULTS,
    CONFIG_FIELDS,
    MAX_LEVELS,
    SPACE_ONLY_FIELDS,
    TASK_FIELDS,
    field_kind,
    valid_model_keys,
)
from ehrsr.search.space.distributions import Condition, Entry, candidate_range
from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.search.space.feasibility import check_against_config
from ehrsr.search.space.fidelity import parse_training
from ehrsr.search.space.sampling import SearchSpace

__all__ = ["FLOAT_TEXT", "SpaceParser"]

_TOP_KEYS = ("description", "model", "training", "proxy")
_SPEC_KEYS = ("choices", "low", "high", "step", "log")
_LEVEL_GATED = ("msg.skip_fusion", "msg.attention_gate", "msg.downsample", "trunk_level_offset")
FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # PyYAML reads 1e-4 as text


class SpaceParser:
    """Turns YAML text into a SearchSpace, raising SearchSpaceError('<file>:<line>: key: ...')."""

    def __init__(self, text: str, name: str, path: Path | None) -> None:
        self.text = text
        self.name = name
        self.path = path
        self.where = str(path) if path is not None else name
        self.lines: dict[tuple[str, ...], int] = {}

    # -- errors ---------------------------------------------------------------------------------
    def error(self, keys: tuple[str, ...], message: str) -> SearchSpaceError:
        line = self.lines.get(keys)
        location = f"{self.where}:{line}" if line else self.where
        key = ".".join(keys)
        return SearchSpaceError(f"{location}: {key}: {message}" if keys else f"{location}: {message}")

    # -- main -----------------------------------------------------------------------------------
    def parse(self) -> SearchSpace:
        data = self._load_yaml()
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise self.error(
                (str(unknown[0]),), f"unknown top-level key; valid keys: {', '.join(_TOP_KEYS)}"
            )
        description = data.get("description", "")
        if not isinstance(description, str):
            raise self.error(("description",), f"must be text, got {type(description).__name__}")
        if "training" not in data:
            raise self.error((), "missing the 'training' section (patch size, batch, lr, rungs)")
        model = self._mapping(data.get("model", {}) or {}, ("model",))
        training = self._mapping(data["training"], ("training",))

        entries = self._model_entries(model)
        fidelity, train_entries = parse_training(training, self.error, self._entry)
        proxy = parse_proxy(data["proxy"], self.error) if "proxy" in data else None
        if proxy is not None:
            lr = next((e for e in train_entries if e.name == "lr"), None)
            differences = proxy.protocol_differences(
                fidelity.max_steps, fidelity.batch_size, fidelity.patch_size,
                None if lr is not None and lr.searched else float(lr.fixed) if lr is not None else None)
            if differences:
                raise self.error(("proxy", "trial"), "the agreement was measured on another trial protocol: the "
                                 f"training section has {', '.join(differences)}; measure this protocol with "
                                 "benchmarks/proxy_fidelity.py or remove the proxy section")
        space = SearchSpace(self.name, self.path, self.text, description.strip(), entries + train_entries, fidelity,
                            proxy)
        check_against_config(space, self.error)
        return space

    def _load_yaml(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.text)
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            location = f"{self.where}:{mark.line + 1}" if mark is not None else self.where
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SearchSpaceError(f"{location}: not valid YAML: {problem}") from None
        if data is None:
            raise SearchSpaceError(f"{self.where}: the file is empty")
        if not isinstance(data, dict):
            raise SearchSpaceError(f"{self.where}: must be a mapping with keys {', '.join(_TOP_KEYS)}")
        self._index_lines(root)
        return data

    def _index_lines(self, root: yaml.Node | None) -> None:
        """Record the line of every key (two levels deep) and reject duplicated keys, which
        ``yaml.safe_load`` would silently collapse to the last one."""

        def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
            if not isinstance(node, yaml.MappingNode) or len(prefix) > 2:
                return
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                keys = (*prefix, key)
                self.lines[keys] = key_node.start_mark.line + 1
                if key in seen:
                    raise self.error(keys, "duplicated key (YAML would keep only the last one)")
                seen.add(key)
                walk(value_node, keys)

        if root is not None:
            walk(root, ())

    def _mapping(self, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(keys, f"must be a mapping of keys to values, got {type(value).__name__}")
        return value

    # -- model section --------------------------------------------------------------------------
    def _model_entries(self, model: dict[str, Any]) -> list[Entry]:
        valid = valid_model_keys()
        for key in model:
            keys = ("model", str(key))
            if key in TASK_FIELDS:
                raise self.error(keys, "is set by the task on the command line (--task/--scale), not by the space")
            if key in ("wab", "ssm", "fsb", "moe", "repmix", "noise", "msg") and isinstance(model[key], dict):
                raise self.error(keys, f"write section fields with dotted names, e.g. '{key}.enabled'")
            if key not in valid:
                raise self.error(keys, f"not an EHRSRConfig field; valid keys: {', '.join(valid)}")
        if "trunk_level" in model and "trunk_level_offset" in model:
            raise self.error(("model", "trunk_level_offset"), "give trunk_level or trunk_level_offset, not both")

        # the parents of conditions, checked first
        toggles: dict[str, Entry] = {}
        for module in MODULE_TOGGLES:
            key = f"{module}.enabled"
            if key in model:
                toggles[module] = self._entry("model", key, key, model[key])

        levels_entry = self._entry("model", "msg.levels", "msg.levels", model["msg.levels"]) if "msg.levels" in model else None
        level_values = (
            candidate_range(levels_entry.distribution)
            if levels_entry is not None and levels_entry.searched
            else [levels_entry.fixed if levels_entry is not None else CONFIG_DEFAULTS.msg.levels]
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in level_values):
            raise self.error(("model", "msg.levels"), f"must be an integer, got {level_values!r}")
        max_levels = min(max(level_values), MAX_LEVELS)
        min_levels = min(level_values)

        entries: list[Entry] = list(toggles.values())
        if levels_entry is not None:
            entries.append(levels_entry)
        for key, value in model.items():
            if key == "msg.levels" or (key.endswith(".enabled") and key.split(".")[0] in MODULE_TOGGLES):
                continue
            keys = ("model", key)
            section = key.split(".")[0] if "." in key else ""
            condition: Condition | None = None
            if section in MODULE_TOGGLES:
                toggle = toggles.get(section)
                if toggle is None:
                    raise self.error(
                        keys,
                        f"is a {section} hyperparameter but the module toggle '{section}.enabled' is not in "
                        f"the space; add '{section}.enabled: {{choices: [false, true]}}' or "
                        f"'{section}.enabled: true'",
                    )
                if not toggle.searched and toggle.fixed is False:
                    raise self.error(keys, f"is set but '{section}.enabled' is fixed to false, so it is never used")
                if toggle.searched:
                    condition = Condition(f"{section}.enabled")
            if key in _LEVEL_GATED:
                if max_levels == 0:
                    raise self.error(keys, "is set but msg.levels is 0, so there is no level for it to act on")
                if min_levels == 0:
                    condition = Condition("msg.levels", at_least=1)
            if key == "msg.depths":
                entries.extend(self._depth_entries(value, levels_entry, max_levels, min_levels))
                continue
            entries.append(self._entry("model", key, key, value, condition))
        return entries

    def _depth_entries(
        self, value: Any, levels_entry: Entry | None, max_levels: int, min_levels: int
    ) -> list[Entry]:
        keys = ("model", "msg.depths")
        if isinstance(value, list):
            if levels_entry is None or levels_entry.searched:
                raise self.error(
                    keys,
                    "a fixed list of depths needs a fixed msg.levels; with msg.levels searched give one "
                    "depth for every level (e.g. 1) or a distribution (e.g. {low: 1, high: 2})",
                )
            if len(value) != levels_entry.fixed:
                raise self.error(keys, f"lists {len(value)} depths but msg.levels is {levels_entry.fixed}")
            return [Entry("msg.depths", "msg.depths", "model", fixed=list(value))]
        if max_levels == 0:
            raise self.error(keys, "is set but msg.levels is 0, so there are no levels to give depths to")
        entries = []
        for level in range(1, max_levels + 1):
            condition = Condition("msg.levels", at_least=level) if level > min_levels else None
            entries.append(self._entry("model", "msg.depths", f"msg.depth{level}", value, condition, hint=int))
        return entries

    def _entry(
        self,
        section: str,
        key: str,
        name: str,
        value: Any,
        condition: Condition | None = None,
        hint: Any = None,
    ) -> Entry:
        """Parse one value: a plain scalar is fixed, a mapping is a distribution."""
        keys = (section, key)
        if hint is None:
            hint = CONFIG_FIELDS.get(key, SPACE_ONLY_FIELDS.get(key, float))
        kind = field_kind(hint)
        if isinstance(value, dict):
            return Entry(name, key, section, distribution=self._distribution(keys, kind, value), condition=condition)
        if isinstance(value, list):
            if kind == "int-tuple":
                return Entry(name, key, section, fixed=list(value), condition=condition)
            raise self.error(
                keys, f"a list is not a value here; to search over these values write {{choices: {value}}}"
            )
        if kind == "float" and isinstance(value, str) and FLOAT_TEXT.match(value):
            value = float(value)  # PyYAML reads 1e-4 (no dot) as text
        return Entry(name, key, section, fixed=value, condition=condition)

    def _distribution(self, keys: tuple[str, ...], kind: str, spec: dict[str, Any]) -> BaseDistribution:
        unknown = [k for k in spec if k not in _SPEC_KEYS]
        if unknown:
            raise self.error(
                keys, f"unknown distribution key {unknown[0]!r}; valid keys: {', '.join(_SPEC_KEYS)}"
            )
        if "choices" in spec:
            extra = [k for k in spec if k != "choices"]
            if extra:
                raise self.error(keys, f"'choices' cannot be combined with {', '.join(extra)}")
            choices = spec["choices"]
            if not isinstance(choices, list):
                raise self.error(keys, f"choices must be a list, got {type(choices).__name__} {choices!r}")
            if not choices:
                raise self.error(keys, "choices is empty; give at least one value")
            for choice in choices:
                if choice is not None and not isinstance(choice, (bool, int, float, str)):
                    raise self.error(keys, f"choice {choice!r} is not a plain value (number, text, true/false, null)")
            if kind == "float":
                choices = [float(c) if isinstance(c, str) and FLOAT_TEXT.match(c) else c for c in choices]
            if len({(type(c), c) for c in choices}) != len(choices):
                raise self.error(keys, f"choices {choices} repeat a value")
            return CategoricalDistribution(choices)

        if "low" not in spec or "high" not in spec:
            missing = [k for k in ("low", "high") if k not in spec]
            raise self.error(
                keys, f"a range needs low and high (missing {', '.join(missing)}), or give choices: [...]"
            )
        if kind in ("bool", "literal"):
            raise self.error(keys, "takes named values, not a numeric range; use choices: [...]")
        is_int = kind in ("int", "int-tuple")
        low, high = spec["low"], spec["high"]
        step, log = spec.get("step"), spec.get("log", False)
        if not isinstance(log, bool):
            raise self.error(keys, f"log must be true or false, got {log!r}")
        for label, number in (("low", low), ("high", high), ("step", step)):
            if number is None and label == "step":
                continue
            if isinstance(number, str) and not is_int and FLOAT_TEXT.match(number):
                continue
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise self.error(keys, f"{label} must be a number, got {number!r}")
            if is_int and not (isinstance(number, int) or float(number).is_integer()):
                raise self.error(keys, f"{label} must be an integer for this integer field, got {number!r}")
        if is_int:
            low, high = int(low), int(high)
            step = int(step) if step is not None else None
        else:
            low, high = float(low), float(high)
            step = float(step) if step is not None else None
        if low > high:
            raise self.error(keys, f"low ({low}) > high ({high})")
        if log and step is not None:
            raise self.error(keys, "log and step cannot be combined (Optuna samples log ranges continuously)")
        if log and low <= 0:
            raise self.error(keys, f"a log range needs low > 0, got {low}")
        if step is not None:
            if step <= 0:
                raise self.error(keys, f"step must be > 0, got {step}")
            span = (high - low) / step
            if abs(span - round(span)) > 1e-9:
                raise self.error(keys, f"step {step} does not divide the range {low}..{high}")
        if is_int:
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(low, high, log=log, step=step)
