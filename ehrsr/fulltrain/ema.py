"""Exponential moving average of the weights (Polyak averaging; BasicSR's ``net_g_ema``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point
parameter and buffer; integer buffers are copied. SR models evaluated with their EMA weights gain
a few hundredths of a dB and show smoother validation curves, which is why BasicSR and neosr train
with ``decay = 0.999`` and publish the EMA weights. The average starts from the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """An eval-mode copy of ``model`` whose weights follow the running average of the model's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights (same architecture)."""
        ema_state = self.module.state_dict()
        weight = 1.0 - self.decay
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                # lerp_(v, w) = target + w * (v - target) = decay * target + (1 - decay) * v
                target.lerp_(value.detach().to(target.dtype), weight)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
