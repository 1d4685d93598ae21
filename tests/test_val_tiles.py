"""Fixed tiles of validation images as evaluation units."""

from __future__ import annotations

import numpy as np
import pytest

from ehrsr.data import TaskConfig, ValSet
from ehrsr.data.val_tiles import BUILTIN_VAL_TILE_HR, tile_val_set
from tests.data_helpers import synthetic_image


@pytest.mark.parametrize("scale", [2, 3])
def test_tiles_are_aligned_crops_of_the_whole_lr_and_hr(scale: int) -> None:
    whole = ValSet.from_images([synthetic_image(300, 280, seed=1)], TaskConfig(scale=scale), names=["img"])
    tiles = tile_val_set(whole)
    tile_lr = BUILTIN_VAL_TILE_HR // scale  # 64 at x2, 42 at x3
    item = whole[0]
    rows, cols = item.lr.shape[0] // tile_lr, item.lr.shape[1] // tile_lr
    assert len(tiles) == rows * cols and tiles.names[1] == "img@r0c1"
    last = tiles[len(tiles) - 1]
    r, c = rows - 1, cols - 1
    np.testing.assert_array_equal(last.lr, item.lr[r * tile_lr : (r + 1) * tile_lr, c * tile_lr : (c + 1) * tile_lr])
    hr_side = tile_lr * scale
    np.testing.assert_array_equal(last.hr, item.hr[r * hr_side : (r + 1) * hr_side, c * hr_side : (c + 1) * hr_side])
    assert tiles.scale == scale and "LR tiles" in tiles.description


def test_image_smaller_than_a_tile_is_named() -> None:
    small = ValSet.from_images([synthetic_image(40, 40, seed=2)], TaskConfig(scale=2), names=["tiny"])
    with pytest.raises(ValueError, match=r"tiny .* smaller than a 64 px tile"):
        tile_val_set(small)
