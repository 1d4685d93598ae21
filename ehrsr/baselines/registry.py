"""Registry of hand-designed efficient-SR baselines for the Pareto fronts.

Each baseline has two sizes (``docs/baselines.md`` gives the rule and the measured costs):

- ``full``: the size its paper publishes;
- ``tiny``: channels and blocks reduced until its MACs at a 256x256 LR input fall inside the range
  the tiny search space's configurations span, so it competes with tiny-space EHR-SR networks.

Architectures that spandrel ships (SPAN, SAFMN, PLKSR, OmniSR, DITN; the ``baselines`` extra) are
built through spandrel's architecture classes, with random weights; RLFN is in this package
(:mod:`ehrsr.baselines.rlfn`). ``bicubic_skip=True`` wraps the network in :class:`BicubicSkip`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ehrsr.baselines.rlfn import RLFN
from ehrsr.baselines.skip import BicubicSkip
from ehrsr.study_schema import baselines_off

__all__ = [
    "SIZE_CLASSES",
    "BaselineInfo",
    "BaselineUnavailable",
    "UnknownBaseline",
    "available_baselines",
    "baseline_label",
    "baseline_names",
    "baselines_off",
    "build_baseline",
    "deploy_baseline",
]

SizeClass = Literal["tiny", "full"]
SIZE_CLASSES: tuple[str, ...] = ("tiny", "full")


class UnknownBaseline(ValueError):
    """A baseline name or size class that the registry does not know; the message lists valid ones."""


class BaselineUnavailable(RuntimeError):
    """The baseline needs an optional package (spandrel) that is not installed."""


@dataclass(frozen=True)
class _Spec:
    name: str
    paper: str
    spandrel_module: str | None  # module holding the class in spandrel, None: built here
    spandrel_class: str | None
    full: dict[str, Any]
    tiny: dict[str, Any]
    # the network's final convolution (zeroed for the bicubic-skip variant)
    last_conv: Callable[[nn.Module], nn.Conv2d]
    # the network without a global skip of its own (PLKSR adds nearest-neighbour upsampling)
    residual_body: Callable[[nn.Module], nn.Module] = field(default=lambda model: model)
    scale_key: str = "upscale"


class _PLKSRResidual(nn.Module):
    """PLKSR without its nearest-neighbour input repeat: ``pixel_shuffle(feats(x))``."""

    def __init__(self, plksr: nn.Module) -> None:
        super().__init__()
        self.feats = plksr.feats
        self.to_img = plksr.to_img

    def forward(self, x):
        return self.to_img(self.feats(x))


_SPANDREL = "spandrel.architectures"

_SPECS: dict[str, _Spec] = {
    spec.name: spec
    for spec in (
        _Spec(
            name="SPAN",
            paper="Wan et al., Swift Parameter-free Attention Network for Efficient Super-Resolution, CVPRW 2024",
            spandrel_module=f"{_SPANDREL}.SPAN.__arch.span",
            spandrel_class="SPAN",
            full={"feature_channels": 48},
            tiny={"feature_channels": 12},
            last_conv=lambda m: m.upsampler[0],
        ),
        _Spec(
            name="SAFMN",
            paper="Sun et al., Spatially-Adaptive Feature Modulation for Efficient Image Super-Resolution, ICCV 2023",
            spandrel_module=f"{_SPANDREL}.SAFMN.__arch.safmn",
            spandrel_class="SAFMN",
            full={"dim": 36, "n_blocks": 8, "ffn_scale": 2.0},
            tiny={"dim": 16, "n_blocks": 4, "ffn_scale": 2.0},
            last_conv=lambda m: m.to_img[0],
            scale_key="upscaling_factor",
        ),
        _Spec(
            name="PLKSR",
            paper="Lee et al., Partial Large Kernel CNNs for Efficient Super-Resolution, arXiv 2404.11848 (PLKSR-tiny)",
            spandrel_module=f"{_SPANDREL}.PLKSR.__arch.PLKSR",
            spandrel_class="PLKSR",
            full={"dim": 64, "n_blocks": 12, "kernel_size": 13, "split_ratio": 0.25, "use_ea": False},
            tiny={"dim": 16, "n_blocks": 4, "kernel_size": 13, "split_ratio": 0.25, "use_ea": False},
            last_conv=lambda m: m.feats[-1],
            residual_body=_PLKSRResidual,
            scale_key="upscaling_factor",
        ),
        _Spec(
            name="RLFN",
            paper="Kong et al., Residual Local Feature Network for Efficient Super-Resolution, CVPRW 2022 "
            "(NTIRE 2024 ESR baseline size)",
            spandrel_module=None,
            spandrel_class=None,
            full={"channels": 46, "mid": 48, "blocks": 4, "esa_channels": 16},
            tiny={"channels": 16, "mid": 16, "blocks": 3, "esa_channels": 8},
            last_conv=lambda m: m.upsample[0],
            scale_key="scale",
        ),
        _Spec(
            name="OmniSR",
            paper="Wang et al., Omni Aggregation Networks for Lightweight Image Super-Resolution, CVPR 2023",
            spandrel_module=f"{_SPANDREL}.OmniSR.__arch.OmniSR",
            spandrel_class="OmniSR",
            full={"num_feat": 64, "res_num": 5, "block_num": 1, "window_size": 8, "pe": True},
            tiny={"num_feat": 32, "res_num": 1, "block_num": 1, "window_size": 8, "pe": True},
            last_conv=lambda m: m.up[0],
            scale_key="up_scale",
        ),
        _Spec(
            name="DITN",
            paper="Liu et al., Unfolding Once is Enough: A Deployment-Friendly Transformer Unit for "
            "Super-Resolution, ACM MM 2023",
            spandrel_module=f"{_SPANDREL}.DITN.__arch.DITN_Real",
            spandrel_class="DITN_Real",
            full={"dim": 60, "ITL_blocks": 4, "SAL_blocks": 4, "UFONE_blocks": 1, "patch_size": 8},
            tiny={"dim": 16, "ITL_blocks": 2, "SAL_blocks": 2, "UFONE_blocks": 1, "patch_size": 8},
            last_conv=lambda m: m.upsample[0],
        ),
    )
}


def baseline_names() -> list[str]:
    return list(_SPECS)


def _spec(name: str) -> _Spec:
    spec = _SPECS.get(name) or next((s for s in _SPECS.values() if s.name.lower() == name.lower()), None)
    if spec is None:
        raise UnknownBaseline(f"unknown baseline {name!r}; valid: {', '.join(_SPECS)}")
    return spec


def _spandrel_missing_reason() -> str | None:
    try:
        importlib.import_module("spandrel")
    except ImportError as exc:
        return f"spandrel is not installed ({exc}); pip install 'ehrsr[baselines]'"
    return None


@dataclass(frozen=True)
class BaselineInfo:
    """What :func:`available_baselines` reports about one baseline."""

    name: str
    paper: str
    needs_spandrel: bool
    available: bool
    reason: str  # why it is unavailable; "" when available
    tiny: dict[str, Any]
    full: dict[str, Any]


def available_baselines() -> list[BaselineInfo]:
    """Every registered baseline, saying which need spandrel and whether they can be built here."""
    missing = _spandrel_missing_reason()
    infos = []
    for spec in _SPECS.values():
        needs = spec.spandrel_module is not None
        unavailable = needs and missing is not None
        infos.append(
            BaselineInfo(spec.name, spec.paper, needs, not unavailable, missing if unavailable else "",
                         dict(spec.tiny), dict(spec.full))
        )
    return infos


def baseline_label(name: str, bicubic_skip: bool) -> str:
    """Display name, e.g. ``"SPAN (+bicubic skip)"``."""
    return f"{_spec(name).name} (+bicubic skip)" if bicubic_skip else _spec(name).name


def build_baseline(name: str, scale: int, size_class: SizeClass = "tiny", bicubic_skip: bool = False) -> nn.Module:
    """A freshly initialised baseline network mapping ``(B, 3, h, w)`` in [0, 1] to ``(B, 3, h*s, w*s)``.

    Raises :class:`UnknownBaseline` for an unknown name or size class (listing the valid ones) and
    :class:`BaselineUnavailable` when the architecture needs spandrel and it is not installed.
    """
    spec = _spec(name)
    if size_class not in SIZE_CLASSES:
        raise UnknownBaseline(f"unknown size class {size_class!r}; valid: {', '.join(SIZE_CLASSES)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    kwargs = {**(spec.tiny if size_class == "tiny" else spec.full), spec.scale_key: scale}
    if spec.spandrel_module is None:
        model = RLFN(**kwargs)
    else:
        missing = _spandrel_missing_reason()
        if missing is not None:
            raise BaselineUnavailable(f"baseline {spec.name} is built through spandrel: {missing}")
        cls = getattr(importlib.import_module(spec.spandrel_module), spec.spandrel_class)
        if spec.name == "SPAN":
            kwargs.update(num_in_ch=3, num_out_ch=3)
        model = cls(**kwargs)
    if bicubic_skip:
        model = BicubicSkip(spec.residual_body(model), scale, spec.last_conv(model))
    model.scale = scale  # read by ehrsr.metrics.evaluate when a val set has no scale
    return model


def deploy_baseline(model: nn.Module) -> nn.Module:
    """The inference form to profile: an eval-mode copy with re-parameterised convolutions fused.

    SPAN's ``Conv3XC`` (a 1x1-3x3-1x1 chain plus a 1x1 shortcut) recomputes its fused 3x3 kernel
    on every eval forward; here spandrel's own ``update_params`` runs once and each ``Conv3XC``
    becomes a plain convolution. PLKSR-tiny, SAFMN, RLFN, OmniSR and DITN have no training-only branches
    and are returned as an eval-mode copy. ``ehrsr.profiling.count_macs`` counts either form the
    same way; the fused one also times like the deployed network.
    """
    deployed = copy.deepcopy(model).eval()
    for parent in list(deployed.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv3XC" and hasattr(child, "update_params"):
                setattr(parent, child_name, _fused_conv3xc(child))
    return deployed


class _ConvLeakyReLU(nn.Sequential):
    pass


def _fused_conv3xc(block: nn.Module) -> nn.Module:
    block.update_params()  # spandrel's fusion into block.eval_conv
    conv = copy.deepcopy(block.eval_conv)
    conv.weight.requires_grad_(False)
    if conv.bias is not None:
        conv.bias.requires_grad_(False)
    if getattr(block, "has_relu", False):
        return _ConvLeakyReLU(conv, nn.LeakyReLU(0.05))  # Conv3XC's activation when relu=True
    return conv
