"""A validated search space and what sampling it gives: Optuna parameters (conditional ones only
when active) -> an ``EHRSRConfig`` and the ``TrainSettings`` it trains with (``docs/search_spaces.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ehrsr.config import MODULE_TOGGLES, EHRSRConfig
from ehrsr.search.space.agreement import ProxyAgreement
from ehrsr.search.space.config_fields import Refused, config_dict
from ehrsr.search.space.distributions import Entry, in_distribution, middle_value
from ehrsr.search.space.fidelity import Fidelity
from ehrsr.training import TrainSettings

__all__ = ["SampledConfig", "SearchSpace"]


@dataclass(frozen=True)
class SampledConfig:
    """One configuration drawn from a space.

    ``params`` are the searched values by parameter name (what Optuna stores as
    ``trial.params``); ``values`` holds every active value, fixed ones included; ``train`` what
    the trial trains with (the space's fidelity, full length, with the sampled ``lr`` and
    ``weight_decay``), ready for ``run_configuration``. ``config`` is None when the values cannot
    make a network; ``refused`` then says why (before any training is spent on it).
    """

    config: EHRSRConfig | None
    params: dict[str, Any]
    values: dict[str, Any]
    train: TrainSettings
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


class SearchSpace:
    """A validated search space. Build it with ``load_space`` (or ``space_from_text``)."""

    def __init__(
        self,
        name: str,
        path: Path | None,
        source_text: str,
        description: str,
        entries: list[Entry],
        fidelity: Fidelity,
        proxy: ProxyAgreement | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.source_text = source_text
        self.description = description
        self.fidelity = fidelity
        self.proxy = proxy  # the trial protocol's measured rank agreement with long training, if any
        # parents (module toggles, msg.levels) first, so conditions can be evaluated in one pass
        self._entries = [e for e in entries if e.condition is None] + [e for e in entries if e.condition]

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r}, {len(self.distributions)} searched parameters)"

    # -- introspection --------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[Entry, ...]:
        """Every parameter, parents of conditions first."""
        return tuple(self._entries)

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

        def draw(entry: Entry) -> Any:
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

        def lookup(entry: Entry) -> Any:
            if entry.name not in params:
                cond = f" (active because {entry.condition.describe()})" if entry.condition else ""
                raise ValueError(f"params lack {entry.name!r}{cond} for search space '{self.name}'")
            value = params[entry.name]
            if not in_distribution(value, entry.distribution):
                raise ValueError(
                    f"params[{entry.name!r}] = {value!r} is outside its distribution {entry.distribution}"
                )
            return value

        return self._sample(lookup, scale)

    def reference_params(self) -> dict[str, dict[str, Any]]:
        """Anchor configurations to enqueue before sampling starts, as flat Optuna params.

        ``"conv-only"``: every module off (omitted when the space fixes a module on);
        ``"all-modules"``: every module the space can switch on is on (omitted when none can).
        Every other parameter takes its middle value (``middle_value``), identical in both, so the two
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
    def _entry(self, name: str) -> Entry | None:
        return next((e for e in self._entries if e.name == name), None)

    def _reference(self, on: bool) -> dict[str, Any]:
        toggle_names = {f"{m}.enabled" for m in MODULE_TOGGLES}

        def pick(entry: Entry) -> Any:
            if entry.name in toggle_names:
                return on
            return middle_value(entry.distribution)

        values = self.resolve(pick)
        return {name: value for name, value in values.items() if name in self.distributions}

    def resolve(self, draw: Callable[[Entry], Any]) -> dict[str, Any]:
        """Every active parameter's value: fixed ones as given, searched ones from ``draw``."""
        values: dict[str, Any] = {}
        for entry in self._entries:
            if entry.condition is not None and not entry.condition.holds(values):
                continue
            values[entry.name] = draw(entry) if entry.searched else entry.fixed
        return values

    def _sample(self, draw: Callable[[Entry], Any], scale: int) -> SampledConfig:
        values = self.resolve(draw)
        params = {k: v for k, v in values.items() if k in self.distributions}
        train = self.fidelity.train_settings(values)
        try:
            config = EHRSRConfig.from_dict(config_dict(values, scale))
        except (ValueError, Refused) as exc:
            return SampledConfig(None, params, values, train, refused=str(exc))
        return SampledConfig(config, params, values, train)
