"""Gated CNN block in the style of MambaOut's GatedCNNBlock as used by MoSR / GateR (Yu & Wang,
"MambaOut: Do We Really Need Mamba for Vision?", 2024): a GLU whose value path runs through a
depthwise conv, in one residual with a learned per-channel scale that starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ehrsr.blocks.layers import LayerNorm2d, scaled_residual

__all__ = ["GatedCNNBlock", "GatedConv"]


class GatedCNNBlock(nn.Module):
    def __init__(self, channels: int, expansion: float = 2.0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, round(channels * expansion))
        self.norm = LayerNorm2d(channels)
        self.fc1 = nn.Conv2d(channels, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gamma = scaled_residual(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(self.norm(x)).chunk(2, dim=1)  # (B, hidden, H, W) each
        y = self.fc2(self.dropout(self.act(gate) * self.dwconv(value)))
        return x + self.gamma * y


class GatedConv(nn.Module):
    """Light gated conv for the full-resolution stem: ``x + pw(dw(a) * sigmoid(g))``.

    Depthwise for the spatial part so the stem stays cheap at full resolution (about 3 C^2 MACs
    per pixel); the residual starts as the identity through a zero-initialised scale.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, 2 * channels, 1)
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.project = nn.Conv2d(channels, channels, 1)
        self.gamma = scaled_residual(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.expand(x).chunk(2, dim=1)
        return x + self.gamma * self.project(self.dwconv(value) * torch.sigmoid(gate))
