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
A unit's parameter count is kept with its MACs; the units hold every parameter of the deploy form
once, so a network whose units are all known is counted without making its deploy copy.

The sum equals ``count_macs``'s fvcore figures exactly because everything between units is
element-wise (priced at zero by the convention) and each unit's work depends on its input's shape
only. MoE-TX's sparse dispatch counts the tokens each expert actually receives; without a capacity
limit every token reaches exactly ``top_k`` experts, so the total is still fixed by the shape, but
with one (``capacity_factor > 0``) dropped tokens depend on the values reaching the block, and such
a configuration is counted whole (``count_macs``); so is anything that is not an EHR-SR network or
has a batch other than 1. ``tests/test_unit_counts.py`` checks equality on configurations of both
shipped spaces, MoE-TX included. The ptflops cross-check is not run here
(``macs_ptflops`` is None): ``count_macs`` and ``benchmarks/profile_reference.py`` run it.

The unit counts are also kept on disk (``UnitCountStore``), one small JSON file per unit under
``<cache>/unit_macs/<fingerprint>/`` (``<cache>``: ``$EHRSR_CACHE`` or ``~/.cache/ehrsr``), so
every process of the machine shares them: the workers of ``--workers N`` and the child process
of every isolated (CUDA) trial, which starts with an empty memory. A file is written to a
temporary name and renamed into place, so a reader sees a whole entry or none, and two processes
counting the same unit at once write the same content. The fingerprint hashes the source of
everything a count depends on (the blocks, the model, re-parameterisation, the counting rules,
the unit cutting) with the torch and fvcore versions: a code change that could alter a count
starts an empty folder instead of reading stale entries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ehrsr.files import write_text_atomically
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
from ehrsr.profiling.latency_model import Unit, unit_module, units_of
from ehrsr.resources import default_cache_dir

__all__ = ["UnitCountStore", "UnitMacCounter", "count_fingerprint", "default_store_dir"]

log = logging.getLogger(__name__)

# Bump when the stored entry changes its layout (the fingerprint covers code changes).
STORE_FORMAT = 2
# Package files whose code decides a unit's count (globs relative to the ``ehrsr`` package).
COUNT_SOURCES = (
    "blocks/*.py",
    "model.py",
    "reparam.py",
    "config.py",
    "profiling/counting.py",
    "profiling/rules.py",
    "profiling/latency_model.py",
    "profiling/unit_counts.py",
)


@dataclass(frozen=True)
class _UnitCount:
    macs: int
    constant: int
    by_operator: dict[str, int]
    unsupported: dict[str, int]
    params: int  # parameters of the unit in the deploy form


