"""The project's error types for problems a user can fix (docs/architecture.md, "Errors").

The command line prints an error that derives from ``UserError`` as one ``error:`` line and exits
with status 2; any other exception is a programming error and keeps its traceback. Errors that
also are ``ValueError`` / ``RuntimeError`` keep those bases, so existing ``except`` clauses work.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """Bad input the user can fix: a bad option, file, URL or study; reported in one line."""


class ConfigError(UserError, ValueError):
    """An invalid ``EHRSRConfig`` or ``TaskConfig`` (unknown key, wrong type, impossible value)."""
