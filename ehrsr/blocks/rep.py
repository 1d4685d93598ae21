"""RepMix: re-parameterisable conv mixer.

Training uses several parallel branches that fuse, exactly, into single convs for deployment
(structural re-parameterisation, RepVGG, Ding et al. 2021; used for SR by ECBSR, SPAN and PLKSR):

* ``RepConv``: 3x3 + 1x1 + identity (when shapes allow) -> one 3x3 conv.
* ``PartialLargeKernel``: on the first ``partial_ratio`` of the channels, a KxK conv + a 3x3 conv
  + identity -> one KxK conv; the other channels pass through untouched (PLKSR's partial large
  kernel, Lee et al. 2024, here with a small-kernel branch as in RepLKNet, Ding et al. 2022).
* ``RepMixBlock``: ``x + pw(GELU(PLK(RepConv(x))))``; deployed it is two convs, an activation and a
  1x1 conv.

``fuse()`` replaces the branches by the fused conv in place (so parameters are never counted twice);
``ehrsr.reparameterize`` calls it on a copy of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks.layers import DropPath

__all__ = ["PartialLargeKernel", "RepConv", "RepMixBlock"]


def _pad_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (O, I, k, k) kernel to (O, I, size, size), centred."""
    pad = (size - weight.shape[-1]) // 2
    return F.pad(weight, (pad, pad, pad, pad))


def _identity_kernel(channels: int, size: int, like: torch.Tensor) -> torch.Tensor:
    kernel = torch.zeros(channels, channels, size, size, dtype=like.dtype, device=like.device)
    kernel[torch.arange(channels), torch.arange(channels), size // 2, size // 2] = 1.0
    return kernel


class _Fusable(nn.Module):
    """Sum of same-padding convs (+ identity) that ``fuse()`` turns into one conv of the largest kernel."""

    def __init__(self, branches: list[nn.Conv2d], identity: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return y + x if self.identity else y

    @torch.no_grad()
    def fuse(self) -> None:
        if self.fused is not None:
            return
        size = max(b.kernel_size[0] for b in self.branches)
        first = self.branches[0]
        weight = sum(_pad_kernel(b.weight, size) for b in self.branches)
        bias = sum(b.bias for b in self.branches)
        if self.identity:
            weight = weight + _identity_kernel(first.out_channels, size, weight)
        fused = nn.Conv2d(first.in_channels, first.out_channels, size, padding=size // 2)
        fused = fused.to(device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.fused = fused
        self.branches = nn.ModuleList()  # training branches gone: nothing is counted or stored twice


class RepConv(_Fusable):
    """3x3 + 1x1 (+ identity when in == out channels); fuses into one 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, identity: bool = True) -> None:
        super().__init__(
            [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.Conv2d(in_channels, out_channels, 1)],
            identity=identity and in_channels == out_channels,
        )


class PartialLargeKernel(nn.Module):
    """Large-kernel conv on the first ``partial_ratio`` of the channels only (PLKSR)."""

    def __init__(self, channels: int, kernel_size: int = 13, partial_ratio: float = 0.25) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.partial = max(1, min(channels, round(channels * partial_ratio)))
        p = self.partial
        self.conv = _Fusable(
            [nn.Conv2d(p, p, kernel_size, padding=kernel_size // 2), nn.Conv2d(p, p, 3, padding=1)],
            identity=True,
        )
        # the large kernel starts small so the branch starts close to the identity + 3x3
        nn.init.normal_(self.conv.branches[0].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.partial == x.shape[1]:
            return self.conv(x)
        head, tail = x[:, : self.partial], x[:, self.partial :]
        return torch.cat([self.conv(head), tail], dim=1)


class RepMixBlock(nn.Module):
    def __init__(
        self, channels: int, kernel_size: int = 13, partial_ratio: float = 0.25, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.rep = RepConv(channels, channels)
        self.plk = PartialLargeKernel(channels, kernel_size, partial_ratio)
        self.act = nn.GELU()
        self.project = nn.Conv2d(channels, channels, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rep(x)
        if self.plk.conv.fused is not None and not torch.is_grad_enabled():
            # deploy path: the large kernel overwrites its channels of the fresh tensor ``y`` in
            # place (as PLKSR does at inference) instead of concatenating a copy of every channel
            p = self.plk.partial
            y[:, :p] = self.plk.conv(y[:, :p])
        else:
            y = self.plk(y)
        return x + self.drop_path(self.project(self.act(y)))
