"""Finding and reading a space: a shipped one by name (``search_spaces/<name>.yaml``) or a file."""

from __future__ import annotations

from pathlib import Path

from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.search.space.sampling import SearchSpace

__all__ = ["SPACES_DIR", "load_space", "shipped_spaces"]

SPACES_DIR = Path(__file__).resolve().parents[3] / "search_spaces"
"""Where the shipped spaces live: ``search_spaces/`` at the repository root."""


def shipped_spaces() -> list[str]:
    """Names of the spaces in ``search_spaces/`` (``tiny``, ``full``, ...)."""
    if not SPACES_DIR.is_dir():
        return []
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml") if p.stem != "devices")


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A shipped space by name (``tiny``, ``full``: ``search_spaces/<name>.yaml``) or a YAML file."""
    text_name = str(name_or_path)
    path = Path(name_or_path)
    is_bare_name = isinstance(name_or_path, str) and "/" not in text_name and not path.suffix
    if is_bare_name and (SPACES_DIR / f"{text_name}.yaml").is_file():
        path = SPACES_DIR / f"{text_name}.yaml"
    elif not path.is_file():
        shipped = ", ".join(shipped_spaces()) or "none found"
        raise SearchSpaceError(
            f"search space {text_name!r} is neither a shipped space ({shipped}) nor an existing file"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchSpaceError(f"{path}: cannot read: {exc.strerror}") from None
    return SearchSpace.from_text(text, name=path.stem, path=path)
