"""Declarative EHR-SR search spaces: YAML files validated on load, sampled through Optuna.

A space file has three top-level keys (``docs/search_spaces.md`` is the reference)::

    description: free text
    model:                       # EHRSRConfig fields by dotted name
      width: {choices: [8, 16, 24]}          # categorical
      msg.levels: {low: 0, high: 2}          # int (optional step, or log)
      fsb.cutoff: {low: 0.1, high: 0.5}      # float (optional log, or step)
      wab.window_size: 4                     # fixed value
    training:                    # the fidelity: what one trial trains with
      patch_size: 32
      batch_size: 8
      lr: {low: 2.0e-4, high: 2.0e-3, log: true}
      min_steps: 20
      eta: 3
      max_steps: 180
      seconds_per_trial_estimate: 20

Conditional parameters follow from the config's structure, not from extra syntax:

* every hyperparameter of a module section (``wab``, ``ssm``, ``fsb``, ``moe``, ``repmix``,
  ``noise``) is sampled only when that module's ``enabled`` toggle is true; the toggle must be in
  the space;
* ``msg.depths`` gives one distribution that each level's depth is drawn from, as the parameters
  ``msg.depth1`` .. ``msg.depth3`` (one name per level, so the distribution of a name never
  changes within a study, as Optuna requires); depth ``i`` is sampled only when
  ``msg.levels >= i``;
* ``msg.skip_fusion``, ``msg.attention_gate``, ``msg.downsample`` and ``trunk_level_offset`` are
  sampled only when ``msg.levels >= 1``;
* ``trunk_level_offset`` (space-only) places the trunk that many levels above the lowest:
  ``trunk_level = msg.levels - offset`` (0 keeps the config default, the lowest level). It keeps
  one distribution whatever the number of levels, which ``trunk_level`` itself could not.

The task fields (``scale``, ``in_channels``, ``out_channels``) belong to the command line, not to
the space; ``suggest`` and ``config_from_params`` take ``scale``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ehrsr.config import MODULE_TOGGLES, EHRSRConfig
from ehrsr.resources import shipped_space_names, space_file, spaces_dir
from ehrsr.search.asha import rung_steps

__all__ = [
    "LOSSES",
    "SPACES_DIR",
    "Fidelity",
    "SampledConfig",
    "SearchSpace",
    "SearchSpaceError",
    "load_space",
    "shipped_spaces",
]

SPACES_DIR = spaces_dir()
"""Where the shipped spaces live: ``ehrsr/search_spaces/``, package data (see :mod:`ehrsr.resources`)."""

LOSSES: tuple[str, ...] = ("l1", "mse", "charbonnier")
"""Reconstruction losses a space may name (training implements each)."""

_TOP_KEYS = ("description", "model", "training")
_TASK_FIELDS = ("scale", "in_channels", "out_channels")
_SPEC_KEYS = ("choices", "low", "high", "step", "log")
_TRAINING_REQUIRED = ("patch_size", "batch_size", "lr", "min_steps", "eta", "seconds_per_trial_estimate")
_TRAINING_OPTIONAL = ("max_steps", "rungs", "loss", "weight_decay")
_TRAINING_SEARCHABLE = ("lr", "weight_decay")
_LEVEL_GATED = ("msg.skip_fusion", "msg.attention_gate", "msg.downsample", "trunk_level_offset")
_MAX_LEVELS = 3  # EHRSRConfig accepts msg.levels in 0..3
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class SearchSpaceError(ValueError):
    """A search-space file is invalid; the message names the file, the key and what is wrong."""


# ---------------------------------------------------------------------------------------------
# what the configuration accepts


def _config_fields() -> dict[str, Any]:
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


_CONFIG_FIELDS = _config_fields()
_CONFIG_DEFAULTS = EHRSRConfig()
_SPACE_ONLY_FIELDS: dict[str, Any] = {"trunk_level_offset": int}


def _valid_model_keys() -> list[str]:
    return [k for k in _CONFIG_FIELDS if k not in _TASK_FIELDS] + list(_SPACE_ONLY_FIELDS)


def _kind(hint: Any) -> str:
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
        return _kind(inner[0])
    return "other"


def _default_value(name: str) -> Any:
    section, _, leaf = name.partition(".")
    if leaf:
        return getattr(getattr(_CONFIG_DEFAULTS, section), leaf)
    return getattr(_CONFIG_DEFAULTS, section)


# ---------------------------------------------------------------------------------------------
# public data types


@dataclass(frozen=True)
class Fidelity:
    """What one trial trains with, and the rungs of multi-fidelity early stopping."""

    patch_size: int  # LR training patch side in pixels (the HR patch is patch_size * scale)
    batch_size: int  # patches per step
    min_steps: int  # first rung r
    eta: int  # reduction factor between rungs
    max_steps: int  # full fidelity, the top rung
    rung_steps: tuple[int, ...]  # r, r*eta, ... < max_steps, then max_steps
    loss: str  # one of LOSSES
    seconds_per_trial_estimate: float  # prior cost of one full-fidelity trial, for budget planning

    @property
    def n_rungs(self) -> int:
        return len(self.rung_steps)


@dataclass(frozen=True)
class SampledConfig:
    """One configuration drawn from a space.

    ``params`` are the searched values by parameter name (what Optuna stores as
    ``trial.params``); ``values`` holds every active value, fixed ones included; ``train`` the
    training hyperparameters (``lr``, ``weight_decay``). ``config`` is None when the values cannot
    make a network; ``refused`` then says why (before any training is spent on it).
    """

    config: EHRSRConfig | None
    params: dict[str, Any]
    values: dict[str, Any]
    train: dict[str, float]
    refused: str | None = None

    def summary(self) -> str:
        """Short one-line description, e.g. ``w16 L2[1,2] T2@2 naf wab+moe``."""
        cfg = self.config
        if cfg is None:
            return f"refused ({self.refused})"
        depths = f"[{','.join(map(str, cfg.msg.depths))}]" if cfg.msg.levels else ""
        modules = "+".join(cfg.enabled_modules()) or "conv-only"
        return (
            f"w{cfg.width} L{cfg.msg.levels}{depths} T{cfg.trunk_blocks}@{cfg.resolved_trunk_level} "
            f"{cfg.block_type} {modules}"
        )


@dataclass(frozen=True)
class _Condition:
    """When a parameter is active: ``param`` is true (a module toggle), or ``param >= at_least``."""

    param: str
    at_least: int | None = None

    def holds(self, values: dict[str, Any]) -> bool:
        value = values.get(self.param, _default_value(self.param))
        if self.at_least is None:
            return value is True
        return value >= self.at_least

    def describe(self) -> str:
        return f"{self.param} is true" if self.at_least is None else f"{self.param} >= {self.at_least}"


@dataclass(frozen=True)
class _Entry:
    """One parameter of the space: fixed (``distribution`` None) or searched."""

    name: str  # parameter name (dotted config name, msg.depth<i>, trunk_level_offset, lr, ...)
    key: str  # the YAML key it came from, for error messages (msg.depths for msg.depth<i>)
    section: str  # "model" or "training"
    fixed: Any = None
    distribution: BaseDistribution | None = None
    condition: _Condition | None = None

    @property
    def searched(self) -> bool:
        return self.distribution is not None


class _Refused(Exception):
    """Values that the space itself cannot turn into a configuration."""


# ---------------------------------------------------------------------------------------------
# the space


class SearchSpace:
    """A validated search space. Build it with ``load_space`` (or ``SearchSpace.from_text``)."""

    def __init__(
        self,
        name: str,
        path: Path | None,
        source_text: str,
        description: str,
        entries: list[_Entry],
        fidelity: Fidelity,
    ) -> None:
        self.name = name
        self.path = path
        self.source_text = source_text
        self.description = description
        self.fidelity = fidelity
        # parents (module toggles, msg.levels) first, so conditions can be evaluated in one pass
        self._entries = [e for e in entries if e.condition is None] + [e for e in entries if e.condition]

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r}, {len(self.distributions)} searched parameters)"

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, name: str = "<text>", path: Path | None = None) -> SearchSpace:
        """Parse and validate YAML text (``load_space`` reads a file and calls this)."""
        return _Parser(text, name, path).parse()

    # -- introspection --------------------------------------------------------------------------
    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter the space can sample, with its (study-wide constant) distribution."""
        return {e.name: e.distribution for e in self._entries if e.distribution is not None}

    @property
    def fixed(self) -> dict[str, Any]:
        """Fixed values by parameter name (applied when their condition holds)."""
        return {e.name: e.fixed for e in self._entries if not e.searched}

    def conditions(self) -> dict[str, str]:
        """Parameter name -> the condition under which it is active (conditional ones only)."""
        return {e.name: e.condition.describe() for e in self._entries if e.condition is not None}

    def toggles(self) -> dict[str, str]:
        """Module toggles and how the space sets them: 'searched', 'on' or 'off'."""
        result = {}
        for module in MODULE_TOGGLES:
            entry = self._entry(f"{module}.enabled")
            if entry is None:
                result[module] = "off"
            elif entry.searched:
                result[module] = "searched"
            else:
                result[module] = "on" if entry.fixed else "off"
        return result

    # -- sampling -------------------------------------------------------------------------------
    def suggest(self, trial: Any, *, scale: int = 4) -> SampledConfig:
        """Sample one configuration through an Optuna trial (``trial.suggest_*`` for each active
        parameter, conditional ones only when their condition holds)."""

        def draw(entry: _Entry) -> Any:
            dist = entry.distribution
            if isinstance(dist, CategoricalDistribution):
                return trial.suggest_categorical(entry.name, list(dist.choices))
            if isinstance(dist, IntDistribution):
                return trial.suggest_int(entry.name, dist.low, dist.high, step=dist.step, log=dist.log)
            assert isinstance(dist, FloatDistribution)
            return trial.suggest_float(entry.name, dist.low, dist.high, step=dist.step, log=dist.log)

        return self._sample(draw, scale)

    def config_from_params(self, params: dict[str, Any], *, scale: int = 4) -> SampledConfig:
        """Rebuild the configuration of a finished trial from its ``params``.

        Unknown names, missing active parameters and values outside their distribution raise
        ``ValueError``; inactive extra parameters are ignored.
        """
        distributions = self.distributions
        unknown = sorted(set(params) - set(distributions))
        if unknown:
            raise ValueError(
                f"search space '{self.name}' has no parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; its parameters: {', '.join(distributions)}"
            )

        def lookup(entry: _Entry) -> Any:
            if entry.name not in params:
                cond = f" (active because {entry.condition.describe()})" if entry.condition else ""
                raise ValueError(f"params lack {entry.name!r}{cond} for search space '{self.name}'")
            value = params[entry.name]
            if not _in_distribution(value, entry.distribution):
                raise ValueError(
                    f"params[{entry.name!r}] = {value!r} is outside its distribution {entry.distribution}"
                )
            return value

        return self._sample(lookup, scale)

    def reference_params(self) -> dict[str, dict[str, Any]]:
        """Anchor configurations to enqueue before sampling starts, as flat Optuna params.

        ``"conv-only"``: every module off (omitted when the space fixes a module on);
        ``"all-modules"``: every module the space can switch on is on (omitted when none can).
        Every other parameter takes its middle value (``_middle``), identical in both, so the two
        anchors differ only in the modules: the first row of an ablation table.
        """
        toggles = self.toggles()
        references: dict[str, dict[str, Any]] = {}
        if all(state != "on" for state in toggles.values()):
            references["conv-only"] = self._reference(on=False)
        if any(state != "off" for state in toggles.values()):
            references["all-modules"] = self._reference(on=True)
        return references

    # -- internals ------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry | None:
        return next((e for e in self._entries if e.name == name), None)

    def _reference(self, on: bool) -> dict[str, Any]:
        toggle_names = {f"{m}.enabled" for m in MODULE_TOGGLES}

        def pick(entry: _Entry) -> Any:
            if entry.name in toggle_names:
                return on
            return _middle(entry.distribution)

        values = self._resolve(pick)
        return {name: value for name, value in values.items() if name in self.distributions}

    def _resolve(self, draw: Callable[[_Entry], Any]) -> dict[str, Any]:
        """Every active parameter's value: fixed ones as given, searched ones from ``draw``."""
        values: dict[str, Any] = {}
        for entry in self._entries:
            if entry.condition is not None and not entry.condition.holds(values):
                continue
            values[entry.name] = draw(entry) if entry.searched else entry.fixed
        return values

    def _sample(self, draw: Callable[[_Entry], Any], scale: int) -> SampledConfig:
        values = self._resolve(draw)
        params = {k: v for k, v in values.items() if k in self.distributions}
        train = {k: float(values[k]) for k in _TRAINING_SEARCHABLE if k in values}
        train.setdefault("weight_decay", 0.0)
        try:
            config = EHRSRConfig.from_dict(_config_dict(values, scale))
        except (ValueError, _Refused) as exc:
            return SampledConfig(None, params, values, train, refused=str(exc))
        return SampledConfig(config, params, values, train)


