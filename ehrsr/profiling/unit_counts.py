"""MACs of an EHR-SR configuration as the sum of its units' fvcore counts, each unit counted once.

A search counts every trial's network at the NTIRE input (1x3x256x256) to refuse over-limit
configurations and to store MACs for the Pareto fronts. Counting the whole network traces it with
``torch.jit`` at that size: 0.15-2.8 s per tiny configuration on this 2-core CPU, more than the rest
of a trial's profiling once latencies are predicted (``docs/latency_models.md``). But a network is
a sequence of module instances whose cost depends only on their *unit key* (type, channels,
resolution, hyperparameters: ``latency_model.units_of``), and keys repeat across configurations.
``UnitMacCounter`` counts each key once, on that unit cut out of the deploy form (the same
modules, the same rules, the same data-path split into ``macs`` and ``macs_constant``) and adds
the counts: after a few dozen trials almost every key is known and a count costs milliseconds.

The sum equals ``count_macs``'s fvcore figures exactly because everything between units is
element-wise (priced at zero by the convention) and each unit's work depends on its input's shape
only. MoE-TX's sparse dispatch counts the tokens each expert actually receives; without a capacity
limit every token reaches exactly ``top_k`` experts, so the total is still fixed by the shape, but
with one (``capacity_factor > 0``) dropped tokens depend on the values reaching the block, and such
a configuration is counted whole (``count_macs``); so is anything that is not an EHR-SR network or
has a batch other than 1. ``tests/test_unit_counts.py`` checks equality on configurations of both
shipped spaces, MoE-TX included. The ptflops cross-check is not run here
(``macs_ptflops`` is None): ``count_macs`` and ``benchmarks/profile_reference.py`` run it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ehrsr.profiling.counting import (
    DEPLOY_EHRSR,
    MacCount,
    count_fvcore,
    count_macs,
    count_parameters,
    deploy_form,
    eval_mode,
    is_ehrsr_model,
    validate_input_shape,
)
from ehrsr.profiling.latency_model import unit_module, units_of

__all__ = ["UnitMacCounter"]


@dataclass(frozen=True)
class _UnitCount:
    macs: int
    constant: int
    by_operator: dict[str, int]
    unsupported: dict[str, int]


class UnitMacCounter:
    """``count`` = ``count_macs`` (fvcore figures) for EHR-SR networks, summed from cached unit counts.

    One counter per search process; thread-safe. ``counted_units`` and ``reused_units`` say how
    much the cache saved.
    """

    def __init__(self) -> None:
        self._cache: dict[str, _UnitCount] = {}
        self._lock = threading.Lock()
        self.counted_units = 0
        self.reused_units = 0

    @staticmethod
    def eligible(model: nn.Module, input_shape: Sequence[int]) -> bool:
        """Whether ``model`` at ``input_shape`` can be counted from its units (else ``count`` counts it whole)."""
        if not is_ehrsr_model(model) or input_shape[0] != 1:
            return False
        moe = model.config.moe
        return not (moe.enabled and moe.capacity_factor > 0)

    def count(self, model: nn.Module, input_shape: Sequence[int] = (1, 3, 256, 256)) -> MacCount:
        shape = validate_input_shape(input_shape, model)
        if not self.eligible(model, shape):
            return count_macs(model, shape)
        deploy, description = deploy_form(model)
        assert description == DEPLOY_EHRSR
        total = constant = 0
        by_operator: Counter[str] = Counter()
        unsupported: Counter[str] = Counter()
        with eval_mode(deploy):
            for unit in units_of(model.config, shape[-2:]):
                counted = self._unit(deploy, unit)
                total += counted.macs
                constant += counted.constant
                by_operator.update(counted.by_operator)
                unsupported.update(counted.unsupported)
        return MacCount(
            macs=total,
            macs_ptflops=None,
            params=count_parameters(model),
            params_deploy=count_parameters(deploy),
            unsupported_ops=dict(sorted(unsupported.items())),
            by_operator=dict(sorted((k, v) for k, v in by_operator.items() if v)),
            by_operator_ptflops={},
            macs_constant=constant,
            input_shape=shape,
            deploy_form=description,
        )

    def _unit(self, deploy: nn.Module, unit) -> _UnitCount:
        with self._lock:
            cached = self._cache.get(unit.key)
            if cached is not None:
                self.reused_units += 1
                return cached
        generator = torch.Generator().manual_seed(0)
        inputs = tuple(torch.rand(s, generator=generator) for s in unit.input_shapes)
        tally = count_fvcore(unit_module(deploy, unit), inputs)
        counted = _UnitCount(tally.total, tally.constant, dict(tally.by_family), dict(tally.unsupported))
        with self._lock:
            self._cache[unit.key] = counted
            self.counted_units += 1
        return counted
