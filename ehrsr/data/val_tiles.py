"""Fixed tiles of the built-in validation images as separate evaluation units.

The built-in validation split has two photographs (chelsea, coffee). A mean over two images gives
a paired comparison one degree of freedom: almost no power (``docs/statistics.md``). Cutting each
degraded image into fixed, non-overlapping tiles of about 128x128 HR pixels (the matching LR tiles
are 128 // scale wide) makes 18 units at every scale, each evaluated on its own. Tiles of one photograph are not independent samples of "new
images": they share its content statistics, so an interval over tiles speaks for these two
photographs' regions; real benchmark folders (``--val-dir``) are evaluated whole, unchanged.
"""

from __future__ import annotations

import numpy as np

from ehrsr.data.valset import ValSet

__all__ = ["BUILTIN_VAL_TILE_HR", "tile_val_set"]

# HR pixels per tile side: 18 tiles over chelsea (3x2) + coffee (4x3) at every scale, each large
# enough for SSIM's 11x11 window after the crop and for the tiny space's 4-level-free networks
BUILTIN_VAL_TILE_HR = 128


def tile_val_set(val: ValSet, tile_lr: int | None = None) -> ValSet:
    """Every image of ``val`` cut into non-overlapping ``tile_lr`` x ``tile_lr`` LR tiles (and the
    aligned HR tiles), row-major from the top-left; a remainder narrower than a tile is dropped.
    Tiles are named ``{image}@r{row}c{col}``. The LR pixels are those of the whole degraded image,
    so the degradation has no tile-boundary effects; the model sees each tile alone. Default
    ``tile_lr``: ``BUILTIN_VAL_TILE_HR // scale``."""
    scale = val.scale
    if tile_lr is None:
        tile_lr = BUILTIN_VAL_TILE_HR // scale
    if tile_lr < 1:
        raise ValueError(f"tile_lr must be >= 1, got {tile_lr}")
    names, lr_tiles, hr_tiles = [], [], []
    for item in val:
        rows, cols = item.lr.shape[0] // tile_lr, item.lr.shape[1] // tile_lr
        if rows == 0 or cols == 0:
            raise ValueError(f"validation image {item.name} ({item.lr.shape[1]}x{item.lr.shape[0]} LR) is smaller than a {tile_lr} px tile")
        for r in range(rows):
            for c in range(cols):
                lr = item.lr[r * tile_lr : (r + 1) * tile_lr, c * tile_lr : (c + 1) * tile_lr]
                hr = item.hr[r * tile_lr * scale : (r + 1) * tile_lr * scale, c * tile_lr * scale : (c + 1) * tile_lr * scale]
                names.append(f"{item.name}@r{r}c{c}")
                lr_tiles.append(np.ascontiguousarray(lr))
                hr_tiles.append(np.ascontiguousarray(hr))
    description = f"{val.description}; cut into {len(names)} fixed {tile_lr}x{tile_lr} LR tiles (evaluation units)"
    return ValSet.from_images(
        hr_tiles, val.task, names=names, lr_images=lr_tiles, description=description, is_builtin=val.is_builtin
    )
