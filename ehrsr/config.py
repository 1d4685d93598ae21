"""EHRSRConfig: every knob of the EHR-SR network, validated, with an exact dict/JSON/YAML round trip.

The configuration is a tree of frozen dataclasses, one per module. ``EHRSRConfig.from_dict`` is the
only door from untyped data (YAML, JSON, Optuna parameters) into the network: it rejects unknown
keys (naming the valid ones), wrong types and impossible values with a ``ValueError`` that names
the field, so a typo never becomes a deep ``TypeError`` inside a constructor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ehrsr.errors import ConfigError

__all__ = [
    "MODULE_TOGGLES",
    "EHRSRConfig",
    "FSBConfig",
    "MSGConfig",
    "MoEConfig",
    "NoiseConfig",
    "RepMixConfig",
    "SSMConfig",
    "WABConfig",
    "dataclass_from_dict",
    "to_plain",
]


@dataclass(frozen=True)
class WABConfig:
    """Shifted-window attention block (Swin / HAT style) with a gated depthwise FFN (Restormer's GDFN)."""

    enabled: bool = False  # off: the conv-only baseline is the reference point of every ablation
    window_size: int = 8  # 8x8 windows: 64 tokens, cheap at H/4 and the usual choice of light SR models
    heads: int = 4  # must divide the trunk width; 4 heads of 16-32 channels at the default widths
    shift: bool = True  # alternate blocks shift windows by window_size // 2 (Swin), linking windows
    ffn_expansion: float = 2.0  # GDFN hidden = 2x channels; Restormer uses 2.66, light models 2


@dataclass(frozen=True)
class SSMConfig:
    """Mamba-style selective-scan block (VMamba / MambaIR cross-scan) over flattened tokens."""

    enabled: bool = False
    d_state: int = 8  # state size N; 8 is enough at low resolution and keeps the scan cheap (Mamba: 16)
    expand: float = 1.0  # inner width = expand x channels; 1.0 instead of Mamba's 2.0 to stay light
    dt_rank: int = 0  # 0 = auto: ceil(channels / 16), as in Mamba
    directions: int = 2  # 1: row-major forward; 2: + backward; 4: + column-major both ways (VMamba)
    conv_kernel: int = 3  # depthwise conv before the scan gives local context (Mamba's conv1d, in 2D)


@dataclass(frozen=True)
class FSBConfig:
    """Frequency-separation block: learned gating of the high-frequency part of ``rfft2``."""

    enabled: bool = False
    cutoff: float = 0.25  # normalised radius (Nyquist = 1) above which frequencies count as "high"
    n_bins: int = 8  # learned gain per channel on this many radial bins, linearly interpolated


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of token-level FFN experts (MoCE-IR / Switch style) behind a shared depthwise conv."""

    enabled: bool = False
    n_experts: int = 4  # small pool, as the draft asks (texture / edges / denoise / smooth)
    top_k: int = 2  # 2 keeps a smooth mixture; 1 is Switch routing
    expansion: float = 2.0  # hidden width of each expert FFN relative to the channels
    capacity_factor: float = 0.0  # 0 = unlimited; else each expert takes at most cf * tokens * k / E
    balance_weight: float = 0.01  # Switch Transformer's load-balancing coefficient
    entropy_weight: float = 0.0  # optional router-entropy penalty (positive = sharper routing)


@dataclass(frozen=True)
class RepMixConfig:
    """Re-parameterisable conv mixer: 3x3 + 1x1 + identity, then a partial large kernel (PLKSR)."""

    enabled: bool = False
    kernel_size: int = 13  # PLKSR's best trade-off on GPUs is 17; 13 keeps CPU cost moderate
    partial_ratio: float = 0.25  # share of channels the large kernel sees (PLKSR uses 16 of 64)


@dataclass(frozen=True)
class NoiseConfig:
    """Per-stage noise injection (StyleGAN2): ``x + s * noise`` with ``s`` learned, starting at 0."""

    enabled: bool = False
    eval_mode: Literal["zero", "seeded"] = "zero"  # eval is deterministic: no noise, or a fixed seed
    seed: int = 0  # seed of the eval noise when eval_mode == "seeded"


@dataclass(frozen=True)
class MSGConfig:
    """Multi-scale (U-Net style) encoder/decoder around the trunk (MoESR's MSG paths)."""

    levels: int = 2  # each level halves H and W and doubles channels; 2 puts the trunk at H/4
    depths: tuple[int, ...] = (1, 1)  # conv blocks per encoder level (decoder mirrors); len == levels
    skip_fusion: Literal["add", "concat"] = "add"  # add is free; concat + 1x1 is what NAFNet avoids
    attention_gate: bool = False  # Attention U-Net additive gate on each skip
    downsample: Literal["conv", "unshuffle"] = "conv"  # strided 2x2 conv, or PixelUnshuffle + 1x1


MODULE_TOGGLES: tuple[str, ...] = ("wab", "ssm", "fsb", "moe", "repmix", "noise")
"""Config fields whose ``enabled`` flag switches an EHR-SR module on or off (the ablation axes)."""


@dataclass(frozen=True)
class EHRSRConfig:
    """The whole EHR-SR network. Defaults give a small conv-only x4 model that trains on a CPU."""

    scale: int = 4  # 1 = restoration (denoise / deblur / JPEG), 2-4 = super-resolution
    in_channels: int = 3  # RGB
    out_channels: int = 3  # RGB; must equal in_channels for the global residual
    width: int = 32  # channels at full resolution; doubled at every MSG level
    block_type: Literal["naf", "gated"] = "naf"  # conv block of the MSG levels and of the trunk
    ffn_expansion: float = 2.0  # hidden expansion of the conv blocks' FFN / gate
    msg: MSGConfig = field(default_factory=MSGConfig)
    trunk_blocks: int = 2  # hybrid trunk blocks; each is a conv block plus the enabled mixers
    trunk_level: int | None = None  # MSG level the trunk runs at; None = the lowest (levels)
    wab: WABConfig = field(default_factory=WABConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    fsb: FSBConfig = field(default_factory=FSBConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    repmix: RepMixConfig = field(default_factory=RepMixConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    drop_path: float = 0.0  # stochastic depth rate of the trunk residuals (linearly increasing); off
    dropout: float = 0.0  # dropout inside FFNs; off, as brief training does not overfit

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived values -------------------------------------------------------------------------
    @property
    def resolved_trunk_level(self) -> int:
        return self.msg.levels if self.trunk_level is None else self.trunk_level

    @property
    def trunk_width(self) -> int:
        return self.width * 2**self.resolved_trunk_level

    def enabled_modules(self) -> tuple[str, ...]:
        """Names of the switched-on modules, in trunk order (``MODULE_TOGGLES``)."""
        return tuple(name for name in MODULE_TOGGLES if getattr(self, name).enabled)

    # -- conversions ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EHRSRConfig:
        """Build from plain data; unknown keys, wrong types and impossible values raise ``ValueError``."""
        return dataclass_from_dict(cls, data, path="")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) such that ``from_dict(to_dict())`` equals ``self``."""
        return to_plain(self)

    def replace(self, **changes: Any) -> EHRSRConfig:
        """Copy with changes; nested sections may be given as dicts of their own changes."""
        data = self.to_dict()
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = to_plain(value)
        return EHRSRConfig.from_dict(data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> EHRSRConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration is not valid JSON: {exc}") from None
        return cls.from_dict(_expect_mapping(data, "configuration"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> EHRSRConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration is not valid YAML: {exc}") from None
        return cls.from_dict(_expect_mapping(data or {}, "configuration"))

    @classmethod
    def load(cls, path: str | Path) -> EHRSRConfig:
        """Read a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json(indent=2) if path.suffix == ".json" else self.to_yaml())


# ---------------------------------------------------------------------------------------------
# generic dataclass <-> plain data


def _expect_mapping(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def to_plain(value: Any) -> Any:
    """A dataclass tree as plain data (dicts, lists, scalars): the inverse of ``dataclass_from_dict``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # resolving string annotations compiles them: cached, as searches build thousands of configs
    return typing.get_type_hints(cls)


def dataclass_from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from plain data, nested dataclasses included: unknown keys
    (listing the valid ones), wrong types and bad values raise ``ConfigError`` naming the field
    (``path`` prefixes the names, e.g. ``"wab."``)."""
    data = _expect_mapping(data, path or cls.__name__)
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" in '{path.rstrip('.')}'" if path else ""
        raise ConfigError(
            f"unknown configuration key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(path + k) for k in unknown)}{where}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{path}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Check ``value`` against a type hint and convert lists to tuples; raise naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return dataclass_from_dict(hint, value, path=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------
# validation of values (types are checked by from_dict; direct construction is checked here too)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(cfg: EHRSRConfig) -> None:
    _check(cfg.scale in (1, 2, 3, 4), f"scale must be 1 (restoration), 2, 3 or 4, got {cfg.scale}")
    _check(cfg.in_channels >= 1, f"in_channels must be >= 1, got {cfg.in_channels}")
    _check(
        cfg.out_channels == cfg.in_channels,
        f"out_channels ({cfg.out_channels}) must equal in_channels ({cfg.in_channels}) for the global residual",
    )
    _check(4 <= cfg.width <= 512, f"width must be in 4..512, got {cfg.width}")
    _check(cfg.block_type in ("naf", "gated"), f"block_type must be 'naf' or 'gated', got {cfg.block_type!r}")
    _check(0.5 <= cfg.ffn_expansion <= 8, f"ffn_expansion must be in 0.5..8, got {cfg.ffn_expansion}")
    _check(0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1), got {cfg.drop_path}")
    _check(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    _check(0 <= cfg.trunk_blocks <= 32, f"trunk_blocks must be in 0..32, got {cfg.trunk_blocks}")

    msg = cfg.msg
    _check(0 <= msg.levels <= 3, f"msg.levels must be in 0..3, got {msg.levels}")
    _check(
        len(msg.depths) == msg.levels,
        f"msg.depths must list one depth per level ({msg.levels}), got {list(msg.depths)}",
    )
    _check(all(0 <= d <= 16 for d in msg.depths), f"msg.depths must be in 0..16, got {list(msg.depths)}")
    _check(msg.skip_fusion in ("add", "concat"), f"msg.skip_fusion must be 'add' or 'concat', got {msg.skip_fusion!r}")
    _check(msg.downsample in ("conv", "unshuffle"), f"msg.downsample must be 'conv' or 'unshuffle', got {msg.downsample!r}")
    if cfg.trunk_level is not None:
        _check(
            0 <= cfg.trunk_level <= msg.levels,
            f"trunk_level must be in 0..msg.levels ({msg.levels}) or null, got {cfg.trunk_level}",
        )

    wab = cfg.wab
    _check(2 <= wab.window_size <= 32, f"wab.window_size must be in 2..32, got {wab.window_size}")
    _check(1 <= wab.heads <= 16, f"wab.heads must be in 1..16, got {wab.heads}")
    _check(
        cfg.width % wab.heads == 0,
        f"wab.heads ({wab.heads}) must divide width ({cfg.width}) so every head has whole channels",
    )
    _check(0.5 <= wab.ffn_expansion <= 8, f"wab.ffn_expansion must be in 0.5..8, got {wab.ffn_expansion}")

    ssm = cfg.ssm
    _check(1 <= ssm.d_state <= 64, f"ssm.d_state must be in 1..64, got {ssm.d_state}")
    _check(0.5 <= ssm.expand <= 4, f"ssm.expand must be in 0.5..4, got {ssm.expand}")
    _check(0 <= ssm.dt_rank <= 256, f"ssm.dt_rank must be in 0..256 (0 = auto), got {ssm.dt_rank}")
    _check(ssm.directions in (1, 2, 4), f"ssm.directions must be 1, 2 or 4, got {ssm.directions}")
    _check(
        ssm.conv_kernel in (1, 3, 5, 7),
        f"ssm.conv_kernel must be 1, 3, 5 or 7, got {ssm.conv_kernel}",
    )

    fsb = cfg.fsb
    _check(0 <= fsb.cutoff < 1, f"fsb.cutoff must be in [0, 1), got {fsb.cutoff}")
    _check(2 <= fsb.n_bins <= 64, f"fsb.n_bins must be in 2..64, got {fsb.n_bins}")

    moe = cfg.moe
    _check(2 <= moe.n_experts <= 4, f"moe.n_experts must be in 2..4, got {moe.n_experts}")
    _check(1 <= moe.top_k <= 2, f"moe.top_k must be 1 or 2, got {moe.top_k}")
    _check(
        moe.top_k <= moe.n_experts,
        f"moe.top_k ({moe.top_k}) must not exceed moe.n_experts ({moe.n_experts})",
    )
    _check(0.5 <= moe.expansion <= 8, f"moe.expansion must be in 0.5..8, got {moe.expansion}")
    _check(
        moe.capacity_factor == 0 or moe.capacity_factor >= 1,
        f"moe.capacity_factor must be 0 (unlimited) or >= 1, got {moe.capacity_factor}",
    )
    _check(moe.balance_weight >= 0, f"moe.balance_weight must be >= 0, got {moe.balance_weight}")
    _check(moe.entropy_weight >= 0, f"moe.entropy_weight must be >= 0, got {moe.entropy_weight}")

    rep = cfg.repmix
    _check(
        3 <= rep.kernel_size <= 17 and rep.kernel_size % 2 == 1,
        f"repmix.kernel_size must be odd and in 3..17, got {rep.kernel_size}",
    )
    _check(0 < rep.partial_ratio <= 1, f"repmix.partial_ratio must be in (0, 1], got {rep.partial_ratio}")

    noise = cfg.noise
    _check(noise.eval_mode in ("zero", "seeded"), f"noise.eval_mode must be 'zero' or 'seeded', got {noise.eval_mode!r}")
