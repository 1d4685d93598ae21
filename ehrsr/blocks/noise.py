"""NoiseInjection: per-stage stochastic texture, ``x + s * noise`` (StyleGAN2, Karras et al. 2020).

``s`` is one learned scalar per stage that starts at 0, so the module starts as the identity.
Training draws fresh single-channel Gaussian noise per pixel (broadcast over channels, as
StyleGAN2 does). Evaluation is deterministic so that metrics are reproducible:

* ``eval_mode="zero"`` (default): no noise, the module is the identity in eval mode;
* ``eval_mode="seeded"``: noise from a generator seeded with ``seed`` on every call, so the same
  input always gives the same output.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["NoiseInjection"]


class NoiseInjection(nn.Module):
    def __init__(self, eval_mode: Literal["zero", "seeded"] = "zero", seed: int = 0) -> None:
        super().__init__()
        if eval_mode not in ("zero", "seeded"):
            raise ValueError(f"eval_mode must be 'zero' or 'seeded', got {eval_mode!r}")
        self.eval_mode = eval_mode
        self.seed = seed
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], 1, *x.shape[2:])
        if self.training:
            noise = torch.randn(shape, device=x.device, dtype=x.dtype)
        elif self.eval_mode == "zero":
            return x
        else:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
            noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.scale.to(x.dtype) * noise

    def extra_repr(self) -> str:
        return f"eval_mode={self.eval_mode!r}, seed={self.seed}"
