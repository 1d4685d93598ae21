"""Helpers shared by the data / metrics / training tests: synthetic images and LPIPS weight files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with smooth gradients, edges and fine texture (so SR has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(0, 6.28)
        img[:, :, c] = 0.5 + 0.3 * np.sin(fx * x + phase) * np.cos(fy * y) + 0.1 * ((x // 7 + y // 5) % 2)
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_lpips_weights(folder: Path, seed: int = 0) -> Path:
    """Write randomly initialised weight files of the right architecture under pyiqa's file names.

    The AlexNet classifier (unused by LPIPS, 95% of the parameters) is stored as an expanded
    zero tensor, which torch saves as a one-element storage: the file stays ~10 MB.
    LPIPS linear weights are non-negative like the trained ones (LPIPS clamps them at >= 0).
    """
    import torchvision

    from ehrsr.metrics import ALEXNET_WEIGHTS_FILE, LPIPS_WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    alexnet = torchvision.models.alexnet()
    state = {
        k: (v if k.startswith("features") else torch.zeros(1, dtype=v.dtype).expand(v.shape))
        for k, v in alexnet.state_dict().items()
    }
    torch.save(state, folder / ALEXNET_WEIGHTS_FILE)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lin, folder / LPIPS_WEIGHTS_FILE)
    return folder
