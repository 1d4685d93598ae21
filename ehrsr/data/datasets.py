"""Training and validation data: built-in sample images, HR folders, paired LR/HR folders, a disk cache.

Preparation runs once per (images, task) and is cached on disk: images are decoded, HR cropped to
a multiple of the scale, LR made by the degradation pipeline (MATLAB bicubic, blur, JPEG; see
:mod:`ehrsr.data.task`) and everything is stored as uint8. Every later trial and worker loads the
cache (a single ``.npz``) in well under a second and never decodes a PNG or runs ``imresize``.

Training patches are cut by one vectorised gather from a flat uint8 buffer that holds every
image back to back (CHW). The gather index folds in the random crop *and* the flip / 90-degree
rotation, so a batch is one indexing operation on whatever device the buffer lives on (CPU
memory, or the GPU after :meth:`TrainSet.to`). Patch positions are uniform over every valid
position of every image, which is what BasicSR's overlapping sub-images approximate; storing whole
images instead of sub-images keeps exact uniformity, costs no duplicated overlap and lets LR be
computed on whole images (no resize boundary effects at sub-image seams).

The built-in data set is a fixed split of scikit-image's colour photographs (shipped with the
package, so it works offline). Its grayscale images (camera, moon, brick, grass, ...) are left
out: replicating one channel three times would teach colour SR on images without colour.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ehrsr.data.degradations import (
    add_gaussian_noise_torch,
    degrade,
    degrade_base,
    image_seed,
    jpeg_compress,
    mod_crop,
)
from ehrsr.data.task import TaskConfig

__all__ = [
    "BUILTIN_TRAIN",
    "BUILTIN_VAL",
    "DATA_FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "TrainSet",
    "ValItem",
    "ValSet",
    "default_cache_dir",
    "list_images",
    "prepare_data",
    "read_image",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Bump when the cached content for the same inputs would change (imresize, degradations, layout).
DATA_FORMAT_VERSION = 1

# scikit-image's colour photographs, by file name in skimage.data's folder. The split is fixed so
# every run, worker and machine trains and validates on the same images. motorcycle_left/right
# are a stereo pair (nearly the same picture), so both stay on the training side.
BUILTIN_TRAIN: tuple[str, ...] = (
    "astronaut.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
)
BUILTIN_VAL: tuple[str, ...] = ("chelsea.png", "coffee.png")

# With both noise and JPEG, noise comes before compression and cannot be added on the fly; this
# many noisy+compressed variants of every training image are precomputed instead.
NOISE_VARIANTS_BEFORE_JPEG = 4


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------
# reading images


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)``.

    Grayscale becomes three equal channels, palette images are expanded, alpha is dropped,
    16-bit images are scaled to 8 bits (``round(v / 257)``).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                array = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(array[:, :, None], 3, axis=2)
            if image.mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or min(array.shape[:2]) < 1:
        raise ImageReadError(f"cannot read image {path}: unsupported layout {array.shape} {array.dtype}")
    return np.ascontiguousarray(array)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    return height, width


def list_images(folder: str | Path) -> list[Path]:
    """Image files (``IMAGE_EXTENSIONS``, any case) directly inside ``folder``, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"image folder does not exist: {folder}")
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f"; it has sub-folders ({', '.join(subfolders[:8])}): point to the one holding the images" if subfolders else ""
        raise ValueError(
            f"image folder {folder} is empty: no {'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} files{hint}"
        )
    return files


def _builtin_files(names: Sequence[str]) -> list[Path]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    files = [folder / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"built-in sample images missing from the scikit-image install: {', '.join(missing)}")
    return files


def _match_lr_files(hr_files: list[Path], lr_folder: Path, scale: int) -> list[Path]:
    """LR file for every HR file: same stem, or stem + ``x{scale}`` (DIV2K / Set5 ``LR_bicubic`` names)."""
    by_stem = {p.stem: p for p in list_images(lr_folder)}
    matched, missing = [], []
    for hr in hr_files:
        lr = by_stem.get(hr.stem) or by_stem.get(f"{hr.stem}x{scale}") or by_stem.get(f"{hr.stem}X{scale}")
        if lr is None:
            missing.append(hr.name)
        matched.append(lr)
    if missing:
        raise ValueError(
            f"no LR image in {lr_folder} for {len(missing)} HR image(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); LR files must be named like the HR file "
            f"or with an x{scale} suffix (e.g. {hr_files[0].stem}x{scale}.png)"
        )
    return matched  # type: ignore[return-value]


