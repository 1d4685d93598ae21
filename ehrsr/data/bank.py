"""Flat image storage: images of different sizes back to back in one uint8 buffer, and patch cropping.

Training patches are cut by one vectorised gather from a flat uint8 buffer that holds every
image back to back (CHW). The gather index folds in the random crop *and* the flip / 90-degree
rotation, so a batch is one indexing operation on whatever device the buffer lives on (CPU
memory, or the GPU). Storing whole images instead of BasicSR-style overlapping sub-images keeps
patch positions exactly uniform, costs no duplicated overlap and lets LR be computed on whole
images (no resize boundary effects at sub-image seams).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ehrsr.data.degradations import mod_crop
from ehrsr.data.task import TaskConfig

__all__ = ["ImageBank", "paired_hr"]


class ImageBank:
    """Images of different sizes back to back in one flat uint8 buffer, each stored CHW."""

    def __init__(self, buffer: torch.Tensor, shapes: torch.Tensor, names: list[str]) -> None:
        self.buffer = buffer  # (total,) uint8
        self.shapes = shapes  # (N, 2) int64: height, width (3 channels each)
        self.names = names
        sizes = 3 * shapes[:, 0] * shapes[:, 1]
        self.offsets = torch.cumsum(sizes, 0) - sizes  # (N,) start of every image

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray], names: list[str]) -> ImageBank:
        shapes = torch.tensor([img.shape[:2] for img in images], dtype=torch.int64).reshape(-1, 2)
        parts = [torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).reshape(-1) for img in images]
        buffer = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
        return cls(buffer, shapes, list(names))

    def __len__(self) -> int:
        return len(self.names)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as a uint8 HWC numpy array (a copy)."""
        height, width = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        chw = self.buffer[start : start + 3 * height * width].reshape(3, height, width)
        return chw.permute(1, 2, 0).cpu().numpy().copy()

    def to(self, device: torch.device | str) -> ImageBank:
        moved = ImageBank(self.buffer.to(device), self.shapes.to(device), self.names)
        return moved

    def gather(
        self, index: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, transform: torch.Tensor
    ) -> torch.Tensor:
        """Square crops ``(B, 3, size, size)`` at (top, left) of images ``index``, each under one of the
        8 flips / 90-degree rotations: bit 0 transposes the crop, then bit 1 flips the patch's rows
        and bit 2 its columns (exactly what :meth:`crop_loop` does with views).

        The flat source index of patch pixel (i, j) is ``start + c*H*W + (top + i')*W + left + j'``
        (``i'``, ``j'`` = i, j or their flips), or with i' and j' swapped for a transposed patch:
        a term in i plus a term in j, so the index is built from (B, size) vectors with one
        broadcast add, then a single ``gather``.
        """
        steps = torch.arange(size, device=self.buffer.device).view(1, size)
        steps_i = torch.where((transform & 2 == 2).view(-1, 1), size - 1 - steps, steps)  # (B, size)
        steps_j = torch.where((transform & 4 == 4).view(-1, 1), size - 1 - steps, steps)
        transposed = (transform & 1 == 1).view(-1, 1)
        width = self.shapes[index, 1].view(-1, 1)
        top, left = top.view(-1, 1), left.view(-1, 1)
        term_i = torch.where(transposed, left + steps_i, (top + steps_i) * width)  # varies along patch rows
        term_j = torch.where(transposed, (top + steps_j) * width, left + steps_j)  # varies along patch columns
        plane = self.shapes[index, 0] * self.shapes[index, 1]
        channel_start = self.offsets[index].view(-1, 1) + torch.arange(3, device=self.buffer.device) * plane.view(-1, 1)
        flat = (channel_start.unsqueeze(2) + term_i.unsqueeze(1)).unsqueeze(3) + term_j.view(-1, 1, 1, size)
        return self.buffer.gather(0, flat.view(-1)).view(-1, 3, size, size)

    def crop_loop(
        self,
        index: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        size: int,
        transform: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Same crops as :meth:`gather`, written into ``out`` (any dtype) one patch at a time.

        On the CPU this is several times faster than :meth:`gather`: each patch is a strided view
        (flips and the transpose are views too) copied and converted in one pass, with no index
        arithmetic over every pixel. On a GPU the single gather kernel wins.
        """
        rows = index.tolist(), top.tolist(), left.tolist(), transform.tolist()
        offsets, shapes = self.offsets, self.shapes
        for b, (i, y, x, t) in enumerate(zip(*rows)):
            height, width = int(shapes[i, 0]), int(shapes[i, 1])
            start = int(offsets[i])
            image = self.buffer[start : start + 3 * height * width].view(3, height, width)
            patch = image[:, y : y + size, x : x + size]
            if t & 1:
                patch = patch.transpose(1, 2)
            if t & 2:
                patch = patch.flip(1)
            if t & 4:
                patch = patch.flip(2)
            out[b].copy_(patch)
        return out

    # -- cache (de)serialisation ----------------------------------------------------------------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_buffer": self.buffer.cpu().numpy(),
            f"{prefix}_shapes": self.shapes.cpu().numpy(),
            f"{prefix}_names": np.array(self.names, dtype=np.str_),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> ImageBank:
        return cls(
            _as_tensor(arrays[f"{prefix}_buffer"]),
            torch.from_numpy(np.array(arrays[f"{prefix}_shapes"])).to(torch.int64).reshape(-1, 2),
            [str(n) for n in arrays[f"{prefix}_names"]],
        )


def paired_hr(
    hr_images: Sequence[np.ndarray],
    lr_images: Sequence[np.ndarray] | None,
    names: Sequence[str] | None,
    task: TaskConfig,
    what: str,
) -> tuple[list[str], list[np.ndarray]]:
    """Names (default ``image0000``...) and the HR images a set keeps: cropped to ``LR * scale``
    when LR images are given (they must pair up one to one), else mod-cropped to the scale."""
    names = list(names) if names is not None else [f"image{i:04d}" for i in range(len(hr_images))]
    if not hr_images:
        raise ValueError(f"{what} needs at least one image")
    if lr_images is None:
        return names, [mod_crop(hr, task.scale) for hr in hr_images]
    if len(lr_images) != len(hr_images):
        raise ValueError(f"got {len(hr_images)} HR but {len(lr_images)} LR images; they must pair up")
    return names, [_crop_to_lr(hr, lr, task.scale, name) for hr, lr, name in zip(hr_images, lr_images, names)]


def _crop_to_lr(hr: np.ndarray, lr: np.ndarray, scale: int, name: str) -> np.ndarray:
    """Crop HR to exactly ``LR * scale`` (BasicSR's paired-data rule), checking the sizes agree."""
    want_h, want_w = lr.shape[0] * scale, lr.shape[1] * scale
    if not (want_h <= hr.shape[0] < want_h + scale and want_w <= hr.shape[1] < want_w + scale):
        raise ValueError(
            f"{name}: LR image is {lr.shape[1]}x{lr.shape[0]} and HR {hr.shape[1]}x{hr.shape[0]}, "
            f"which is not a x{scale} pair (HR should be {want_w}x{want_h}, up to {scale - 1} extra pixels)"
        )
    return np.ascontiguousarray(hr[:want_h, :want_w])


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array`` without copying a read-only memory map (``cache.load_npz``): the
    workers of one machine then share one copy of the images. Nothing writes into an image buffer."""
    if isinstance(array, np.memmap) and not array.flags.writeable:
        with warnings.catch_warnings():  # torch warns that the array is not writable: it never is written
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(np.array(array))