def count_fingerprint(package_dir: Path | None = None) -> str:
    """SHA-256 (hex) of the sources in ``COUNT_SOURCES`` (names and contents), the torch and fvcore
    versions and ``STORE_FORMAT``: equal fingerprints count every unit alike."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"format {STORE_FORMAT}\0torch {torch.__version__}\0".encode())
    try:
        digest.update(f"fvcore {metadata.version('fvcore')}\0".encode())
    except metadata.PackageNotFoundError:
        digest.update(b"fvcore ?\0")
    for pattern in COUNT_SOURCES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _installed_fingerprint() -> str:
    return count_fingerprint()


def default_store_dir() -> Path:
    """``<cache>/unit_macs``: the folder of the on-disk unit counts (``default_cache_dir``)."""
    return default_cache_dir() / "unit_macs"


class UnitCountStore:
    """Unit counts on disk, one JSON file per (unit key, input shapes), shared by every process
    that uses the same folder and fingerprint (see the module docstring).

    ``root``: the folder holding one sub-folder per fingerprint; ``fingerprint``: None for this
    installation's (``count_fingerprint``). Reads and writes never raise for a missing, corrupt or
    unwritable file: a miss is counted again, a failed write only logged (once).
    """

    def __init__(self, root: Path, fingerprint: str | None = None) -> None:
        self.fingerprint = fingerprint or _installed_fingerprint()
        self.folder = Path(root) / self.fingerprint[:24]
        self._write_failed = False

    def _path(self, unit: Unit) -> Path:
        name = hashlib.sha256(json.dumps([unit.key, unit.input_shapes]).encode()).hexdigest()[:32]
        return self.folder / f"{name}.json"

    def load(self, unit: Unit) -> _UnitCount | None:
        try:
            data = json.loads(self._path(unit).read_text())
            if data["key"] != unit.key or [tuple(s) for s in data["input_shapes"]] != list(unit.input_shapes):
                return None  # a hash collision or a foreign file: count it
            return _UnitCount(int(data["macs"]), int(data["constant"]),
                              {str(k): int(v) for k, v in data["by_operator"].items()},
                              {str(k): int(v) for k, v in data["unsupported"].items()}, int(data["params"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, unit: Unit, counted: _UnitCount) -> None:
        try:  # atomic: readers see the old file, the new one, or none
            write_text_atomically(self._path(unit), json.dumps(
                {"key": unit.key, "input_shapes": unit.input_shapes, **asdict(counted)}))
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.warning("unit MAC counts are not kept on disk (%s): %s", self.folder, exc)


class UnitMacCounter:
    """``count`` = ``count_macs`` (fvcore figures) for EHR-SR networks, summed from cached unit counts.

    One counter per search process; thread-safe. ``store``: the on-disk counts shared with other
    processes (None: this process's memory only). ``counted_units`` (traced here),
    ``loaded_units`` (read from the store) and ``reused_units`` (from memory) say how much the
    caches saved.
    """

    def __init__(self, store: UnitCountStore | None = None) -> None:
        self._cache: dict[str, _UnitCount] = {}
        self._lock = threading.Lock()
        self.store = store
        self.counted_units = 0
        self.loaded_units = 0
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
        units = units_of(model.config, shape[-2:])
        known = [self._known(unit) for unit in units]
        if all(counted is not None for counted in known):
            counts = [counted for counted in known if counted is not None]
        else:  # the deploy copy is made only to count the units not seen before
            deploy, description = deploy_form(model)
            assert description == DEPLOY_EHRSR
            with eval_mode(deploy):
                # a key repeated in this network is counted at its first occurrence only
                counts = [counted or self._known(unit) or self._count(deploy, unit)
                          for counted, unit in zip(known, units)]
        by_operator: Counter[str] = Counter()
        unsupported: Counter[str] = Counter()
        for counted in counts:
            by_operator.update(counted.by_operator)
            unsupported.update(counted.unsupported)
        return MacCount(
            macs=sum(c.macs for c in counts),
            macs_ptflops=None,
            params=count_parameters(model),
            # the units hold every parameter of the deploy form, each once (tested)
            params_deploy=sum(c.params for c in counts),
            unsupported_ops=dict(sorted(unsupported.items())),
            by_operator=dict(sorted((k, v) for k, v in by_operator.items() if v)),
            by_operator_ptflops={},
            macs_constant=sum(c.constant for c in counts),
            input_shape=shape,
            deploy_form=DEPLOY_EHRSR,
        )

    def _known(self, unit: Unit) -> _UnitCount | None:
        """The unit's count from this process's memory or the store; None if never counted."""
        with self._lock:
            cached = self._cache.get(unit.key)
            if cached is not None:
                self.reused_units += 1
                return cached
        stored = self.store.load(unit) if self.store is not None else None
        if stored is not None:
            with self._lock:
                self._cache[unit.key] = stored
                self.loaded_units += 1
        return stored

    def _count(self, deploy: nn.Module, unit: Unit) -> _UnitCount:
        generator = torch.Generator().manual_seed(0)
        inputs = tuple(torch.rand(s, generator=generator) for s in unit.input_shapes)
        module = unit_module(deploy, unit)
        tally = count_fvcore(module, inputs)
        counted = _UnitCount(tally.total, tally.constant, dict(tally.by_family), dict(tally.unsupported),
                             count_parameters(module))
        if self.store is not None:
            self.store.save(unit, counted)
        with self._lock:
            self._cache[unit.key] = counted
            self.counted_units += 1
        return counted
