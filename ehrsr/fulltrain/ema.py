"""Exponential moving average of the weights (Polyak averaging; BasicSR's ``net_g_ema``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point
parameter and buffer; integer buffers are copied. SR models evaluated with their EMA weights gain
a few hundredths of a dB and show smoother validation curves, which is why BasicSR and neosr train
with ``decay = 0.999`` and publish the EMA weights. The average starts from the initial weights.

With ``warmup`` the decay of update ``t`` (0-based) is ``min(decay, (1 + t) / (10 + t))``, the
``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``: at 0.999 from the first step,
a run of a few hundred steps would still hold ~70 % of the untrained weights (measured in
``benchmarks/full_training.py``); the warm-up reaches 0.999 after about 9,000 updates, so long
runs average exactly as BasicSR does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """An eval-mode copy of ``model`` whose weights follow the running average of the model's."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # averaging steps done (part of the checkpoint: the warm-up depends on it)
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights (same architecture)."""
        ema_state = self.module.state_dict()
        weight = 1.0 - self.decay_at(self.updates)
        self.updates += 1
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                # lerp_(v, w) = target + w * (v - target) = decay * target + (1 - decay) * v
                target.lerp_(value.detach().to(target.dtype), weight)
            else:
                target.copy_(value)

    def decay_at(self, update: int) -> float:
        """The decay of update number ``update`` (0-based)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
