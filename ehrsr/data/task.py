"""TaskConfig: which restoration problem the data poses (SR scale and degradation parameters).

The degradation model is the classical one (e.g. Zhang et al., "Learning a Single Convolutional
Super-Resolution Network for Multiple Degradations", CVPR 2018; the first-order model of
Real-ESRGAN): ``LR = JPEG(round(down_s(blur(HR))) + noise)``, each step optional:

1. Gaussian blur of the HR image (``blur_sigma`` > 0),
2. MATLAB bicubic downscaling by ``scale`` (> 1), then rounding to uint8 (an LR image saved as PNG),
3. additive white Gaussian noise of standard deviation ``noise_sigma`` grey levels (0-255 units),
   clipped to [0, 255] and rounded to uint8,
4. JPEG compression at ``jpeg_quality``.

``task`` names the main problem and picks the defaults of the other fields: ``sr`` is x4
bicubic super-resolution, ``denoise`` is sigma 25 denoising, ``deblur`` is Gaussian deblurring
with sigma 1.6 (the "Gaussian blur" setting of IRCNN / USRNet), ``jpeg`` is JPEG artefact
removal at quality 10 (the hardest of ARCNN's 10/20/30/40); the three restoration tasks default
to scale 1. Any field may be set explicitly, so ``{"task": "sr", "noise_sigma": 5}`` is x4 SR of
noisy images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ehrsr.config import dataclass_from_dict, to_plain
from ehrsr.errors import ConfigError

__all__ = ["TASKS", "TaskConfig"]

TASKS: tuple[str, ...] = ("sr", "denoise", "deblur", "jpeg")

# Per-task defaults of the fields left unset (None). Reasons in the module docstring.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sr": {"scale": 4, "noise_sigma": 0.0, "blur_sigma": 0.0},
    "denoise": {"scale": 1, "noise_sigma": 25.0, "blur_sigma": 0.0},
    "deblur": {"scale": 1, "noise_sigma": 0.0, "blur_sigma": 1.6},
    "jpeg": {"scale": 1, "noise_sigma": 0.0, "blur_sigma": 0.0, "jpeg_quality": 10},
}


@dataclass(frozen=True)
class TaskConfig:
    """The data task. Unset fields (``None``) take the task's defaults; ``to_dict`` shows them resolved."""

    task: Literal["sr", "denoise", "deblur", "jpeg"] = "sr"
    scale: int | None = None  # 1 = restoration; 2, 3, 4 = SR (default: 4 for sr, else 1)
    noise_sigma: float | None = None  # Gaussian noise std in grey levels 0-255 (denoise: 25)
    blur_sigma: float | None = None  # Gaussian blur std in HR pixels, applied before downscaling (deblur: 1.6)
    jpeg_quality: int | None = None  # JPEG quality 1-100; None = no JPEG (jpeg: 10)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(map(repr, TASKS))}, got {self.task!r}")
        for name, value in _DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen dataclass: resolve defaults once
        _validate(self)
        # Sigmas as floats, so TaskConfig(noise_sigma=25) == TaskConfig.from_dict({"noise_sigma": 25}).
        object.__setattr__(self, "noise_sigma", float(self.noise_sigma))
        object.__setattr__(self, "blur_sigma", float(self.blur_sigma))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        """Build from plain data; unknown keys, wrong types and impossible values raise ``ValueError``."""
        return dataclass_from_dict(cls, data, path="")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with every default resolved; ``from_dict(to_dict())`` equals ``self``."""
        return to_plain(self)

    @property
    def slug(self) -> str:
        """Short name for study names and logs: ``sr-x4``, ``denoise``, ``deblur-x2``."""
        if self.task == "sr" or self.scale > 1:
            return f"{self.task}-x{self.scale}"
        return self.task

    @property
    def is_restoration(self) -> bool:
        return self.scale == 1

    @property
    def has_degradation(self) -> bool:
        """True when anything besides bicubic downscaling is applied (blur, noise or JPEG)."""
        return self.blur_sigma > 0 or self.noise_sigma > 0 or self.jpeg_quality is not None

    def describe(self) -> str:
        """One line, e.g. ``x4 SR (MATLAB bicubic)`` or ``denoising (Gaussian noise sigma=25)``."""
        steps = []
        if self.blur_sigma > 0:
            steps.append(f"Gaussian blur sigma={self.blur_sigma:g}")
        if self.scale > 1:
            steps.append(f"MATLAB bicubic x1/{self.scale}")
        if self.noise_sigma > 0:
            steps.append(f"Gaussian noise sigma={self.noise_sigma:g}/255")
        if self.jpeg_quality is not None:
            steps.append(f"JPEG q={self.jpeg_quality}")
        head = {
            "sr": f"x{self.scale} SR",
            "denoise": "denoising" if self.scale == 1 else f"x{self.scale} SR + denoising",
            "deblur": "deblurring" if self.scale == 1 else f"x{self.scale} SR + deblurring",
            "jpeg": "JPEG artefact removal" if self.scale == 1 else f"x{self.scale} SR + JPEG artefact removal",
        }[self.task]
        return f"{head} (LR = {', then '.join(steps)})"


def _validate(cfg: TaskConfig) -> None:
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    check(
        isinstance(cfg.scale, int) and not isinstance(cfg.scale, bool) and cfg.scale in (1, 2, 3, 4),
        f"scale must be 1, 2, 3 or 4, got {cfg.scale!r}",
    )
    check(
        cfg.task != "sr" or cfg.scale > 1,
        "task 'sr' needs scale 2, 3 or 4; for scale 1 use task 'denoise', 'deblur' or 'jpeg'",
    )
    for name, upper in (("noise_sigma", 255.0), ("blur_sigma", 20.0)):
        value = getattr(cfg, name)
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= upper,
            f"{name} must be a number in [0, {upper:g}], got {value!r}",
        )
    if cfg.jpeg_quality is not None:
        check(
            isinstance(cfg.jpeg_quality, int)
            and not isinstance(cfg.jpeg_quality, bool)
            and 1 <= cfg.jpeg_quality <= 100,
            f"jpeg_quality must be an integer in 1..100 or null (no JPEG), got {cfg.jpeg_quality!r}",
        )
    check(cfg.task != "denoise" or cfg.noise_sigma > 0, "task 'denoise' needs noise_sigma > 0")
    check(cfg.task != "deblur" or cfg.blur_sigma > 0, "task 'deblur' needs blur_sigma > 0")
