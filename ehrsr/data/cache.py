"""The disk cache of prepared data: keys from file fingerprints and the task, atomic ``.npz`` writes."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ehrsr.data.task import TaskConfig
from ehrsr.data.trainset import NOISE_VARIANTS_BEFORE_JPEG
from ehrsr.files import write_atomically
from ehrsr.resources import default_cache_dir

__all__ = ["DATA_FORMAT_VERSION", "cache_key", "default_cache_dir", "load_npz", "save_npz_atomically"]

# Bump when the cached content for the same inputs would change (imresize, degradations, layout).
DATA_FORMAT_VERSION = 1


def _file_fingerprint(files: Sequence[Path] | None) -> list[list]:
    if files is None:
        return []
    out = []
    for path in files:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def cache_key(kind: str, task: TaskConfig, hr_files: Sequence[Path], lr_files: Sequence[Path] | None) -> str:
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


def save_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` through ``ehrsr.files.write_atomically``: readers and a second writer never
    see a partial file (two workers preparing the same data both succeed)."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, write)


MMAP_MIN_BYTES = 1 << 20  # arrays this large are memory-mapped, not read


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file; large ones (the image buffers) memory-mapped read-only.

    ``np.savez`` stores each array uncompressed in the zip, so a large member can be mapped where
    it lies: the workers of one machine then share the page cache's single copy of the training
    set instead of each holding its own (benchmarks/dataset_memory.py measures it).
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            small = {key: data[key] for key in names if key not in _large_members(path)}
        return {key: small[key] if key in small else _mmap_member(path, key) for key in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable data cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


def _large_members(path: Path) -> set[str]:
    """Names (without ``.npy``) of the stored, uncompressed members of at least ``MMAP_MIN_BYTES``."""
    with zipfile.ZipFile(path) as archive:
        return {
            info.filename.removesuffix(".npy") for info in archive.infolist()
            if info.compress_type == zipfile.ZIP_STORED and info.file_size >= MMAP_MIN_BYTES
        }


def _mmap_member(path: Path, key: str) -> np.ndarray:
    """Member ``key`` of an uncompressed npz, memory-mapped read-only at its place in the file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the local file header: its name and extra lengths may differ from the directory's
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{key}: bad zip local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{key}: object arrays are not cached")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
