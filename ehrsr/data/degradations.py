"""Degradations that turn an HR image into the model's input: blur, bicubic downscaling, noise, JPEG.

The pipeline and its defaults are described in :mod:`ehrsr.data.task`. Everything here works on
uint8 RGB images ``(H, W, 3)`` as they are stored on disk, and every intermediate that would be a
saved image in a benchmark (the downscaled LR, the noisy image) is rounded to uint8, so the
model sees the same kind of input in training and validation as from a folder of PNG files.

Randomness: validation degradations are deterministic per image (the noise generator is seeded
from the image's name, :func:`image_seed`); training noise is drawn fresh for every patch by
:func:`add_gaussian_noise_torch`, on the device, at the cost of one ``randn``.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch
from PIL import Image

from ehrsr.data.imresize import imresize
from ehrsr.data.task import TaskConfig

__all__ = [
    "add_gaussian_noise",
    "add_gaussian_noise_torch",
    "degrade",
    "degrade_base",
    "gaussian_blur",
    "gaussian_kernel",
    "image_seed",
    "jpeg_compress",
    "mod_crop",
    "quantize",
]


def quantize(img: np.ndarray) -> np.ndarray:
    """Float image in grey levels (0-255) -> uint8: clip, then round half to even (numpy's rule)."""
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of ``scale`` (BasicSR's ``mod_crop``)."""
    height, width = img.shape[:2]
    return img[: height - height % scale, : width - width % scale]


def image_seed(name: str, salt: int = 0) -> int:
    """A stable 32-bit seed from an image name (CRC-32), so validation noise is the same in every run."""
    return zlib.crc32(f"{name}#{salt}".encode())


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma``, radius ``round(4 sigma)`` (scipy's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float ``(H, W[, C])`` image, symmetric (mirror) boundaries.

    The symmetric boundary (``d c b a | a b c d``) is MATLAB's ``imfilter(..., 'symmetric')`` and
    avoids the dark frame that zero padding would add.
    """
    if sigma <= 0:
        return img.astype(np.float64)
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=axis)  # (..., taps)
        out = windows @ kernel
    return out


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 RGB image as JPEG (libjpeg via Pillow, 4:2:0 chroma) and decode it again."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 image + N(0, sigma^2) in grey levels, clipped and rounded back to uint8."""
    noisy = img.astype(np.float64) + rng.standard_normal(img.shape) * sigma
    return quantize(noisy)


def add_gaussian_noise_torch(img: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Float image in [0, 1] (on uint8 levels) + N(0, (sigma/255)^2), clipped, rounded to uint8 levels.

    The same formula as :func:`add_gaussian_noise`, in torch, for fresh noise on every training patch.
    The noise is drawn on ``generator``'s device and moved to the image's device if they differ.
    """
    noise = torch.randn(img.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noisy = img * 255.0 + noise.to(img.device) * sigma
    return noisy.clamp_(0.0, 255.0).round_().div_(255.0)


def degrade_base(hr: np.ndarray, task: TaskConfig) -> np.ndarray:
    """Deterministic part of the degradation: blur, then MATLAB bicubic downscaling, rounded to uint8.

    ``hr`` must already be cropped to a multiple of the scale (:func:`mod_crop`). With no blur and
    scale 1 the input is returned unchanged.
    """
    if hr.shape[0] % task.scale or hr.shape[1] % task.scale:
        raise ValueError(f"HR size {hr.shape[:2]} is not a multiple of the scale {task.scale}; mod_crop it first")
    if task.blur_sigma == 0 and task.scale == 1:
        return hr
    img = hr.astype(np.float64) / 255.0
    if task.blur_sigma > 0:
        img = gaussian_blur(img, task.blur_sigma)
    if task.scale > 1:
        img = imresize(img, 1.0 / task.scale)
    return quantize(img * 255.0)


def degrade(hr: np.ndarray, task: TaskConfig, rng: np.random.Generator | None) -> np.ndarray:
    """The whole pipeline on one mod-cropped uint8 HR image: ``JPEG(noise(degrade_base(hr)))``.

    ``rng`` draws the noise; it is required when ``task.noise_sigma > 0``.
    """
    lr = degrade_base(hr, task)
    if task.noise_sigma > 0:
        if rng is None:
            raise ValueError("degrade needs a random generator when noise_sigma > 0")
        lr = add_gaussian_noise(lr, task.noise_sigma, rng)
    if task.jpeg_quality is not None:
        lr = jpeg_compress(lr, task.jpeg_quality)
    return lr
