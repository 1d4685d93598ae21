"""The one error type of search spaces (``docs/search_spaces.md``)."""

from __future__ import annotations

__all__ = ["SearchSpaceError"]


class SearchSpaceError(ValueError):
    """A search-space file is invalid; the message names the file, the key and what is wrong."""
