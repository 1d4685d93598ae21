"""Test helper: give a freshly built EHR-SR a non-zero head.

``build_model`` zero-initialises the head, so an untrained network returns its bicubic base
and every other weight is invisible in its output. Tests that compare outputs (determinism,
fusion, export) randomise the head first, or they would pass whatever the body computed.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_head(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    conv = model.head[0]
    with torch.no_grad():
        conv.weight.copy_(std * torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(std * torch.randn(conv.bias.shape, generator=generator))
    return model
