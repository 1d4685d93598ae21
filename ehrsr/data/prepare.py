"""Preparing the training and validation sets of a task, once per (images, task), through the disk cache.

Preparation decodes the images, crops HR to a multiple of the scale, makes LR by the degradation
pipeline (MATLAB bicubic, blur, JPEG; see :mod:`ehrsr.data.task`) and stores everything as
uint8. Every later trial and worker loads the cache (a single ``.npz``) in well under a second
and never decodes a PNG or runs ``imresize``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ehrsr.data.bank import ImageBank
from ehrsr.data.cache import cache_key, default_cache_dir, load_npz, save_npz_atomically
from ehrsr.data.io import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    builtin_files,
    conversion_summary,
    list_images,
    match_lr_files,
    parallel_map,
    read_image_noted,
)
from ehrsr.data.task import TaskConfig
from ehrsr.data.trainset import TrainSet
from ehrsr.data.val_tiles import tile_val_set
from ehrsr.data.valset import ValSet

__all__ = ["prepare_data"]

log = logging.getLogger(__name__)


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
        hr_files = builtin_files(BUILTIN_TRAIN if kind == "train" else BUILTIN_VAL)
        source = f"built-in scikit-image sample images ({kind} split: {', '.join(p.stem for p in hr_files)})"
    else:
        hr_files = list_images(hr_dir)
        source = f"{len(hr_files)} images from {hr_dir}"
    lr_files = match_lr_files(hr_files, lr_dir, task.scale) if lr_dir is not None else None
    names = [p.stem for p in hr_files]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{hr_dir}: several images share a name ({', '.join(duplicates[:5])}); names must be unique")
    description = f"{source}; {_lr_description(task, lr_dir)}"
    cls = TrainSet if kind == "train" else ValSet

    path = cache_root / "data" / f"{kind}-{_slug(hr_dir)}-{cache_key(kind, task, hr_files, lr_files)}.npz"
    arrays = load_npz(path)
    if arrays is not None:
        meta = json.loads(str(arrays["meta"]))
        description += "".join(f"; {note}" for note in meta.get("converted", []))
        hr_bank = ImageBank.from_arrays(arrays, "hr")
        lr_bank = hr_bank if meta.get("lr_is_hr") else ImageBank.from_arrays(arrays, "lr")
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

    converted = []  # what decoding changed, said once per folder (cache hits repeat it in the description)
    hr_images = _read_folder(hr_files, hr_dir, f"reading {kind} images", progress, converted)
    lr_images = _read_folder(lr_files, lr_dir, f"reading {kind} LR images", progress, converted) if lr_files else None
    description += "".join(f"; {note}" for note in converted)
    dataset = cls.from_images(
        hr_images, task, names=names, lr_images=lr_images, description=description, is_builtin=is_builtin, progress=progress
    )
    hr_bank, lr_bank = (dataset.hr, dataset.lr) if isinstance(dataset, TrainSet) else dataset.banks
    meta = {
        "task": task.to_dict(),
        "variants": getattr(dataset, "variants", 1),
        "online_noise_sigma": getattr(dataset, "online_noise_sigma", 0.0),
        "lr_is_hr": lr_bank is hr_bank,
        "converted": converted,
    }
    arrays = {"meta": np.array(json.dumps(meta)), **hr_bank.to_arrays("hr")}
    if lr_bank is not hr_bank:
        arrays.update(lr_bank.to_arrays("lr"))
    save_npz_atomically(path, arrays)
    return dataset


def _read_folder(files: list[Path], folder: Path | None, desc: str, progress: bool, converted: list[str]) -> list[np.ndarray]:
    """Decode ``files`` to uint8 RGB; log once what the conversion changed in ``folder`` (16-bit,
    grayscale, alpha, CMYK: ``io.read_image_noted``) and add that line to ``converted``."""
    decoded = parallel_map(read_image_noted, files, progress, desc)
    summary = conversion_summary([p.name for p in files], [notes for _, notes in decoded])
    if summary is not None:
        line = f"{folder if folder is not None else 'built-in images'}: {summary}"
        log.warning("%s", line)
        converted.append(line)
    return [image for image, _ in decoded]


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
        val = tile_val_set(val)
    return train, val
