"""RLFN, an efficient-SR baseline that spandrel 0.4.2 does not ship, written for this package.

RLFN (Kong et al., "Residual Local Feature Network for Efficient Super-Resolution", CVPRW 2022),
in the pruned configuration that served as the NTIRE 2024 ESR baseline: 46 feature channels,
48 mid channels, 16 ESA channels, four residual local feature blocks, x4 (architecture as described
in the paper and in the NTIRE 2024 ESR challenge repository, Amazingren/NTIRE2024_ESR). Written here
from that description. ``benchmarks/profile_reference.py`` counts it against the published NTIRE
figure; :mod:`ehrsr.baselines` trains it (smaller widths for the tiny space).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RLFN"]


def _conv(c_in: int, c_out: int, k: int, **kwargs: int) -> nn.Conv2d:
    kwargs.setdefault("padding", k // 2)
    return nn.Conv2d(c_in, c_out, k, **kwargs)


class EnhancedSpatialAttention(nn.Module):
    """ESA as RLFN uses it: 1x1 squeeze, strided 3x3, 7x7/3 max-pool, 3x3, bilinear back, 1x1, sigmoid."""

    def __init__(self, channels: int, squeezed: int = 16) -> None:
        super().__init__()
        self.squeeze = _conv(channels, squeezed, 1)
        self.skip = _conv(squeezed, squeezed, 1)
        self.down = _conv(squeezed, squeezed, 3, stride=2, padding=0)
        self.mix = _conv(squeezed, squeezed, 3)
        self.expand = _conv(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        low = self.mix(F.max_pool2d(self.down(s), kernel_size=7, stride=3))
        low = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.expand(low + self.skip(s)))


class LocalFeatureBlock(nn.Module):
    """Three 3x3 convs with LeakyReLU(0.05), a residual, a 1x1 and ESA."""

    def __init__(self, channels: int, mid: int, esa_channels: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, mid, 3), nn.LeakyReLU(0.05),
            _conv(mid, mid, 3), nn.LeakyReLU(0.05),
            _conv(mid, channels, 3), nn.LeakyReLU(0.05),
        )
        self.fuse = _conv(channels, channels, 1)
        self.attention = EnhancedSpatialAttention(channels, esa_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.fuse(self.body(x) + x))


class RLFN(nn.Module):
    """Defaults: the NTIRE 2024 ESR baseline (46 / 48 / 16 channels, four blocks)."""

    def __init__(
        self, channels: int = 46, mid: int = 48, blocks: int = 4, scale: int = 4, esa_channels: int = 16
    ) -> None:
        super().__init__()
        self.head = _conv(3, channels, 3)
        self.blocks = nn.Sequential(*(LocalFeatureBlock(channels, mid, esa_channels) for _ in range(blocks)))
        self.tail = _conv(channels, channels, 3)
        self.upsample = nn.Sequential(_conv(channels, 3 * scale**2, 3), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        return self.upsample(self.tail(self.blocks(feat)) + feat)
