"""Finding and reading a space: a shipped one by name (``ehrsr/search_spaces/<name>.yaml``), a file,
or YAML text."""

from __future__ import annotations

from pathlib import Path

from ehrsr.resources import shipped_space_names, space_file, spaces_dir
from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.search.space.parser import SpaceParser
from ehrsr.search.space.sampling import SearchSpace

__all__ = ["SPACES_DIR", "load_space", "shipped_spaces", "space_from_text"]

SPACES_DIR = spaces_dir()
"""Where the shipped spaces live: ``ehrsr/search_spaces/``, package data (see :mod:`ehrsr.resources`)."""


def shipped_spaces() -> list[str]:
    """Names of the shipped spaces (``tiny``, ``full``, ...)."""
    return shipped_space_names()


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A shipped space by name (``tiny``, ``full``: ``ehrsr/search_spaces/<name>.yaml``) or a YAML file."""
    text_name = str(name_or_path)
    path = Path(name_or_path)
    is_bare_name = isinstance(name_or_path, str) and "/" not in text_name and not path.suffix
    if is_bare_name and space_file(text_name).is_file():
        path = space_file(text_name)
    elif not path.is_file():
        shipped = ", ".join(shipped_spaces()) or "none found"
        raise SearchSpaceError(
            f"search space {text_name!r} is neither a shipped space ({shipped}) nor an existing file"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchSpaceError(f"{path}: cannot read: {exc.strerror}") from None
    return space_from_text(text, name=path.stem, path=path)


def space_from_text(text: str, name: str = "<text>", path: Path | None = None) -> SearchSpace:
    """Parse and validate YAML text (``load_space`` reads a file and calls this)."""
    return SpaceParser(text, name, path).parse()
