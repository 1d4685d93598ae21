"""The disk cache of prepared data: keys from file fingerprints and the task, atomic ``.npz`` writes."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ehrsr.data.task import TaskConfig
from ehrsr.data.trainset import NOISE_VARIANTS_BEFORE_JPEG

__all__ = ["DATA_FORMAT_VERSION", "cache_key", "default_cache_dir", "load_npz", "save_npz_atomically"]

# Bump when the cached content for the same inputs would change (imresize, degradations, layout).
DATA_FORMAT_VERSION = 1


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


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        warnings.warn(f"ignoring unreadable data cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None