def _parallel_map(function: Callable, items: Sequence, progress: bool, desc: str) -> list:
    """Map over threads (PIL decoding and numpy's matrix products release the GIL), with a bar."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(function, items)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(items), desc=desc, unit="img", leave=False)
        return list(results)


# ---------------------------------------------------------------------------------------------
# flat image storage


class _ImageBank:
    """Images of different sizes back to back in one flat uint8 buffer, each stored CHW."""

    def __init__(self, buffer: torch.Tensor, shapes: torch.Tensor, names: list[str]) -> None:
        self.buffer = buffer  # (total,) uint8
        self.shapes = shapes  # (N, 2) int64: height, width (3 channels each)
        self.names = names
        sizes = 3 * shapes[:, 0] * shapes[:, 1]
        self.offsets = torch.cumsum(sizes, 0) - sizes  # (N,) start of every image

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray], names: list[str]) -> _ImageBank:
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

    def to(self, device: torch.device | str) -> _ImageBank:
        moved = _ImageBank(self.buffer.to(device), self.shapes.to(device), self.names)
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
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> _ImageBank:
        return cls(
            torch.from_numpy(np.array(arrays[f"{prefix}_buffer"])),
            torch.from_numpy(np.array(arrays[f"{prefix}_shapes"])).to(torch.int64).reshape(-1, 2),
            [str(n) for n in arrays[f"{prefix}_names"]],
        )


# ---------------------------------------------------------------------------------------------
# training set


class TrainSet:
    """Prepared training images; :meth:`sample` cuts random, augmented LR/HR patch pairs.

    ``lr`` holds ``variants`` copies of the degraded images (1 unless noise must be baked in
    before JPEG). When ``noise_sigma`` > 0 and the noise is not baked in, Gaussian noise is added
    to every LR patch on the fly (fresh noise per patch: the random part of training degradation);
    blur, downscaling and JPEG at fixed parameters are deterministic and precomputed.
    """

    def __init__(
        self,
        hr: _ImageBank,
        lr: _ImageBank,
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
        names, hr_list = _paired_hr(hr_images, lr_images, names, task, "a training set")
        if lr_images is not None:
            return cls(
                _ImageBank.from_images(hr_list, names),
                _ImageBank.from_images(list(lr_images), names),
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

            lr_list = _parallel_map(make, range(variants * len(hr_list)), progress, "degrading train images")
            lr_names = [f"{names[i % len(names)]}#{i // len(names)}" for i in range(len(lr_list))]
            return cls(
                _ImageBank.from_images(hr_list, names),
                _ImageBank.from_images(lr_list, lr_names),
                task,
                variants=variants,
                description=description,
                is_builtin=is_builtin,
            )

        def make_base(hr: np.ndarray) -> np.ndarray:
            lr = degrade_base(hr, task)
            return jpeg_compress(lr, task.jpeg_quality) if task.jpeg_quality is not None else lr

        hr_bank = _ImageBank.from_images(hr_list, names)
        if task.scale == 1 and task.blur_sigma == 0 and task.jpeg_quality is None:
            lr_bank = hr_bank  # pure denoising: the LR base is the HR image itself, stored once
        else:
            lr_bank = _ImageBank.from_images(_parallel_map(make_base, hr_list, progress, "degrading train images"), names)
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


def _paired_hr(
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


# ---------------------------------------------------------------------------------------------
# validation set


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
        self, hr: _ImageBank, lr: _ImageBank, task: TaskConfig, *, description: str = "", is_builtin: bool = False
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
        names, hr_list = _paired_hr(hr_images, lr_images, names, task, "a validation set")
        if lr_images is not None:
            lr_list = list(lr_images)
        else:

            def make(i: int) -> np.ndarray:
                rng = np.random.default_rng(image_seed(names[i]))  # same noise for this image every run
                return degrade(hr_list[i], task, rng)

            lr_list = _parallel_map(make, range(len(hr_list)), progress, "degrading val images")
        return cls(
            _ImageBank.from_images(hr_list, names),
            _ImageBank.from_images(lr_list, names),
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


# ---------------------------------------------------------------------------------------------
# disk cache


def default_cache_dir() -> Path:
    """``$EHRSR_CACHE`` if set, else ``~/.cache/ehrsr``."""
    env = os.environ.get("EHRSR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ehrsr"


def _file_fingerprint(files: Sequence[Path] | None) -> list[list]:
    if files is None:
        return []
    out = []
    for path in files:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def _cache_key(kind: str, task: TaskConfig, hr_files: Sequence[Path], lr_files: Sequence[Path] | None) -> str:
    from ehrsr import __version__

    material = {
        "format": DATA_FORMAT_VERSION,
        "package": __version__,
        "kind": kind,
        "task": task.to_dict(),
        "noise_variants_before_jpeg": NOISE_VARIANTS_BEFORE_JPEG,
        "hr": _file_fingerprint(hr_files),
        "lr": _file_fingerprint(lr_files),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _save_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a unique temporary file next to ``path``, then ``os.replace``: readers and a second
    writer never see a partial file (two workers preparing the same data both succeed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        warnings.warn(f"ignoring unreadable data cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


# ---------------------------------------------------------------------------------------------
# preparation


def _slug(folder: Path | None) -> str:
    if folder is None:
        return "builtin"
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in folder.resolve().name)
    return name[:40] or "data"


def _lr_description(task: TaskConfig, lr_dir: Path | None) -> str:
    if lr_dir is not None:
        return f"LR read from {lr_dir} (paired by file name), HR cropped to LR x{task.scale}"
    crop = f"HR cropped to a multiple of {task.scale}, " if task.scale > 1 else ""
    return f"{crop}{task.describe()}, rounded to uint8"


def _prepare_split(
    kind: str,
    task: TaskConfig,
    hr_dir: Path | None,
    lr_dir: Path | None,
    cache_root: Path,
    progress: bool,
) -> TrainSet | ValSet:
    is_builtin = hr_dir is None
    if is_builtin:
        if lr_dir is not None:
            raise ValueError(f"an LR folder ({lr_dir}) needs its HR folder; the built-in images have no LR files")
        hr_files = _builtin_files(BUILTIN_TRAIN if kind == "train" else BUILTIN_VAL)
        source = f"built-in scikit-image sample images ({kind} split: {', '.join(p.stem for p in hr_files)})"
    else:
        hr_files = list_images(hr_dir)
        source = f"{len(hr_files)} images from {hr_dir}"
    lr_files = _match_lr_files(hr_files, lr_dir, task.scale) if lr_dir is not None else None
    names = [p.stem for p in hr_files]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{hr_dir}: several images share a name ({', '.join(duplicates[:5])}); names must be unique")
    description = f"{source}; {_lr_description(task, lr_dir)}"
    cls = TrainSet if kind == "train" else ValSet

    path = cache_root / "data" / f"{kind}-{_slug(hr_dir)}-{_cache_key(kind, task, hr_files, lr_files)}.npz"
    arrays = _load_npz(path)
    if arrays is not None:
        meta = json.loads(str(arrays["meta"]))
        hr_bank = _ImageBank.from_arrays(arrays, "hr")
        lr_bank = hr_bank if meta.get("lr_is_hr") else _ImageBank.from_arrays(arrays, "lr")
        if kind == "train":
            return TrainSet(
                hr_bank,
                lr_bank,
                task,
                variants=meta["variants"],
                online_noise_sigma=meta["online_noise_sigma"],
                description=description,
                is_builtin=is_builtin,
            )
        return ValSet(hr_bank, lr_bank, task, description=description, is_builtin=is_builtin)

    hr_images = _parallel_map(read_image, hr_files, progress, f"reading {kind} images")
    lr_images = _parallel_map(read_image, lr_files, progress, f"reading {kind} LR images") if lr_files else None
    dataset = cls.from_images(
        hr_images, task, names=names, lr_images=lr_images, description=description, is_builtin=is_builtin, progress=progress
    )
    hr_bank = dataset.hr if isinstance(dataset, TrainSet) else dataset._hr
    lr_bank = dataset.lr if isinstance(dataset, TrainSet) else dataset._lr
    meta = {
        "task": task.to_dict(),
        "variants": getattr(dataset, "variants", 1),
        "online_noise_sigma": getattr(dataset, "online_noise_sigma", 0.0),
        "lr_is_hr": lr_bank is hr_bank,
    }
    arrays = {"meta": np.array(json.dumps(meta)), **hr_bank.to_arrays("hr")}
    if lr_bank is not hr_bank:
        arrays.update(lr_bank.to_arrays("lr"))
    _save_npz_atomically(path, arrays)
    return dataset


def prepare_data(
    task: TaskConfig,
    train_dir: str | Path | None = None,
    val_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    val_lr_dir: str | Path | None = None,
    train_lr_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[TrainSet, ValSet]:
    """Prepare (or load from the cache) the training and validation sets of ``task``.

    Args:
        task: the problem (scale and degradations).
        train_dir, val_dir: folders of HR images (png/jpg/bmp/tif, not searched recursively);
            ``None`` = the built-in scikit-image images (``BUILTIN_TRAIN`` / ``BUILTIN_VAL``).
        cache_dir: cache root; default ``$EHRSR_CACHE`` or ``~/.cache/ehrsr``. Entries live in
            ``<root>/data/`` and are keyed by the files (paths, sizes, modification times), the
            task and :data:`DATA_FORMAT_VERSION`: editing or adding an image makes a new entry.
        val_lr_dir, train_lr_dir: folders of matching LR images (same file name, or ``{name}x4``
            style); the LR images are then used as they are and HR is cropped to ``LR * scale``.
        progress: show progress bars while preparing.

    Returns:
        ``(train_set, val_set)``. ``train_set.is_builtin`` / ``val_set.is_builtin`` say whether the
        built-in sample images were used (callers should warn: they are a smoke-test set, not a
        benchmark).
    """
    if not isinstance(task, TaskConfig):
        raise TypeError(f"task must be a TaskConfig, got {type(task).__name__}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def as_path(value: str | Path | None) -> Path | None:
        return Path(value).expanduser() if value is not None else None

    train = _prepare_split("train", task, as_path(train_dir), as_path(train_lr_dir), cache_root, progress)
    val = _prepare_split("val", task, as_path(val_dir), as_path(val_lr_dir), cache_root, progress)
    assert isinstance(train, TrainSet) and isinstance(val, ValSet)
    if val.is_builtin:  # two photographs give no statistical power: evaluate fixed tiles of them
        from ehrsr.data.val_tiles import tile_val_set

        val = tile_val_set(val)
    return train, val

