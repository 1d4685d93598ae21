"""The "+bicubic skip" variant of a baseline: EHR-SR's global residual given to a hand-designed net.

EHR-SR predicts a residual on top of ``F.interpolate(x, scale, mode="bicubic")`` and its head
starts at zero, so the untrained network is exactly bicubic upsampling (``ehrsr/model.py``). Most
efficient-SR baselines start from random noise instead; after a short training budget they stay
far below bicubic, which compares initialisations, not architectures. :class:`BicubicSkip` adds
the same residual and zero-initialises the baseline's last convolution, so both start alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BicubicSkip", "bicubic_upsample"]


def bicubic_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The base EHR-SR adds its residual to (``ehrsr/model.py``): PyTorch bicubic, the input at scale 1."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)


class BicubicSkip(nn.Module):
    """``body(x) + bicubic(x)`` with ``last_conv`` (the body's final convolution) set to zero."""

    def __init__(self, body: nn.Module, scale: int, last_conv: nn.Conv2d) -> None:
        super().__init__()
        self.body = body
        self.scale = scale
        # a residual of exactly zero: the untrained network returns bicubic, as EHR-SR does
        nn.init.zeros_(last_conv.weight)
        if last_conv.bias is not None:
            nn.init.zeros_(last_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + bicubic_upsample(x, self.scale)
