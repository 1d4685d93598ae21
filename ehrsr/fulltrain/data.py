"""Training and validation sets for full training and evaluation, with the suite's conventions.

Validation sets are named folders of HR images (``NAME=DIR``, optionally with a folder of matching
LR images, ``NAME=HR_DIR,LR_DIR``). LR is made by MATLAB-compatible bicubic downscaling unless LR
files are given; PSNR/SSIM are measured on Y with ``crop_border = scale`` (``ehrsr.metrics``).
Without any folder the built-in sample images are used (a smoke test, not a benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ehrsr.data import ImageReadError, TaskConfig, TrainSet, ValSet, list_images, prepare_data, read_image
from ehrsr.data.io import image_size
from ehrsr.fulltrain.recipe import FullTrainError
from ehrsr.metrics import check_measurable

__all__ = ["BUILTIN_VAL_NAME", "ValData", "check_lr_scale", "parse_val_data", "prepare_sets"]

BUILTIN_VAL_NAME = "builtin"  # the name of the built-in validation images in tables and CSVs


@dataclass(frozen=True)
class ValData:
    """One named validation set: HR folder and optional LR folder (None: the built-in images)."""

    name: str
    hr_dir: Path | None
    lr_dir: Path | None = None


def parse_val_data(items: list[str] | None) -> tuple[ValData, ...]:
    """``["Set5=data/Set5/HR", "Urban100=data/U/HR,data/U/LR_x4", "data/B100"]`` -> ValData tuples.
    A bare folder is named after itself. An empty list means the built-in images."""
    out: list[ValData] = []
    for item in items or []:
        name, sep, folders = item.partition("=")
        if not sep:
            name, folders = Path(item.rstrip("/")).name, item
        hr, _, lr = folders.partition(",")
        if not name or not hr:
            raise FullTrainError(f"--val-data {item!r}: expected NAME=HR_DIR or NAME=HR_DIR,LR_DIR")
        if any(v.name == name for v in out):
            raise FullTrainError(f"--val-data: the name {name!r} is given twice")
        out.append(ValData(name, Path(hr).expanduser(), Path(lr).expanduser() if lr else None))
    return tuple(out)


def check_lr_scale(val: ValData, scale: int) -> None:
    """Paired LR files must be 1/scale of their HR images (first pair checked, rounding allowed)."""
    if val.lr_dir is None or val.hr_dir is None:
        return
    hr_files, lr_files = list_images(val.hr_dir), list_images(val.lr_dir)
    if not hr_files or not lr_files:
        return  # prepare_data names the empty folder
    hr, lr = read_image(hr_files[0]), read_image(lr_files[0])
    ratio = hr.shape[0] / lr.shape[0]
    if abs(ratio - scale) > 0.5:
        raise FullTrainError(
            f"--val-data {val.name}: the LR images in {val.lr_dir} are x{ratio:.3g} of their HR images, "
            f"but the model is x{scale}"
        )


def prepare_sets(
    task: TaskConfig,
    train_dir: Path | None,
    val_data: tuple[ValData, ...],
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[TrainSet, list[tuple[str, ValSet]]]:
    """The training set and every named validation set (from ``ehrsr.data.prepare_data``'s cache).
    Data problems (missing folder, unreadable image, LR of another scale, an image too small to
    measure at the scale) raise ``FullTrainError``."""
    for val in val_data:
        for folder in (val.hr_dir, val.lr_dir):
            if folder is not None and not folder.is_dir():
                raise FullTrainError(f"--val-data {val.name}: {folder} is not a folder")
        check_lr_scale(val, task.scale)
        if val.hr_dir is not None:
            try:
                check_measurable([(path, *image_size(path)) for path in list_images(val.hr_dir)], task.scale)
            except ValueError as exc:  # ImageTooSmall, an empty folder, an unreadable image
                raise FullTrainError(f"--val-data {val.name}: {exc}") from None
    if train_dir is not None and not Path(train_dir).is_dir():
        raise FullTrainError(f"--train-data {train_dir} is not a folder")
    sets: list[tuple[str, ValSet]] = []
    train_set: TrainSet | None = None
    try:
        for val in val_data or (ValData(BUILTIN_VAL_NAME, None),):
            # the training split comes from the cache after the first call
            train_set, val_set = prepare_data(task, train_dir, val.hr_dir, cache_dir=cache_dir,
                                              val_lr_dir=val.lr_dir, progress=progress)
            sets.append((val.name, val_set))
    except ImageReadError as exc:
        raise FullTrainError(str(exc)) from None
    except ValueError as exc:
        raise FullTrainError(f"data: {exc}") from None
    assert train_set is not None
    return train_set, sets
