"""Small shared pieces: channels-first LayerNorm, SimpleGate, DropPath, padding helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DropPath",
    "LayerNorm2d",
    "SimpleGate",
    "pad_to_multiple",
    "scaled_residual",
]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` tensor (NAFNet's LayerNorm2d).

    Implemented with ``F.layer_norm`` on a channels-last view so that the profilers see one
    ``layer_norm`` op (counted by fvcore's default rule) and autograd uses the fused kernel.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        # the normalised shape comes from the parameter, a constant for tracers and exporters
        x = F.layer_norm(x, self.weight.shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class SimpleGate(nn.Module):
    """NAFNet's SimpleGate: split channels in two halves and multiply them (a GLU without sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016); identity in eval mode or at rate 0."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Pad H and W at the bottom/right up to a multiple; returns the padded tensor and pad sizes.

    Reflection keeps image statistics at the border; when the pad is not smaller than the side
    (tiny inputs) reflection is impossible and replication is used instead.
    """
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, 0, 0
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), pad_h, pad_w


def scaled_residual(channels: int, init: float = 0.0) -> nn.Parameter:
    """Per-channel residual scale (NAFNet's beta/gamma); 0 makes the branch start as identity."""
    return nn.Parameter(torch.full((1, channels, 1, 1), float(init)))
