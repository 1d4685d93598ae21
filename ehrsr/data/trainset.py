"""The training set: prepared LR/HR images and random, augmented patch sampling.

Patch positions are uniform over every valid position of every image (what BasicSR's
overlapping sub-images approximate), followed by one of the 8 flips / 90-degree rotations; a
batch is cut in one operation from the flat storage of :mod:`ehrsr.data.bank`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ehrsr.data.bank import ImageBank, paired_hr
from ehrsr.data.degradations import add_gaussian_noise_torch, degrade, degrade_base, image_seed, jpeg_compress
from ehrsr.data.io import parallel_map
from ehrsr.data.task import TaskConfig

__all__ = ["NOISE_VARIANTS_BEFORE_JPEG", "TrainSet"]

# With both noise and JPEG, noise comes before compression and cannot be added on the fly; this
# many noisy+compressed variants of every training image are precomputed instead.
NOISE_VARIANTS_BEFORE_JPEG = 4


class TrainSet:
    """Prepared training images; :meth:`sample` cuts random, augmented LR/HR patch pairs.

    ``lr`` holds ``variants`` copies of the degraded images (1 unless noise must be baked in
    before JPEG). When ``noise_sigma`` > 0 and the noise is not baked in, Gaussian noise is added
    to every LR patch on the fly (fresh noise per patch: the random part of training degradation);
    blur, downscaling and JPEG at fixed parameters are deterministic and precomputed.
    """

    def __init__(
        self,
        hr: ImageBank,
        lr: ImageBank,
        task: TaskConfig,
        *,
        variants: int = 1,
        online_noise_sigma: float = 0.0,
        description: str = "",
        is_builtin: bool = False,
    ) -> None:
        if len(lr) != variants * len(hr):
            raise ValueError(f"LR bank holds {len(lr)} images, expected {variants} x {len(hr)}")
        self.hr = hr
        self.lr = lr
        self.task = task
        self.scale = task.scale
        self.variants = variants
        self.online_noise_sigma = online_noise_sigma
        self.description = description
        self.is_builtin = is_builtin
        self._position_counts: dict[int, torch.Tensor] = {}

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
    ) -> TrainSet:
        """Build from uint8 HWC RGB arrays (HR is mod-cropped to the scale; LR made by the task's
        degradation unless given, in which case HR is cropped to ``LR * scale``)."""
        names, hr_list = paired_hr(hr_images, lr_images, names, task, "a training set")
        if lr_images is not None:
            return cls(
                ImageBank.from_images(hr_list, names),
                ImageBank.from_images(list(lr_images), names),
                task,
                description=description,
                is_builtin=is_builtin,
            )
        for hr, name in zip(hr_list, names):
            if min(hr.shape[:2]) < task.scale:
                raise ValueError(f"training image {name} ({hr.shape[1]}x{hr.shape[0]}) is smaller than the scale")
        noise = task.noise_sigma > 0
        if noise and task.jpeg_quality is not None:
            # Noise precedes JPEG: bake NOISE_VARIANTS_BEFORE_JPEG random draws into the cache.
            variants = NOISE_VARIANTS_BEFORE_JPEG

            def make(i: int) -> np.ndarray:
                image, variant = i % len(hr_list), i // len(hr_list)
                rng = np.random.default_rng(image_seed(names[image], salt=1000 + variant))
                return degrade(hr_list[image], task, rng)

            lr_list = parallel_map(make, range(variants * len(hr_list)), progress, "degrading train images")
            lr_names = [f"{names[i % len(names)]}#{i // len(names)}" for i in range(len(lr_list))]
            return cls(
                ImageBank.from_images(hr_list, names),
                ImageBank.from_images(lr_list, lr_names),
                task,
                variants=variants,
                description=description,
                is_builtin=is_builtin,
            )

        def make_base(hr: np.ndarray) -> np.ndarray:
            lr = degrade_base(hr, task)
            return jpeg_compress(lr, task.jpeg_quality) if task.jpeg_quality is not None else lr

        hr_bank = ImageBank.from_images(hr_list, names)
        if task.scale == 1 and task.blur_sigma == 0 and task.jpeg_quality is None:
            lr_bank = hr_bank  # pure denoising: the LR base is the HR image itself, stored once
        else:
            lr_bank = ImageBank.from_images(parallel_map(make_base, hr_list, progress, "degrading train images"), names)
        return cls(
            hr_bank,
            lr_bank,
            task,
            online_noise_sigma=task.noise_sigma if noise else 0.0,
            description=description,
            is_builtin=is_builtin,
        )

    # -- basic properties ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.hr)

    @property
    def names(self) -> list[str]:
        return self.hr.names

    @property
    def device(self) -> torch.device:
        return self.hr.buffer.device

    @property
    def nbytes(self) -> int:
        lr_bytes = 0 if self.lr is self.hr else self.lr.buffer.numel()
        return self.hr.buffer.numel() + lr_bytes

    @property
    def max_patch_size(self) -> int:
        """Largest LR patch size that fits in at least one image."""
        lr_shapes = self.lr.shapes[: len(self.hr)]
        return int(lr_shapes.min(dim=1).values.max())

    def to(self, device: torch.device | str) -> TrainSet:
        """Move the uint8 images to ``device`` (e.g. the GPU, once per trial); returns ``self``."""
        shared = self.lr is self.hr
        self.hr = self.hr.to(device)
        self.lr = self.hr if shared else self.lr.to(device)
        self._position_counts = {}
        return self

    def _counts(self, patch_size: int) -> torch.Tensor:
        """Number of valid LR patch positions in each image (the sampling weights)."""
        counts = self._position_counts.get(patch_size)
        if counts is None:
            lr_shapes = self.lr.shapes[: len(self.hr)].to(torch.float64)
            counts = ((lr_shapes - patch_size + 1).clamp(min=0)).prod(dim=1)
            if float(counts.sum()) == 0:
                raise ValueError(
                    f"patch_size {patch_size} (LR pixels) is larger than every training image; "
                    f"the largest patch that fits is {self.max_patch_size}"
                )
            self._position_counts[patch_size] = counts
        return counts

    # -- sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        batch_size: int,
        patch_size: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random LR/HR patch pairs.

        Args:
            batch_size: patches per batch.
            patch_size: LR patch side in pixels; HR patches are ``patch_size * scale``.
            generator: seeds everything random here (image, position, transform, noise); keep it
                on the device the set lives on so nothing is drawn on the CPU for a GPU batch.
            device: where the float patches go (default: the set's device).

        Returns:
            ``(lr, hr)`` float32 tensors in [0, 1], ``(B, 3, p, p)`` and ``(B, 3, p*s, p*s)``.
            Every position of every image is equally likely (images weighted by their number of
            valid positions), then one of the 8 flips / 90-degree rotations, the same for LR and HR.
        """
        if batch_size < 1 or patch_size < 1:
            raise ValueError(f"batch_size and patch_size must be >= 1, got {batch_size} and {patch_size}")
        device = torch.device(device) if device is not None else self.device
        draw_device = generator.device
        counts = self._counts(patch_size).to(draw_device)
        index = torch.multinomial(counts, batch_size, replacement=True, generator=generator)
        lr_shapes = self.lr.shapes[: len(self.hr)].to(draw_device)[index]  # (B, 2)
        spans = lr_shapes - patch_size + 1  # valid positions per axis
        uniform = torch.rand(batch_size, 2, generator=generator, device=draw_device, dtype=torch.float64)
        corner = torch.minimum((uniform * spans).long(), spans - 1)  # (B, 2) LR top/left
        transform = torch.randint(0, 8, (batch_size,), generator=generator, device=draw_device)
        variant = (
            torch.randint(0, self.variants, (batch_size,), generator=generator, device=draw_device)
            if self.variants > 1
            else torch.zeros_like(index)
        )
        here = self.device
        index, corner, transform, variant = (t.to(here) for t in (index, corner, transform, variant))
        top, left = corner[:, 0], corner[:, 1]
        lr_index = index + variant * len(self.hr)
        hr_size = patch_size * self.scale
        if here.type == "cpu":
            lr = torch.empty(batch_size, 3, patch_size, patch_size)
            hr = torch.empty(batch_size, 3, hr_size, hr_size)
            self.lr.crop_loop(lr_index, top, left, patch_size, transform, lr)
            self.hr.crop_loop(index, top * self.scale, left * self.scale, hr_size, transform, hr)
            lr, hr = lr.to(device).mul_(1.0 / 255.0), hr.to(device).mul_(1.0 / 255.0)
        else:
            lr = self.lr.gather(lr_index, top, left, patch_size, transform)
            hr = self.hr.gather(index, top * self.scale, left * self.scale, hr_size, transform)
            lr = lr.to(device, non_blocking=True).float().mul_(1.0 / 255.0)
            hr = hr.to(device, non_blocking=True).float().mul_(1.0 / 255.0)
        if self.online_noise_sigma > 0:
            lr = add_gaussian_noise_torch(lr, self.online_noise_sigma, generator)
        return lr, hr
