"""The prepared training set is memory-mapped from the cache, so the workers of one machine share
one copy (benchmarks/dataset_memory.py measures the resident memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from ehrsr.data import TaskConfig, prepare_data


def test_a_cached_training_set_is_memory_mapped_and_samples_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, val = tmp_path / "train", tmp_path / "val"
    for folder, size in ((train, 400), (val, 48)):
        folder.mkdir()
        for i in range(3):  # 3 x 400 x 400 x 3 bytes: over the 1 MiB mapping threshold
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    task = TaskConfig.from_dict({"task": "sr", "scale": 4})
    first, _ = prepare_data(task, train, val, cache_dir=tmp_path / "c", progress=False)  # builds the cache
    again, _ = prepare_data(task, train, val, cache_dir=tmp_path / "c", progress=False)  # reads it
    cache_files = {str(p) for p in (tmp_path / "c").rglob("train-*.npz")}
    mapped = {m.path for m in psutil.Process().memory_maps()}
    assert cache_files & mapped  # the training images live in the page cache, not in a private copy
    assert torch.equal(first.hr.buffer, again.hr.buffer)
    a = first.sample(4, 16, torch.Generator().manual_seed(1))
    b = again.sample(4, 16, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