def _config_dict(values: dict[str, Any], scale: int) -> dict[str, Any]:
    """Nested EHRSRConfig data from flat parameter values (fills per-level depths and trunk level)."""
    data: dict[str, Any] = {"scale": scale}
    levels = values.get("msg.levels", _CONFIG_DEFAULTS.msg.levels)
    for name, value in values.items():
        if name in _TRAINING_SEARCHABLE or name == "trunk_level_offset" or name.startswith("msg.depth"):
            continue
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
            raise _Refused(f"trunk_level_offset {offset} exceeds msg.levels {levels}")
        data["trunk_level"] = None if offset == 0 else levels - offset
    return data


def _in_distribution(value: Any, dist: BaseDistribution | None) -> bool:
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


def _middle(dist: BaseDistribution | None) -> Any:
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


def _candidate_values(dist: BaseDistribution) -> list[Any]:
    """Values that represent a distribution when checking it against the configuration."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    values = [dist.low, _middle(dist), dist.high]
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------
# loading


def shipped_spaces() -> list[str]:
    """Names of the shipped spaces (``tiny``, ``full``, ...)."""
    return shipped_space_names()


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A shipped space by name (``tiny``, ``full``: ``ehrsr/search_spaces/<name>.yaml``) or a YAML file."""
    text_name = str(name_or_path)
    path = Path(name_or_path)
    is_bare_name = isinstance(name_or_path, str) and "/" not in text_name and not path.suffix
    if is_bare_name and space_file(text_name).is_file():
        path = space_file(text_name)
    elif not path.is_file():
        shipped = ", ".join(shipped_spaces()) or "none found"
        raise SearchSpaceError(
            f"search space {text_name!r} is neither a shipped space ({shipped}) nor an existing file"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchSpaceError(f"{path}: cannot read: {exc.strerror}") from None
    return SearchSpace.from_text(text, name=path.stem, path=path)


class _Parser:
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
        fidelity, train_entries = self._training(training)
        space = SearchSpace(self.name, self.path, self.text, description.strip(), entries + train_entries, fidelity)
        self._check_against_config(space)
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
    def _model_entries(self, model: dict[str, Any]) -> list[_Entry]:
        valid = _valid_model_keys()
        for key in model:
            keys = ("model", str(key))
            if key in _TASK_FIELDS:
                raise self.error(keys, "is set by the task on the command line (--task/--scale), not by the space")
            if key in ("wab", "ssm", "fsb", "moe", "repmix", "noise", "msg") and isinstance(model[key], dict):
                raise self.error(keys, f"write section fields with dotted names, e.g. '{key}.enabled'")
            if key not in valid:
                raise self.error(keys, f"not an EHRSRConfig field; valid keys: {', '.join(valid)}")
        if "trunk_level" in model and "trunk_level_offset" in model:
            raise self.error(("model", "trunk_level_offset"), "give trunk_level or trunk_level_offset, not both")

        # the parents of conditions, checked first
        toggles: dict[str, _Entry] = {}
        for module in MODULE_TOGGLES:
            key = f"{module}.enabled"
            if key in model:
                toggles[module] = self._entry("model", key, key, model[key])

        levels_entry = self._entry("model", "msg.levels", "msg.levels", model["msg.levels"]) if "msg.levels" in model else None
        level_values = (
            _candidate_range(levels_entry.distribution)
            if levels_entry is not None and levels_entry.searched
            else [levels_entry.fixed if levels_entry is not None else _CONFIG_DEFAULTS.msg.levels]
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in level_values):
            raise self.error(("model", "msg.levels"), f"must be an integer, got {level_values!r}")
        max_levels = min(max(level_values), _MAX_LEVELS)
        min_levels = min(level_values)

        entries: list[_Entry] = list(toggles.values())
        if levels_entry is not None:
            entries.append(levels_entry)
        for key, value in model.items():
            if key == "msg.levels" or (key.endswith(".enabled") and key.split(".")[0] in MODULE_TOGGLES):
                continue
            keys = ("model", key)
            section = key.split(".")[0] if "." in key else ""
            condition: _Condition | None = None
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
                    condition = _Condition(f"{section}.enabled")
            if key in _LEVEL_GATED:
                if max_levels == 0:
                    raise self.error(keys, "is set but msg.levels is 0, so there is no level for it to act on")
                if min_levels == 0:
                    condition = _Condition("msg.levels", at_least=1)
            if key == "msg.depths":
                entries.extend(self._depth_entries(value, levels_entry, max_levels, min_levels))
                continue
            entries.append(self._entry("model", key, key, value, condition))
        return entries

    def _depth_entries(
        self, value: Any, levels_entry: _Entry | None, max_levels: int, min_levels: int
    ) -> list[_Entry]:
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
            return [_Entry("msg.depths", "msg.depths", "model", fixed=list(value))]
        if max_levels == 0:
            raise self.error(keys, "is set but msg.levels is 0, so there are no levels to give depths to")
        entries = []
        for level in range(1, max_levels + 1):
            condition = _Condition("msg.levels", at_least=level) if level > min_levels else None
            entries.append(self._entry("model", "msg.depths", f"msg.depth{level}", value, condition, hint=int))
        return entries

    def _entry(
        self,
        section: str,
        key: str,
        name: str,
        value: Any,
        condition: _Condition | None = None,
        hint: Any = None,
    ) -> _Entry:
        """Parse one value: a plain scalar is fixed, a mapping is a distribution."""
        keys = (section, key)
        if hint is None:
            hint = _CONFIG_FIELDS.get(key, _SPACE_ONLY_FIELDS.get(key, float))
        kind = _kind(hint)
        if isinstance(value, dict):
            return _Entry(name, key, section, distribution=self._distribution(keys, kind, value), condition=condition)
        if isinstance(value, list):
            if kind == "int-tuple":
                return _Entry(name, key, section, fixed=list(value), condition=condition)
            raise self.error(
                keys, f"a list is not a value here; to search over these values write {{choices: {value}}}"
            )
        if kind == "float" and isinstance(value, str) and _FLOAT_TEXT.match(value):
            value = float(value)  # PyYAML reads 1e-4 (no dot) as text
        return _Entry(name, key, section, fixed=value, condition=condition)

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
                choices = [float(c) if isinstance(c, str) and _FLOAT_TEXT.match(c) else c for c in choices]
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
            if isinstance(number, str) and not is_int and _FLOAT_TEXT.match(number):
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

    # -- training section -----------------------------------------------------------------------
    def _training(self, training: dict[str, Any]) -> tuple[Fidelity, list[_Entry]]:
        valid = _TRAINING_REQUIRED + _TRAINING_OPTIONAL
        for key in training:
            if key not in valid:
                raise self.error(("training", str(key)), f"unknown training key; valid keys: {', '.join(valid)}")
        for key in _TRAINING_REQUIRED:
            if key not in training:
                raise self.error(("training",), f"missing '{key}'")
        if ("max_steps" in training) == ("rungs" in training):
            raise self.error(
                ("training",), "give exactly one of max_steps (the full fidelity) or rungs (how many rungs)"
            )

        def integer(key: str, minimum: int) -> int:
            value = training[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(("training", key), f"must be an integer, got {value!r}")
            if value < minimum:
                raise self.error(("training", key), f"must be >= {minimum}, got {value}")
            return value

        patch_size = integer("patch_size", 4)
        batch_size = integer("batch_size", 1)
        min_steps = integer("min_steps", 1)
        eta = integer("eta", 2)
        if "max_steps" in training:
            max_steps = integer("max_steps", 1)
            if max_steps < min_steps:
                raise self.error(("training", "max_steps"), f"must be >= min_steps ({min_steps}), got {max_steps}")
        else:
            max_steps = min_steps * eta ** (integer("rungs", 1) - 1)
        loss = training.get("loss", "l1")
        if loss not in LOSSES:
            raise self.error(("training", "loss"), f"must be one of {', '.join(LOSSES)}, got {loss!r}")
        estimate = training["seconds_per_trial_estimate"]
        if isinstance(estimate, bool) or not isinstance(estimate, (int, float)) or not estimate > 0:
            raise self.error(("training", "seconds_per_trial_estimate"), f"must be a number > 0, got {estimate!r}")

        entries = []
        for key, minimum, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False)):
            if key not in training:
                continue
            entry = self._entry("training", key, key, training[key], hint=float)
            bounds = _candidate_values(entry.distribution) if entry.searched else [entry.fixed]
            for value in bounds:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise self.error(("training", key), f"must be a number, got {value!r}")
                if value < minimum or (strict and value == minimum):
                    raise self.error(("training", key), f"must be {'>' if strict else '>='} {minimum}, got {value}")
            if not entry.searched:
                entry = dataclasses.replace(entry, fixed=float(entry.fixed))
            entries.append(entry)

        fidelity = Fidelity(
            patch_size=patch_size,
            batch_size=batch_size,
            min_steps=min_steps,
            eta=eta,
            max_steps=max_steps,
            rung_steps=rung_steps(min_steps, eta, max_steps),
            loss=loss,
            seconds_per_trial_estimate=float(estimate),
        )
        return fidelity, entries

    # -- values against the configuration -------------------------------------------------------
    def _check_against_config(self, space: SearchSpace) -> None:
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
        base = space._resolve(lambda e: base_params.get(e.name, _middle(e.distribution)))
        searched = [e for e in space._entries if e.searched and e.section == "model"]
        for entry in space._entries:
            if entry.section != "model":
                continue
            candidates = _candidate_values(entry.distribution) if entry.searched else [entry.fixed]
            for value in candidates:
                error = _probe(base, entry, value)
                if error is None or not (error.startswith(f"{entry.key} ") or error.startswith(f"{entry.key}[")):
                    continue
                feasible = any(
                    _probe({**base, other.name: alt}, entry, value) is None
                    for other in searched
                    if other.name != entry.name
                    for alt in _candidate_values(other.distribution)
                )
                if not feasible:
                    if not entry.searched:
                        what = "value"
                    elif isinstance(entry.distribution, CategoricalDistribution):
                        what = "choice"
                    else:
                        what = "range end"
                    raise self.error(("model", entry.key), f"{what} {value!r} is rejected: {error}")
        for ref_name, params in references.items():
            sampled = space.config_from_params(params)
            if sampled.config is None:
                raise self.error(
                    (), f"the '{ref_name}' reference configuration (middle values) is invalid: {sampled.refused}"
                )


def _candidate_range(dist: BaseDistribution | None) -> list[Any]:
    """All values of a small int distribution (msg.levels), or the choices of a categorical."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    return [getattr(dist, "low", None), getattr(dist, "high", None)]


def _probe(base: dict[str, Any], entry: _Entry, value: Any) -> str | None:
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
        EHRSRConfig.from_dict(_config_dict(values, scale=_CONFIG_DEFAULTS.scale))
    except (ValueError, _Refused) as exc:
        return str(exc)
    return None

