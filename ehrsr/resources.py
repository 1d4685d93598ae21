"""Files shipped inside the package (the search-space YAML files, the device profiles) and the
user's cache folder.

They live in ``ehrsr/search_spaces/`` and are read through :mod:`importlib.resources`, so an
installed wheel finds them wherever it is installed, not only a checkout of the repository.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from importlib import resources
from pathlib import Path

__all__ = ["default_cache_dir", "devices_file", "shipped_space_names", "space_file", "spaces_dir"]

_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def spaces_dir() -> Path:
    """The folder of the shipped YAML files (a zipped install, which pip never makes, is extracted
    to a temporary folder on Python 3.12+)."""
    folder = resources.files("ehrsr") / "search_spaces"
    if isinstance(folder, Path):
        return folder
    return Path(_extracted.enter_context(resources.as_file(folder)))


def space_file(name: str) -> Path:
    """The shipped space ``name`` (``tiny``, ``full``): ``ehrsr/search_spaces/<name>.yaml``; may not exist."""
    return spaces_dir() / f"{name}.yaml"


def shipped_space_names() -> list[str]:
    """Names of the shipped search spaces, sorted (the device profiles file is not a space)."""
    return sorted(p.stem for p in spaces_dir().glob("*.yaml") if p.stem != "devices")


def devices_file() -> Path:
    """The shipped device profiles, ``ehrsr/search_spaces/devices.yaml``."""
    return spaces_dir() / "devices.yaml"


def default_cache_dir() -> Path:
    """``$EHRSR_CACHE`` if set, else ``~/.cache/ehrsr``: prepared data, compiled kernels."""
    env = os.environ.get("EHRSR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ehrsr"
