"""Reading images: file decoding to uint8 RGB, image folders, the built-in sample images.

The built-in data set is a fixed split of scikit-image's colour photographs (shipped with
scikit-image, so it works offline). Its grayscale images (camera, moon, brick, grass, ...) are left
out: replicating one channel three times would teach colour SR on images without colour.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ALPHA",
    "BUILTIN_TRAIN",
    "BUILTIN_VAL",
    "CMYK",
    "GRAY",
    "IMAGE_EXTENSIONS",
    "SIXTEEN_BIT",
    "ImageReadError",
    "builtin_files",
    "conversion_summary",
    "image_size",
    "list_images",
    "match_lr_files",
    "parallel_map",
    "read_image",
    "read_image_noted",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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



class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------
# reading images


# what decoding to 8-bit RGB changed, one note each (``read_image_noted``; a folder's notes are
# logged once by ``conversion_summary``)
SIXTEEN_BIT = "16-bit reduced to 8 bits"
GRAY = "grayscale replicated to 3 channels"
ALPHA = "alpha dropped"
CMYK = "CMYK converted to RGB"

_GRAY_MODES = {"1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_LOSSLESS_MODES = {"RGB", "RGBX", "P"}  # palette expansion and padding removal change no colour


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)``.

    Grayscale becomes three equal channels, palette images are expanded, alpha is dropped,
    16-bit grayscale is scaled to 8 bits (``round(v / 257)``), 16-bit RGB keeps its high byte
    (Pillow's decoding), CMYK is converted by Pillow. ``read_image_noted`` also says which.
    """
    return read_image_noted(path)[0]


def read_image_noted(path: str | Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """``read_image`` and the notes (``SIXTEEN_BIT``, ``GRAY``, ``ALPHA``, ``CMYK``, or
    ``"<mode> converted to RGB"``) of what its conversion changed; none for 8-bit RGB."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            rawmode = image.tile[0][3] if image.tile and isinstance(image.tile[0][3], str) else ""
            image.load()
            notes = _conversion_notes(image.mode, rawmode, "transparency" in image.info)
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                array = np.asarray(image, dtype=np.float64)
                array = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(array[:, :, None], 3, axis=2), notes
            if image.mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or min(array.shape[:2]) < 1:
        raise ImageReadError(f"cannot read image {path}: unsupported layout {array.shape} {array.dtype}")
    return np.ascontiguousarray(array), notes


def _conversion_notes(mode: str, rawmode: str, palette_transparency: bool) -> tuple[str, ...]:
    notes = []
    if mode.startswith("I") or ";16" in rawmode:
        notes.append(SIXTEEN_BIT)
    if mode in _GRAY_MODES:
        notes.append(GRAY)
    if mode in _ALPHA_MODES or (mode == "P" and palette_transparency):
        notes.append(ALPHA)
    if mode == "CMYK":
        notes.append(CMYK)
    if not notes and mode not in _LOSSLESS_MODES:
        notes.append(f"{mode} converted to RGB")
    return tuple(notes)


def conversion_summary(names: Sequence[str], notes: Sequence[tuple[str, ...]], limit: int = 3) -> str | None:
    """One line on what decoding changed in a folder's images (``read_image_noted``'s notes), each
    kind with its count and the first ``limit`` names; None when nothing changed."""
    by_note: dict[str, list[str]] = {}
    for name, image_notes in zip(names, notes):
        for note in image_notes:
            by_note.setdefault(note, []).append(name)
    if not by_note:
        return None
    parts = []
    for note, files in by_note.items():
        shown = ", ".join(files[:limit]) + (f", and {len(files) - limit} more" if len(files) > limit else "")
        parts.append(f"{note}: {len(files)} image{'s' if len(files) != 1 else ''} ({shown})")
    return "converted to 8-bit RGB: " + "; ".join(parts)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header alone (nothing is decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None


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


def builtin_files(names: Sequence[str]) -> list[Path]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    files = [folder / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"built-in sample images missing from the scikit-image install: {', '.join(missing)}")
    return files


def match_lr_files(hr_files: list[Path], lr_folder: Path, scale: int) -> list[Path]:
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


def parallel_map(function: Callable, items: Sequence, progress: bool, desc: str) -> list:
    """Map over threads (PIL decoding and numpy's matrix products release the GIL), with a bar."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(function, items)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(items), desc=desc, unit="img", leave=False)
        return list(results)
