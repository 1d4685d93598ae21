"""Per-device latency models: time a space's building blocks once on the target, predict during search.

The idea is FBNet's per-operator lookup table (Wu et al., CVPR 2019) made exact for one search
space: every network EHR-SR can build is a sequence of module instances (stem, down-samplers,
conv blocks, the trunk's mixers, up-samplers, skip fusions, head), and each instance's cost
depends only on its type, its channels, the resolution it runs at and its own hyperparameters.
``units_of(config, input_hw)`` lists those instances as *unit keys* for one configuration without
building anything; ``calibrate`` enumerates every key a space can produce (by sampling it until no
new key turns up), times each key once on the target device, in the deploy form and through the
profile's runtime, and writes a JSON file. ``LatencyModel.predict`` then adds the stored unit
costs of a configuration and applies a linear correction ``a * sum + b`` fitted on a few whole
networks timed at calibration (the per-network overhead and the cache effects a sum of isolated
units misses; nn-Meter, Zhang et al. MobiSys 2021, corrects kernel sums the same way in spirit).
Whole networks held out from the fit are timed too, and the model's measured accuracy on them
(median and 90th-percentile absolute % error, Spearman rank correlation) is stored in the file.

See ``docs/latency_models.md`` for the file format, the runtimes, the fallback and the canary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks import pad_to_multiple, scan_kernel
from ehrsr.config import EHRSRConfig
from ehrsr.files import write_text_atomically
from ehrsr.profiling.canary import Canary
from ehrsr.profiling.latency import cpu_name, measure_latency
from ehrsr.profiling.onnx_graph import export_scoped, profile_units
from ehrsr.profiling.onnx_runtime import check_timing_settings, runtime_versions, time_model


class SearchSpace(Protocol):
    """What this module needs of ``ehrsr.search.space.SearchSpace`` (profiling sits below search,
    so it takes a loaded space instead of importing the search package)."""

    name: str
    source_text: str

    def suggest(self, trial: Any, *, scale: int) -> Any: ...

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Accuracy",
    "LatencyModel",
    "LatencyModelError",
    "LatencyRecord",
    "LatencyTarget",
    "Prediction",
    "Unit",
    "calibrate",
    "enumerate_units",
    "latency_for_profile",
    "measure_module",
    "measure_module_for_profile",
    "measure_network",
    "plan_graph_networks",
    "sample_configs",
    "space_fingerprint",
    "units_of",
]

FORMAT = "ehrsr-latency-model"
FORMAT_VERSION = 3
# why a file of an older version cannot be used (LatencyModel.from_dict says it in its refusal)
_OLD_FORMATS = {
    1: "its SSM units were timed without the compiled CPU scan, several times too slow",
    2: "its SSM units were timed before the SSMB's cross-scan was compiled whole (about 4x slower), and its "
       "onnxruntime units were timed exported one by one, missing onnxruntime's fusions across units",
}
UNIT_TIMINGS = ("isolated", "graph")
"""How calibration times units: ``isolated`` (each unit cut out of a network and timed alone) or
``graph`` (whole networks through onnxruntime's profiler, node times charged to units:
``ehrsr.profiling.onnx_graph``; onnxruntime only, and its default)."""
# Seconds of timed passes per unit (at least 5 passes each) and per whole network. Measured on this
# 2-core machine, re-timing 12 networks unit by unit: with 0.05 s per unit the sum of the units
# disagreed with the network's own time by up to 24 %, with 0.3 s by up to 17 % (a network timed
# three times itself spreads 5-25 %).
UNIT_BUDGET_S = 0.15
NETWORK_BUDGET_S = 0.5
# graph timing: profile networks until every unit key occurs this many times in them (where the
# space allows): one occurrence per key leaves its cost to one neighbourhood's fusions and one
# measurement's noise. Tiny space at 128x128: 78 networks for 1, 91 for 2, 163 for 3.
GRAPH_OBSERVATIONS = 2
GRAPH_POOL = 2000  # configurations drawn to choose the profiled networks from
CANARY_EVERY = 25  # units between two canary readings during calibration
SAVE_EVERY = 10  # units between two incremental writes of the file


class LatencyModelError(ValueError):
    """A latency model file that cannot be used: unreadable, corrupt, or made for something else."""


# ---------------------------------------------------------------------------------------------
# the target a model is made for


@dataclass(frozen=True)
class LatencyTarget:
    """What a latency model predicts for: a device profile's runtime settings and input size."""

    profile: str  # device profile name (informative: the settings below decide compatibility)
    kind: str  # "cpu" or "cuda"
    runtime: str  # "torch" or "onnxruntime"
    threads: int | None  # CPU threads (None: the runtime's default)
    dtype: str  # float32 / float16 / bfloat16
    input_hw: tuple[int, int]  # LR input (H, W)
    scale: int = 4

    @classmethod
    def from_profile(
        cls,
        profile: Any,
        *,
        scale: int = 4,
        runtime: str | None = None,
        threads: int | None = None,
        dtype: str | None = None,
        input_hw: Sequence[int] | None = None,
    ) -> LatencyTarget:
        """From a deploy ``DeviceProfile`` (or a ``LatencyTarget``); keyword arguments override.

        The profile's ``runtime`` field is read when it has one (default ``"torch"``).
        """
        if isinstance(profile, LatencyTarget):
            base = profile
        else:
            base = cls(
                profile=str(profile.name),
                kind=str(profile.kind),
                runtime=str(getattr(profile, "runtime", None) or "torch"),
                threads=profile.threads,
                dtype=str(profile.dtype),
                input_hw=tuple(profile.lr_input_size(scale)),
                scale=scale,
            )
        target = cls(
            profile=base.profile,
            kind=base.kind,
            runtime=runtime or base.runtime,
            threads=threads if threads is not None else base.threads,
            dtype=dtype or base.dtype,
            input_hw=tuple(int(v) for v in (input_hw if input_hw is not None else base.input_hw)),  # type: ignore[arg-type]
            scale=scale if not isinstance(profile, LatencyTarget) else base.scale,
        )
        target.validate()
        return target

    def validate(self, clock: str = "wall") -> None:
        """Refuse a target (and a ``clock`` to time it with) that cannot be timed, in one line."""
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"kind must be 'cpu' or 'cuda', got {self.kind!r}")
        check_timing_settings(self.runtime, clock=clock, threads=self.threads, kind=self.kind, dtype=self.dtype)
        if len(self.input_hw) != 2 or min(self.input_hw) < 1:
            raise ValueError(f"input size must be [height, width] in pixels, got {list(self.input_hw)}")

    def mismatch(self, other: LatencyTarget) -> str | None:
        """Why a model made for ``self`` cannot predict for ``other`` (None: it can)."""
        for name in ("kind", "runtime", "threads", "dtype", "input_hw", "scale"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"it was calibrated for {name} {_show(mine)}, not {_show(theirs)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_hw"] = list(self.input_hw)
        return data


