"""The validation set: whole images with their degraded inputs, computed once and deterministically."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ehrsr.data.bank import ImageBank, paired_hr
from ehrsr.data.degradations import degrade, image_seed
from ehrsr.data.io import parallel_map
from ehrsr.data.task import TaskConfig

__all__ = ["ValItem", "ValSet"]


@dataclass(frozen=True)
class ValItem:
    """One validation image: ``lr`` and ``hr`` are uint8 RGB ``(H, W, 3)`` numpy arrays;
    ``hr`` is cropped to exactly ``lr`` size times the scale."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


class ValSet(Sequence[ValItem]):
    """Validation images with their degraded inputs (computed once, deterministically, and cached)."""

    def __init__(
        self, hr: ImageBank, lr: ImageBank, task: TaskConfig, *, description: str = "", is_builtin: bool = False
    ) -> None:
        if len(hr) != len(lr):
            raise ValueError(f"validation set has {len(hr)} HR but {len(lr)} LR images")
        self._hr = hr
        self._lr = lr
        self.task = task
        self.scale = task.scale
        self.description = description
        self.is_builtin = is_builtin

    @classmethod
    def from_images(
        cls,
        hr_images: Sequence[np.ndarray],
        task: TaskConfig,
        *,
        names: Sequence[str] | None = None,
        lr_images: Sequence[np.ndarray] | None = None,
        description: str = "",
        is_builtin: bool = False,
        progress: bool = False,
    ) -> ValSet:
        """Build from uint8 HWC arrays; LR made by the task's pipeline with per-image seeded noise
        unless given (then HR is cropped to ``LR * scale``)."""
        names, hr_list = paired_hr(hr_images, lr_images, names, task, "a validation set")
        if lr_images is not None:
            lr_list = list(lr_images)
        else:

            def make(i: int) -> np.ndarray:
                rng = np.random.default_rng(image_seed(names[i]))  # same noise for this image every run
                return degrade(hr_list[i], task, rng)

            lr_list = parallel_map(make, range(len(hr_list)), progress, "degrading val images")
        return cls(
            ImageBank.from_images(hr_list, names),
            ImageBank.from_images(lr_list, names),
            task,
            description=description,
            is_builtin=is_builtin,
        )

    def __len__(self) -> int:
        return len(self._hr)

    def __getitem__(self, index: int) -> ValItem:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"validation index {index} out of range for {len(self)} images")
        index %= len(self)
        return ValItem(self._hr.names[index], self._lr.image(index), self._hr.image(index))

    def __iter__(self) -> Iterator[ValItem]:
        for i in range(len(self)):
            yield self[i]

    @property
    def names(self) -> list[str]:
        return self._hr.names

    @property
    def banks(self) -> tuple[ImageBank, ImageBank]:
        """The ``(hr, lr)`` storage, for the disk cache."""
        return self._hr, self._lr
