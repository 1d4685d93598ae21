"""NAFBlock: the activation-free conv block of NAFNet (Chen et al., "Simple Baselines for Image
Restoration", ECCV 2022), used for the MSG levels and as the conv-only trunk.

Two residual halves, each scaled by a learned per-channel factor that starts at zero (so a deep
stack starts as the identity): a depthwise-conv mixer with SimpleGate and simplified channel
attention, then a SimpleGate feed-forward network.
"""

from __future__ import annotations

import torch
from torch import nn

from ehrsr.blocks.layers import LayerNorm2d, SimpleGate, scaled_residual

__all__ = ["NAFBlock"]


class NAFBlock(nn.Module):
    def __init__(self, channels: int, expansion: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(2, round(channels * expansion / 2) * 2)  # even, for SimpleGate's split
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        # simplified channel attention: global average -> 1x1 conv -> channel-wise scale
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden // 2, hidden // 2, 1))
        self.conv2 = nn.Conv2d(hidden // 2, channels, 1)
        self.beta = scaled_residual(channels)

        self.norm2 = LayerNorm2d(channels)
        self.ffn_in = nn.Conv2d(channels, hidden, 1)
        self.ffn_out = nn.Conv2d(hidden // 2, channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gamma = scaled_residual(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.dwconv(self.conv1(self.norm1(x))))  # (B, hidden/2, H, W)
        y = self.conv2(y * self.sca(y))
        x = x + self.beta * y
        y = self.ffn_out(self.dropout(self.gate(self.ffn_in(self.norm2(x)))))
        return x + self.gamma * y
