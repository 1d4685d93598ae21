"""The full-training recipe: the field's usual settings for light SR networks, each overridable.

Every default below carries its reason and where it comes from. The sources are the public
training option files of BasicSR (EDSR, RCAN, SwinIR-light, HAT) and neosr, and the papers they
reproduce; ``docs/full_training.md`` lists them. A recipe is written into every run folder
(``recipe.yaml``) and stored in every checkpoint, so a resume can refuse to continue a run with
different settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ehrsr.config import dataclass_from_dict, to_plain
from ehrsr.errors import UserError

__all__ = ["FullTrainError", "Recipe", "load_recipe_file", "parse_overrides"]


class FullTrainError(UserError, ValueError):
    """Bad input to full training or evaluation (a file, a setting, a resume that cannot work).
    The message is one line naming the problem; the CLI prints it and exits with status 2."""


@dataclass(frozen=True)
class Recipe:
    """How to train one configuration fully. Frozen: a run's recipe never changes after it starts."""

    steps: int = 500_000  # BasicSR's light-SR runs (SwinIR-light, EDSR-baseline x4): 500k iterations
    batch_size: int = 16  # EDSR / RCAN / BasicSR default 16; SwinIR-light and HAT use 32-64 on GPUs
    patch_size: int = 48  # LR patch side: EDSR / RCAN use 48 (HR 192 at x4); SwinIR uses 64
    optimizer: Literal["adam", "adamw"] = "adam"  # BasicSR's option files use Adam for SR
    lr: float = 5e-4  # light SR uses 2e-4 (SwinIR-light) to 1e-3 (SAFMN, SPAN); 5e-4 sits between
    betas: tuple[float, ...] = (0.9, 0.99)  # BasicSR's beta2 = 0.99 instead of Adam's 0.999
    weight_decay: float = 0.0  # BasicSR: 0 for SR; AdamW users (NAFNet) set it, biases/norms excluded
    loss: Literal["l1", "mse", "charbonnier"] = "l1"  # L1: EDSR showed it beats L2 for PSNR; standard since
    schedule: Literal["cosine", "multistep"] = "cosine"  # cosine to 0 (NAFNet, SAFMN) or halving steps
    milestones: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)  # multistep: SwinIR's 250k/400k/450k/475k of 500k
    gamma: float = 0.5  # multistep: the learning rate halves at each milestone (EDSR, SwinIR)
    warmup_steps: int = 0  # BasicSR's warmup_iter is -1 (none) for SR; raise it for unstable attention
    ema_decay: float = 0.999  # BasicSR / neosr ema_decay; 0 switches EMA off (the raw weights are used)
    ema_warmup: bool = True  # decay min(ema_decay, (1+t)/(10+t)) (TensorFlow's EMA): short runs are not stuck at init
    grad_clip: float | None = 1.0  # global-norm clip (neosr's grad_clip; the search's brief runs use 1.0)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA only (fp32 on CPU)
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on CUDA only, where convs run faster
    seed: int = 0  # seeds patch sampling and torch's RNG (noise injection, dropout)
    val_every: int = 5000  # BasicSR's val_freq for light SR
    checkpoint_every: int = 5000  # BasicSR's save_checkpoint_freq
    lpips: bool = False  # LPIPS in the final evaluation and the card (needs the pyiqa weights offline)

    def __post_init__(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise FullTrainError(f"recipe: {message}")

        for item in dataclasses.fields(self):  # inf and nan pass comparisons like "lr > 0": refuse them first
            value = getattr(self, item.name)
            numbers = value if isinstance(value, tuple) else (value,)
            check(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                  f"{item.name} must be finite, got {value}")
        for name in ("steps", "batch_size", "patch_size", "val_every", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        from ehrsr.training import LOSSES  # the one list of losses training implements

        check(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        check(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        check(all(0 < m < 1 for m in self.milestones), f"milestones are fractions of steps in (0, 1), got {self.milestones}")
        check(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build from plain data; unknown keys and wrong types raise ``FullTrainError`` naming them."""
        try:
            return dataclass_from_dict(cls, dict(data), path="")
        except FullTrainError:
            raise
        except ValueError as exc:
            raise FullTrainError(f"recipe: {str(exc).replace('configuration key', 'recipe key')}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (validated like ``from_dict``)."""
        return Recipe.from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def learning_rate(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based) under the chosen schedule."""
        from ehrsr.training import learning_rate_at

        if self.schedule == "cosine":
            return learning_rate_at(step, base_lr=self.lr, steps=self.steps, warmup_steps=self.warmup_steps)
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        passed = sum(step >= round(m * self.steps) for m in self.milestones)
        return self.lr * self.gamma**passed


RECIPE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe))


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """The overrides in a YAML/JSON recipe file (a mapping of recipe keys), validated by key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FullTrainError(f"cannot read recipe file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FullTrainError(f"recipe file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FullTrainError(f"recipe file {path} must hold a mapping of recipe keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise FullTrainError(f"recipe file {path}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(RECIPE_KEYS)}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=2e-4", "schedule=multistep"]`` -> a dict, values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FullTrainError(f"--set {item!r}: expected KEY=VALUE (e.g. lr=2e-4)")
        if key not in RECIPE_KEYS:
            raise FullTrainError(f"--set {item!r}: unknown recipe key {key!r}; valid keys: {', '.join(RECIPE_KEYS)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise FullTrainError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        out[key] = value
    return out