def _show(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else repr(value)


# ---------------------------------------------------------------------------------------------
# units: what a configuration is made of


@dataclass(frozen=True)
class Unit:
    """One module instance of a network: its cost key, where it sits, and the shapes it receives."""

    key: str  # e.g. "wab(C=32,H=16,W=16,window=4,heads=2,shift=0,ffn=2.0)"
    path: str  # "stem", "down.0", "encoders.1.0", "trunk.1.wab", "up.0", "fusions.0", "head", ...
    input_shapes: tuple[tuple[int, ...], ...]


def _key(kind: str, **attrs: Any) -> str:
    return f"{kind}({','.join(f'{k}={v}' for k, v in attrs.items())})"


def units_of(config: EHRSRConfig, input_hw: Sequence[int]) -> list[Unit]:
    """The units of ``config``'s deploy form at an LR input of ``input_hw``, in forward order.

    Mirrors ``EHRSR.forward`` (``ehrsr.model``): the key holds everything that decides a unit's
    cost (type, channels, resolution after padding, hyperparameters that change the computation);
    ``fsb.cutoff`` is left out because it only changes the values of a mask, not the work.
    A key that repeats in one network is listed once per occurrence.
    """
    cfg = config
    height, width = int(input_hw[0]), int(input_hw[1])
    levels = cfg.msg.levels
    multiple = 2**levels
    padded_h = -(-height // multiple) * multiple
    padded_w = -(-width // multiple) * multiple
    widths = [cfg.width * 2**i for i in range(levels + 1)]
    sizes = [(padded_h // 2**i, padded_w // 2**i) for i in range(levels + 1)]
    trunk_level = cfg.resolved_trunk_level
    units: list[Unit] = []

    def add(key: str, path: str, *shapes: tuple[int, ...]) -> None:
        units.append(Unit(key, path, tuple(shapes)))

    def feature(level: int) -> tuple[int, ...]:
        return (1, widths[level], *sizes[level])

    def at(level: int) -> dict[str, int]:
        return {"C": widths[level], "H": sizes[level][0], "W": sizes[level][1]}

    def conv_block(level: int, path: str) -> None:
        add(_key(cfg.block_type, **at(level), ffn=cfg.ffn_expansion), path, feature(level))

    def noise(level: int, path: str) -> None:
        if cfg.noise.enabled:
            add(_key("noise", **at(level), mode=cfg.noise.eval_mode), path, feature(level))

    def trunk() -> None:
        level = trunk_level
        for index in range(cfg.trunk_blocks):
            base = f"trunk.{index}"
            conv_block(level, f"{base}.conv")
            if cfg.wab.enabled:
                wab = cfg.wab
                add(
                    _key("wab", **at(level), window=wab.window_size, heads=wab.heads,
                         shift=int(wab.shift and index % 2 == 1), ffn=wab.ffn_expansion),
                    f"{base}.wab", feature(level),
                )
            if cfg.ssm.enabled:
                ssm = cfg.ssm
                add(
                    _key("ssm", **at(level), d_state=ssm.d_state, expand=ssm.expand, dt_rank=ssm.dt_rank,
                         directions=ssm.directions, conv=ssm.conv_kernel),
                    f"{base}.ssm", feature(level),
                )
            if cfg.fsb.enabled:
                add(_key("fsb", **at(level), bins=cfg.fsb.n_bins), f"{base}.fsb", feature(level))
            if cfg.moe.enabled:
                moe = cfg.moe
                add(
                    _key("moe", **at(level), experts=moe.n_experts, top_k=moe.top_k, expansion=moe.expansion,
                         capacity=moe.capacity_factor),
                    f"{base}.moe", feature(level),
                )
            if cfg.repmix.enabled:
                rep = cfg.repmix
                add(_key("repmix", **at(level), kernel=rep.kernel_size, partial=rep.partial_ratio),
                    f"{base}.repmix", feature(level))
        noise(level, "trunk_noise")

    add(_key("stem", C=cfg.width, H=height, W=width, multiple=multiple, cin=cfg.in_channels),
        "stem", (1, cfg.in_channels, height, width))
    noise(0, "stem_noise")
    for level in range(levels):
        add(_key("down", **at(level), mode=cfg.msg.downsample), f"down.{level}", feature(level))
        for j in range(cfg.msg.depths[level]):
            conv_block(level + 1, f"encoders.{level}.{j}")
        noise(level + 1, f"encoder_noise.{level}")
    if trunk_level == levels:
        trunk()
    for level in reversed(range(levels)):
        add(_key("up", **at(level + 1)), f"up.{level}", feature(level + 1))
        add(_key("fusion", **at(level), mode=cfg.msg.skip_fusion, gate=int(cfg.msg.attention_gate)),
            f"fusions.{level}", feature(level), feature(level))
        if level >= 1:
            for j in range(cfg.msg.depths[level - 1]):
                conv_block(level, f"decoders.{level}.{j}")
        noise(level, f"decoder_noise.{level}")
        if level == trunk_level:
            trunk()
    add(_key("head", C=cfg.width, H=sizes[0][0], W=sizes[0][1], out_h=height, out_w=width,
             scale=cfg.scale, cout=cfg.out_channels),
        "head", feature(0), (1, cfg.in_channels, height, width))
    return units


class _StemUnit(nn.Module):
    """Padding to the size multiple, then the stem (as in ``EHRSR.forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stem = model.stem
        self.multiple = model.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in, _, _ = pad_to_multiple(x, self.multiple)
        return self.stem(x_in)


class _HeadUnit(nn.Module):
    """Head, crop, bicubic base of the input and the global residual (as in ``EHRSR.forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head
        self.scale = model.scale

    def forward(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        residual = self.head(feat)[:, :, : height * self.scale, : width * self.scale]
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False) if self.scale > 1 else x
        return base + residual


def unit_module(deploy: nn.Module, unit: Unit) -> nn.Module:
    """The module to time for ``unit`` inside ``deploy`` (an EHR-SR deploy form containing it)."""
    if unit.path == "stem":
        return _StemUnit(deploy)
    if unit.path == "head":
        return _HeadUnit(deploy)
    return deploy.get_submodule(unit.path)


# ---------------------------------------------------------------------------------------------
# sampling a space without Optuna trials


class _RandomTrial:
    """The three ``suggest_*`` calls ``SearchSpace.suggest`` makes, drawn uniformly (as Optuna's
    RandomSampler does) from a seeded ``random.Random``; no study, so thousands cost milliseconds."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.rng.choice(list(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        if log:
            return int(min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high)))))))
        return low + step * self.rng.randint(0, (high - low) // step)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        if step is not None:
            return low + step * self.rng.randint(0, round((high - low) / step))
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)


def sample_configs(space: SearchSpace, n: int, *, seed: int = 0, scale: int = 4) -> Iterator[EHRSRConfig]:
    """``n`` configurations drawn at random from ``space`` (refused draws are skipped, not counted)."""
    rng = random.Random(seed)
    produced = attempts = 0
    while produced < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"search space '{space.name}' refused {attempts} random draws; it cannot build networks")
        sampled = space.suggest(_RandomTrial(rng), scale=scale)
        if sampled.config is not None:
            produced += 1
            yield sampled.config


def enumerate_units(
    space: SearchSpace,
    input_hw: Sequence[int],
    *,
    scale: int = 4,
    seed: int = 0,
    patience: int = 3000,
    max_samples: int = 100_000,
) -> dict[str, tuple[EHRSRConfig, Unit]]:
    """Every unit key ``space`` can produce at ``input_hw``, with a configuration that contains it.

    Samples the space until ``patience`` consecutive configurations bring no new key (or
    ``max_samples`` were drawn). Keys are few (hundreds) because each depends on a handful of
    parameters, so this saturates quickly; ``tests/test_latency_model.py`` checks coverage.
    """
    found: dict[str, tuple[EHRSRConfig, Unit]] = {}
    since_new = 0
    for n, config in enumerate(sample_configs(space, max_samples, seed=seed, scale=scale), start=1):
        new = False
        for unit in units_of(config, input_hw):
            if unit.key not in found:
                found[unit.key] = (config, unit)
                new = True
        since_new = 0 if new else since_new + 1
        if since_new >= patience or n >= max_samples:
            break
    return found


def space_fingerprint(space: SearchSpace) -> dict[str, str]:
    """The space's name and the SHA-256 of its YAML text (a model is valid for that text only)."""
    return {"name": space.name, "sha256": hashlib.sha256(space.source_text.encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Prediction:
    """Predicted latency of one configuration; ``latency_ms`` is None unless every unit is covered."""

    latency_ms: float | None
    covered: bool
    missing_units: tuple[str, ...]
    units_sum_ms: float  # sum of the covered units' stored costs, before the correction


@dataclass(frozen=True)
class Accuracy:
    """How well the model predicted whole networks it was not fitted on (measured at calibration)."""

    n: int
    median_abs_pct_error: float
    p90_abs_pct_error: float
    spearman: float


@dataclass
class LatencyModel:
    """Stored unit costs plus a linear correction; ``predict`` composes them for one configuration."""

    target: LatencyTarget
    space: dict[str, str]  # space_fingerprint
    units: dict[str, dict[str, float]]  # key -> {"latency_ms", "p10_ms", "p90_ms", "repeats", ...}
    correction_scale: float = 1.0
    correction_offset_ms: float = 0.0
    accuracy: Accuracy | None = None
    device: dict[str, Any] = field(default_factory=dict)  # hardware, runtime versions, host
    extra: dict[str, Any] = field(default_factory=dict)  # fit / hold-out networks, canary, timing
    complete: bool = True

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, config: EHRSRConfig, input_hw: Sequence[int] | None = None) -> Prediction:
        """Latency of ``config``'s deploy form at ``input_hw`` (default: the target's input size).

        A unit without an entry makes the prediction uncovered (``latency_ms`` None) and is named
        in ``missing_units``: the caller then measures (see ``docs/latency_models.md``).
        """
        hw = tuple(input_hw) if input_hw is not None else self.target.input_hw
        total = 0.0
        missing: list[str] = []
        for unit in units_of(config, hw):
            entry = self.units.get(unit.key)
            if entry is None:
                if unit.key not in missing:
                    missing.append(unit.key)
            else:
                total += entry["latency_ms"]
        if missing:
            return Prediction(None, False, tuple(missing), total)
        latency = self.correction_scale * total + self.correction_offset_ms
        return Prediction(max(latency, 0.0), True, (), total)

    # -- file ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": self.complete,
            "space": self.space,
            "target": self.target.to_dict(),
            "device": self.device,
            "correction": {"scale": self.correction_scale, "offset_ms": self.correction_offset_ms},
            "accuracy": asdict(self.accuracy) if self.accuracy is not None else None,
            "units": self.units,
            **self.extra,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (``ehrsr.files.write_text_atomically``): a crash never leaves half a file."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1, sort_keys=False))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<data>") -> LatencyModel:
        """Parse file data; anything malformed raises ``LatencyModelError`` naming ``source``."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyModelError(f"{source} is not an ehrsr latency model (no 'format: {FORMAT}')")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            why = f" ({_OLD_FORMATS[version]})" if version in _OLD_FORMATS else ""
            raise LatencyModelError(
                f"{source} has latency model format version {version!r}{why}; this ehrsr reads version "
                f"{FORMAT_VERSION}: calibrate again on the device ({_calibrate_command(data)})"
            )
        try:
            target_data = dict(data["target"])
            target_data["input_hw"] = tuple(target_data["input_hw"])
            target = LatencyTarget(**target_data)
            target.validate()
            units = {
                str(k): {name: float(v) for name, v in entry.items()} for k, entry in dict(data["units"]).items()
            }
            for key, entry in units.items():
                if not (math.isfinite(entry["latency_ms"]) and entry["latency_ms"] >= 0):
                    raise ValueError(f"unit {key} has latency {entry['latency_ms']}")
            correction = data["correction"]
            accuracy = Accuracy(**data["accuracy"]) if data.get("accuracy") else None
            space = {"name": str(data["space"]["name"]), "sha256": str(data["space"]["sha256"])}
            known = {"format", "format_version", "complete", "space", "target", "device", "correction", "accuracy", "units"}
            return cls(
                target=target,
                space=space,
                units=units,
                correction_scale=float(correction["scale"]),
                correction_offset_ms=float(correction["offset_ms"]),
                accuracy=accuracy,
                device=dict(data.get("device") or {}),
                extra={k: v for k, v in data.items() if k not in known},
                complete=bool(data.get("complete", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise LatencyModelError(f"{source} is a corrupt latency model: {detail}") from None

    @classmethod
    def read(cls, path: str | Path) -> LatencyModel:
        """Parse a file without the compatibility checks of ``load`` (complete or not)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise LatencyModelError(f"cannot read latency model {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LatencyModelError(f"{path} is a corrupt latency model: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        space: SearchSpace | None = None,
        device: Any = None,
        hardware: str | None = None,
    ) -> LatencyModel:
        """Read a finished latency model and refuse it (``LatencyModelError``, one line saying why)
        when it is unreadable or corrupt, of another format version, unfinished, made for another
        search space (``space``: its YAML text must hash the same), or for other settings
        (``device``: a ``DeviceProfile`` or ``LatencyTarget``; runtime, threads, dtype, input size
        and scale must match). ``hardware``: also require this CPU / GPU name (use it when checking
        on the device itself; during a search on another machine the hardware differs by design).
        """
        model = cls.read(path)
        if not model.complete:
            raise LatencyModelError(f"{path}: calibration did not finish; run calibrate again to resume it")
        if space is not None:
            expected = space_fingerprint(space)
            if expected["sha256"] != model.space["sha256"]:
                raise LatencyModelError(
                    f"{path} was calibrated for search space '{model.space['name']}' "
                    f"(sha256 {model.space['sha256'][:12]}), not '{expected['name']}' (sha256 {expected['sha256'][:12]})"
                )
        if device is not None:
            wanted = LatencyTarget.from_profile(device, scale=model.target.scale)
            reason = model.target.mismatch(wanted)
            if reason:
                raise LatencyModelError(f"{path} does not fit device profile '{wanted.profile}': {reason}")
        if hardware is not None and model.device.get("hardware") != hardware:
            raise LatencyModelError(
                f"{path} was calibrated on {model.device.get('hardware')!r}, not on {hardware!r}"
            )
        return model


def _calibrate_command(data: dict[str, Any]) -> str:
    """The command that writes a current file for what an old file ``data`` was made for."""
    target, space = data.get("target"), data.get("space")
    profile = target.get("profile") if isinstance(target, dict) else None
    space_name = space.get("name") if isinstance(space, dict) else None
    return f"python run_search.py calibrate --device-profile {profile or 'NAME'} --space {space_name or 'SPACE'}"


# ---------------------------------------------------------------------------------------------
# measuring


def _deploy(config: EHRSRConfig) -> nn.Module:
    from ehrsr.model import build_model
    from ehrsr.reparam import reparameterize

    torch.manual_seed(0)
    return reparameterize(build_model(config))


def _time(module: nn.Module, target: LatencyTarget, shapes: Sequence[tuple[int, ...]], budget_s: float,
          clock: str = "wall") -> Any:
    """The protocol's timing of one module on the target (CPU runtimes, or CUDA through torch)."""
    if target.kind == "cuda":
        if len(shapes) != 1:
            module = _Bound(module, [torch.rand(s, generator=torch.Generator().manual_seed(1)).cuda() for s in shapes[1:]])
        x = torch.rand(shapes[0], generator=torch.Generator().manual_seed(0)).cuda()
        return measure_latency(module.cuda().eval(), x, dtype=target.dtype, budget_s=budget_s)
    return time_model(module, target.runtime, list(shapes), target.threads, dtype=target.dtype, budget_s=budget_s,
                      clock=clock)


class _Bound(nn.Module):
    """A multi-input module with every input but the first fixed (CUDA timing takes one tensor)."""

    def __init__(self, module: nn.Module, rest: list[torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, *self.rest)


def measure_network(config: EHRSRConfig, target: LatencyTarget, *, budget_s: float = NETWORK_BUDGET_S,
                    clock: str = "wall") -> float:
    """Measured median latency (ms) of ``config``'s whole deploy form on ``target`` (this machine)."""
    shape = (1, config.in_channels, *target.input_hw)
    return float(_time(_deploy(config), target, [shape], budget_s, clock).latency_ms)


def measure_module(module: nn.Module, in_channels: int, target: LatencyTarget, *,
                   budget_s: float = NETWORK_BUDGET_S) -> float:
    """``measure_network`` for any network (a hand-designed baseline: no EHR-SR configuration, so
    no latency model can predict it): its median latency (ms) on ``target``, timed on this machine."""
    shape = (1, in_channels, *target.input_hw)
    return float(_time(module.eval(), target, [shape], budget_s).latency_ms)


def measure_module_for_profile(module: nn.Module, in_channels: int, target: LatencyTarget, *,
                               canary: Canary | None = None, retries: int = 2) -> LatencyRecord:
    """``latency_for_profile`` for a network that is not an EHR-SR configuration: always measured
    here (with the canary), recorded with the reason in ``missing_units``."""
    return _measured_record(lambda: measure_module(module, in_channels, target), target,
                            ("not an EHR-SR network",), canary, retries)


def _measured_record(measure: Callable[[], float], target: LatencyTarget, missing: tuple[str, ...],
                     canary: Canary | None, retries: int) -> LatencyRecord:
    """One latency measured on this machine right after a canary reading, measured again while the
    canary says the machine is busy (``measure_with_canary``), as a ``LatencyRecord``."""
    from ehrsr.profiling.canary import measure_with_canary

    canary = canary or Canary(threads=target.threads if target.kind == "cpu" else 1)
    latency_ms, reading, _ = measure_with_canary(measure, canary, retries=retries)
    return LatencyRecord(target.profile, float(latency_ms), "measured", missing, reading.ratio, reading.contended)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def accuracy_of(predicted: Sequence[float], measured: Sequence[float]) -> Accuracy:
    """Median / 90th percentile of |predicted - measured| / measured in %, and Spearman's rho."""
    errors = [100.0 * abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return Accuracy(
        n=len(errors),
        median_abs_pct_error=float(np.median(errors)),
        p90_abs_pct_error=float(np.percentile(errors, 90)),
        spearman=_spearman(predicted, measured),
    )


def _fit_correction(sums: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """``a, b`` minimising the squared *relative* error of ``a * sum + b`` (small networks count as
    much as large ones), with ``b >= 0``: a per-network overhead is never negative, and a negative
    offset fitted to noise would predict nonsense for networks smaller than the fitted ones. When
    the free fit gives ``b < 0`` (or is degenerate) the offset is 0 and ``a`` the best pure ratio."""
    s = np.asarray(sums, dtype=float)
    m = np.asarray(measured, dtype=float)
    if len(s) >= 3 and np.ptp(s) > 0:
        design = np.stack([s / m, 1.0 / m], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, np.ones_like(m), rcond=None)
        if a > 0 and b >= 0:
            return float(a), float(b)
    r = s / m
    return float(np.sum(r) / np.sum(r * r)), 0.0


@dataclass(frozen=True)
class _NetworkPoint:
    config: dict[str, Any]
    measured_ms: float
    units_sum_ms: float


@dataclass(frozen=True)
class _ProfiledNetwork:
    """One network profiled whole through onnxruntime, its node times charged to its units."""

    config: dict[str, Any]
    graph_ms: float  # sum of its nodes' times: the units' plus glue_ms
    run_ms: float  # onnxruntime's own time per run (graph_ms plus per-run overhead)
    glue_ms: float  # nodes that belong to no unit (ehrsr.profiling.onnx_graph.GLUE)
    passes: int
    units: tuple[tuple[str, str, float], ...]  # (path, key, ms) of each unit, in forward order

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = [list(u) for u in self.units]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _ProfiledNetwork:
        units = tuple((str(path), str(key), float(ms)) for path, key, ms in data["units"])
        return cls(dict(data["config"]), float(data["graph_ms"]), float(data["run_ms"]), float(data["glue_ms"]),
                   int(data["passes"]), units)


def _profile_network(path: Path, config: EHRSRConfig, target: LatencyTarget, budget_s: float) -> _ProfiledNetwork:
    """``config``'s deploy form, exported whole to ``path`` (``export_scoped``), profiled through
    onnxruntime on ``target`` (this machine), its time split into its units."""
    listed = units_of(config, target.input_hw)
    shape = (1, config.in_channels, *target.input_hw)
    found = profile_units(path, [shape], [u.path for u in listed], target.threads, budget_s=budget_s)
    return _ProfiledNetwork(config.to_dict(), found.graph_ms, found.run_ms, found.glue_ms, found.passes,
                            tuple((u.path, u.key, found.unit_ms[u.path]) for u in listed))


def plan_graph_networks(
    space: SearchSpace,
    catalogue: dict[str, tuple[EHRSRConfig, Unit]],
    input_hw: Sequence[int],
    *,
    scale: int = 4,
    seed: int = 0,
    observations: int = GRAPH_OBSERVATIONS,
    pool_size: int = GRAPH_POOL,
) -> list[EHRSRConfig]:
    """Networks to profile whole so that every key of ``catalogue`` occurs at least
    ``observations`` times in them where the space allows (an occurrence is one unit of one
    network: one neighbourhood): a greedy multicover (each step takes the configuration with the
    most occurrences of keys still short) over the catalogue's example configurations (which
    guarantee every key once) and ``pool_size`` more drawn at random. Few networks, each key
    in several neighbourhoods."""
    if observations < 1:
        raise ValueError(f"graph observations must be at least 1, got {observations}")
    pool: dict[str, EHRSRConfig] = {}
    for config in [c for c, _ in catalogue.values()] + list(sample_configs(space, pool_size, seed=seed + 2, scale=scale)):
        pool.setdefault(json.dumps(config.to_dict(), sort_keys=True), config)
    configs = list(pool.values())
    keys = [Counter(u.key for u in units_of(c, input_hw)) for c in configs]
    short = dict.fromkeys(catalogue, observations)  # key -> occurrences still wanted
    chosen: list[EHRSRConfig] = []
    while True:
        gains = [sum(min(n, short.get(key, 0)) for key, n in ks.items()) for ks in keys]
        best = int(np.argmax(gains))
        if gains[best] == 0:
            return chosen
        chosen.append(configs[best])
        for key, n in keys[best].items():
            if key in short:
                short[key] = max(0, short[key] - n)
        keys[best] = Counter()


def _unit_costs_from_graphs(profiled: Sequence[_ProfiledNetwork], keys: set[str]) -> dict[str, dict[str, float]]:
    """Each of ``keys``' cost: the median over its occurrences in every profiled network (with its
    10th / 90th percentiles, the passes behind it and the number of occurrences)."""
    seen: dict[str, list[float]] = {key: [] for key in keys}
    passes: dict[str, int] = dict.fromkeys(keys, 0)
    for point in profiled:
        for _path, key, ms in point.units:
            if key in seen:
                seen[key].append(ms)
                passes[key] += point.passes
    return {
        key: {"latency_ms": float(np.median(values)), "p10_ms": float(np.percentile(values, 10)),
              "p90_ms": float(np.percentile(values, 90)), "repeats": float(passes[key]),
              "observations": float(len(values))}
        for key, values in seen.items() if values
    }


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def calibrate(
    space: SearchSpace,
    device_profile: Any,
    out_path: str | Path,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    dtype: str | None = None,
    input_hw: Sequence[int] | None = None,
    scale: int = 4,
    n_fit: int = 24,
    n_holdout: int = 12,
    seed: int = 0,
    unit_budget_s: float = UNIT_BUDGET_S,
    network_budget_s: float = NETWORK_BUDGET_S,
    contention_threshold: float = 1.3,
    max_units: int | None = None,
    enumeration_patience: int = 3000,
    clock: str = "wall",
    unit_timing: str | None = None,
    graph_observations: int = GRAPH_OBSERVATIONS,
    progress: bool = True,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
) -> LatencyModel:
    """Time every unit ``space`` can produce on this machine (the target) and write a latency model.

    ``device_profile``: a deploy ``DeviceProfile`` (its kind, threads, dtype, input size and
    ``runtime`` field) or a ``LatencyTarget``; ``runtime`` / ``threads`` / ``dtype`` /
    ``input_hw`` override it. The file at ``out_path`` is rewritten every ``SAVE_EVERY`` units
    (atomically), and with ``resume`` the units already in a compatible unfinished file are kept.
    ``n_fit`` whole networks fit the correction; ``n_holdout`` others measure the accuracy stored
    in the file. A canary network is timed every ``CANARY_EVERY`` units; units timed while it ran
    more than ``contention_threshold`` times slower than at the start are timed again.
    ``unit_timing`` (``UNIT_TIMINGS``; default ``isolated``, measured the more accurate for
    onnxruntime too on the development CPU, docs/latency_models.md): ``graph`` (onnxruntime only) profiles whole networks through onnxruntime and charges their node times to their
    units (``ehrsr.profiling.onnx_graph``), so a unit's cost includes the fusions onnxruntime
    makes with its neighbours; the networks are chosen so that every key occurs at least
    ``graph_observations`` times in them (``plan_graph_networks``), a key's cost is the median
    over its occurrences, and the canary is read after each network (a network profiled while it
    says the machine is busy is profiled again from the same export, keeping the faster).
    ``max_units``: time only the first units (tests; in ``graph`` timing, profile networks until
    that many new keys are timed; the model is then marked incomplete unless every unit is
    timed). ``enumeration_patience``: see ``enumerate_units``. ``clock="cpu"`` times with process
    CPU time instead of the wall clock (one-thread torch targets only): on a machine shared with
    other jobs the wall-clock time of long passes is inflated by preemption while short unit
    passes mostly are not, which skews the correction; CPU time is immune to that (recorded in
    the file's ``protocol``). Returns the model (complete when every enumerated unit was timed).
    """
    say = log or (lambda _message: None)
    target = LatencyTarget.from_profile(
        device_profile, scale=scale, runtime=runtime, threads=threads, dtype=dtype, input_hw=input_hw
    )
    target.validate(clock)
    unit_timing = unit_timing or "isolated"
    if unit_timing not in UNIT_TIMINGS:
        raise ValueError(f"unit timing must be one of {', '.join(UNIT_TIMINGS)}, got {unit_timing!r}")
    if unit_timing == "graph" and target.runtime != "onnxruntime":
        raise ValueError("unit timing 'graph' reads onnxruntime's profiler: it is for the onnxruntime runtime only")
    out_path = Path(out_path)
    fingerprint = space_fingerprint(space)
    started = time.perf_counter()

    units: dict[str, dict[str, float]] = {}
    profiled: list[_ProfiledNetwork] = []  # graph timing: every network profiled so far
    previous_s = 0.0
    if resume and out_path.exists():
        old = LatencyModel.read(out_path)
        old_protocol = old.extra.get("protocol", {})
        if (old.space["sha256"] != fingerprint["sha256"] or old.target.mismatch(target)
                or old_protocol.get("clock") != clock or old_protocol.get("unit_timing") != unit_timing):
            raise LatencyModelError(
                f"{out_path} holds a latency model for another space or device settings; "
                "choose another --out or calibrate without resume"
            )
        units = dict(old.units)
        profiled = [_ProfiledNetwork.from_dict(p) for p in old.extra.get("graph_networks", [])]
        previous_s = float(old.extra.get("calibration_s", 0.0))
        say(f"resuming {out_path}: {len(units)} units already timed")

    catalogue = enumerate_units(space, target.input_hw, scale=scale, seed=seed, patience=enumeration_patience)
    todo = [key for key in catalogue if key not in units]
    if max_units is not None and unit_timing == "isolated":
        todo = todo[:max_units]
    say(f"{len(catalogue)} units in space '{space.name}' at {_show(target.input_hw)}; {len(todo)} to time")

    canary = Canary(threads=target.threads if target.kind == "cpu" else 1)
    quiet_ms = canary.calibrate()
    canary_ratios: list[float] = []
    device_info = {
        "hardware": torch.cuda.get_device_name() if target.kind == "cuda" else cpu_name(),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "runtime_versions": runtime_versions(target.runtime),
        "scan_kernel": "compiled" if scan_kernel.available() else f"PyTorch scan ({scan_kernel.reason()})",
        "python": platform.python_version(),
    }

    def snapshot(complete: bool, extra: dict[str, Any], correction: tuple[float, float] = (1.0, 0.0),
                 accuracy: Accuracy | None = None) -> LatencyModel:
        return LatencyModel(
            target=target,
            space=fingerprint,
            units=dict(units),
            correction_scale=correction[0],
            correction_offset_ms=correction[1],
            accuracy=accuracy,
            device=device_info,
            extra={
                "protocol": {"unit_budget_s": unit_budget_s, "network_budget_s": network_budget_s, "clock": clock,
                             "unit_timing": unit_timing,
                             **({"graph_observations": graph_observations} if unit_timing == "graph" else {}),
                             "statistic": "median of timed passes after warm-up (ehrsr.profiling.latency)"},
                "canary": {"quiet_ms": quiet_ms, "threshold": contention_threshold, "ratios": canary_ratios},
                "units_enumerated": len(catalogue),
                "calibration_s": previous_s + time.perf_counter() - started,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **({"graph_networks": [p.to_dict() for p in profiled]} if unit_timing == "graph" else {}),
                **extra,
            },
            complete=complete,
        )

    deploys: dict[int, nn.Module] = {}  # one deploy form per example configuration

    def time_unit(key: str) -> dict[str, float]:
        config, unit = catalogue[key]
        ident = id(config)
        if ident not in deploys:
            deploys.clear()  # keep one network at a time: the catalogue visits them in order
            deploys[ident] = _deploy(config)
        stats = _time(unit_module(deploys[ident], unit), target, unit.input_shapes, unit_budget_s, clock)
        return {"latency_ms": stats.latency_ms, "p10_ms": stats.latency_ms_p10, "p90_ms": stats.latency_ms_p90,
                "repeats": float(stats.repeats)}

    if unit_timing == "isolated":
        batch: list[str] = []
        for done, key in enumerate(_progress(todo, len(todo), "units", progress), start=1):
            units[key] = time_unit(key)
            batch.append(key)
            if len(batch) >= CANARY_EVERY or done == len(todo):
                reading = canary.check()
                canary_ratios.append(round(reading.ratio, 3))
                if reading.ratio > contention_threshold:
                    # the machine was busy while this batch ran: time it again, keep the faster median
                    for again in batch:
                        retry = time_unit(again)
                        if retry["latency_ms"] < units[again]["latency_ms"]:
                            units[again] = retry
                    canary_ratios.append(round(canary.check().ratio, 3))
                batch = []
            if done % SAVE_EVERY == 0:
                snapshot(False, {}).save(out_path)
        deploys.clear()
    else:
        seen = {json.dumps(p.config, sort_keys=True) for p in profiled}
        planned = plan_graph_networks(space, catalogue, target.input_hw, scale=scale, seed=seed,
                                      observations=graph_observations)
        networks = [c for c in planned if json.dumps(c.to_dict(), sort_keys=True) not in seen]
        say(f"{len(planned)} networks to profile whole (every unit key occurring {graph_observations} times where "
            f"the space allows); {len(networks)} left")
        timed_before = len(units)
        for config in _progress(networks, len(networks), "networks", progress):
            if max_units is not None and len(units) - timed_before >= max_units:
                break
            with tempfile.TemporaryDirectory(prefix="ehrsr-calibrate-") as folder:
                exported = export_scoped(_deploy(config), [(1, config.in_channels, *target.input_hw)],
                                         Path(folder) / "network.onnx")
                point = _profile_network(exported, config, target, network_budget_s)
                reading = canary.check()
                canary_ratios.append(round(reading.ratio, 3))
                if reading.ratio > contention_threshold:
                    # the machine was busy while this network ran: profile it again, keep the faster
                    retry = _profile_network(exported, config, target, network_budget_s)
                    point = min(point, retry, key=lambda p: p.graph_ms)
                    canary_ratios.append(round(canary.check().ratio, 3))
            profiled.append(point)
            units.update(_unit_costs_from_graphs(profiled, {key for _, key, _ in point.units}))
            snapshot(False, {}).save(out_path)

    missing = [key for key in catalogue if key not in units]
    if missing:
        model = snapshot(False, {"units_missing": len(missing)})
        model.save(out_path)
        say(f"{len(missing)} units still to time; run again to resume")
        return model

    # whole networks: a few to fit the correction, others held out to measure the accuracy
    sampled = list(sample_configs(space, 4 * (n_fit + n_holdout), seed=seed + 1, scale=scale))
    unique: list[EHRSRConfig] = []
    for config in sampled:
        if config not in unique:
            unique.append(config)
    fit_configs, holdout_configs = unique[:n_fit], unique[n_fit : n_fit + n_holdout]
    partial = snapshot(False, {})

    def measure_points(configs: list[EHRSRConfig], desc: str) -> list[_NetworkPoint]:
        points = []
        for config in _progress(configs, len(configs), desc, progress):
            measured = measure_network(config, target, budget_s=network_budget_s, clock=clock)
            points.append(_NetworkPoint(config.to_dict(), measured, partial.predict(config).units_sum_ms))
        return points

    fit = measure_points(fit_configs, "fit networks")
    correction = _fit_correction([p.units_sum_ms for p in fit], [p.measured_ms for p in fit])
    holdout = measure_points(holdout_configs, "hold-out networks")
    canary_ratios.append(round(canary.check().ratio, 3))
    predicted = [correction[0] * p.units_sum_ms + correction[1] for p in holdout]
    accuracy = accuracy_of(predicted, [p.measured_ms for p in holdout]) if holdout else None
    model = snapshot(
        True,
        {"fit_networks": [asdict(p) for p in fit], "holdout_networks": [asdict(p) for p in holdout]},
        correction,
        accuracy,
    )
    model.save(out_path)
    if accuracy is not None:
        say(
            f"latency model {out_path}: {len(units)} units; hold-out ({accuracy.n} networks) median error "
            f"{accuracy.median_abs_pct_error:.1f} %, p90 {accuracy.p90_abs_pct_error:.1f} %, Spearman {accuracy.spearman:.3f}"
        )
    return model


# ---------------------------------------------------------------------------------------------
# one latency per profile for a trial: predicted when the model covers it, measured otherwise


@dataclass(frozen=True)
class LatencyRecord:
    """A trial's latency for one device profile and where it came from (stored with the trial)."""

    profile: str
    latency_ms: float
    source: str  # "predicted" (latency model) or "measured" (on this machine)
    missing_units: tuple[str, ...] = ()  # why a prediction was not possible (source "measured")
    canary_ratio: float | None = None  # measured only: the canary's ratio next to the measurement
    contended: bool = False  # measured only: the canary said the machine was busy even after retries

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["missing_units"] = list(self.missing_units)
        return data


def latency_for_profile(
    config: EHRSRConfig,
    target: LatencyTarget,
    model: LatencyModel | None,
    *,
    canary: Canary | None = None,
    measure: Callable[[EHRSRConfig, LatencyTarget], float] | None = None,
    retries: int = 2,
) -> LatencyRecord:
    """The latency of ``config`` on ``target``: predicted by ``model`` when it covers every unit,
    else measured on this machine (``measure``, default ``measure_network``) next to a canary
    reading, measuring again while the canary says the machine is busy (``measure_with_canary``)."""
    missing: tuple[str, ...] = ()
    if model is not None:
        prediction = model.predict(config, target.input_hw)
        if prediction.covered and prediction.latency_ms is not None:
            return LatencyRecord(target.profile, prediction.latency_ms, "predicted")
        missing = prediction.missing_units
    measure = measure or measure_network
    return _measured_record(lambda: measure(config, target), target, missing, canary, retries)
