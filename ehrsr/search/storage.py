"""Where a study lives: storage URLs, the default SQLite file, journal files, masked passwords.

Optuna's advice is followed: an embedded SQLite file for one process (the default,
``reports/<study>/study.db``), a journal file (``journal:PATH``) for several processes on one
machine or a shared filesystem, and a database server (``postgresql://``, ``mysql://``) across
machines. Every URL that reaches a log or a report goes through ``mask_url``.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from ehrsr.errors import UserError

__all__ = [
    "StorageError",
    "default_storage_url",
    "mask_url",
    "open_storage",
]


class StorageError(UserError, RuntimeError):
    """The storage cannot be opened or reached; the message is one line for the user."""


_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@")


def mask_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host``: ``scheme://user:***@host``."""
    return _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def default_storage_url(study_dir: Path, workers: int = 1) -> str:
    """The study's own storage in its report folder.

    An existing file wins (so a resume finds its study whatever ``--workers`` says); a new study
    gets SQLite for one worker and a journal file for several, as Optuna recommends.
    """
    db, journal = study_dir / "study.db", study_dir / "study.journal"
    if journal.exists():
        return f"journal:{journal}"
    if db.exists() or workers <= 1:
        return f"sqlite:///{db}"
    return f"journal:{journal}"


# Python module SQLAlchemy imports for a URL -> the pip package that provides it
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",  # postgresql:// (SQLAlchemy 2's default PostgreSQL driver)
    "psycopg2": "psycopg2-binary",  # postgresql+psycopg2://
    "pymysql": "PyMySQL",  # mysql+pymysql://
    "MySQLdb": "mysqlclient",  # mysql://
}


def _missing_module(exc: BaseException) -> str | None:
    """The module whose import failed: Optuna re-raises SQLAlchemy's error without the name."""
    seen = 0
    while exc is not None and seen < 10:
        name = getattr(exc, "name", None)
        if name:
            return name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage from a URL or ``journal:PATH``; failures raise ``StorageError``."""
    masked = mask_url(url)
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:") :]).expanduser()
            if not path.parent.exists():
                raise StorageError(f"cannot open journal storage {masked}: folder {path.parent} does not exist")
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if not path.parent.exists():
                raise StorageError(f"cannot open storage {masked}: folder {path.parent} does not exist")
            # a generous lock timeout: several workers may write to one SQLite file
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        if "://" not in url:
            raise StorageError(
                f"storage {masked!r} is not a URL: use sqlite:///PATH, postgresql://..., mysql://... or journal:PATH"
            )
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except StorageError:
        raise
    except ImportError as exc:
        module = _missing_module(exc)
        package = _DRIVER_PACKAGES.get(module or "", module or "the driver SQLAlchemy names for this URL")
        raise StorageError(
            f"cannot open storage {masked}: missing database driver {module or '(unknown)'}; "
            f"install it with: pip install '{package}'"
        ) from None
    except Exception as exc:  # SQLAlchemy / driver errors: keep one line, never the password
        detail = mask_url(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {masked}: {detail}") from None
