"""Where a study lives: storage URLs, the default SQLite file, journal files, masked passwords.

Optuna's advice is followed: an embedded SQLite file for one process (the default,
``reports/<study>/study.db``), a journal file (``journal:PATH``) for several processes on one
machine or a shared filesystem, and a database server (``postgresql://``, ``mysql://``) across
machines. Every URL that reaches a log or a report goes through ``mask_url``.
"""

from __future__ import annotations

import errno
import re
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna

from ehrsr.errors import UserError

__all__ = [
    "StorageError",
    "StorageFull",
    "default_storage_url",
    "mask_url",
    "open_storage",
    "retry_storage",
    "retrying",
    "set_user_attrs",
    "storage_full",
    "storage_place",
    "storage_unreachable",
    "suggest_and_set",
    "write_user_attrs",
]

T = TypeVar("T")


class StorageError(UserError, RuntimeError):
    """The storage cannot be opened or reached; the message is one line for the user."""


# a URL inside any text: scheme:// then everything up to the next white space
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>\S+)")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&]password=)[^&\s]*")


def _mask_one(match: re.Match[str]) -> str:
    rest = match["rest"]
    # SQLAlchemy (make_url) reads the password from the first ':' after the user name to the next
    # '@', and a password may hold '/', ':' or '?' unescaped; an unescaped '@' in it makes
    # SQLAlchemy read the rest as the host, which the error messages then repeat. So everything up
    # to the LAST '@' is hidden: it covers what SQLAlchemy sends and what the user meant.
    at = rest.rfind("@")
    if at > 0 and ":" in rest[:at]:
        user = rest[: rest.index(":")]
        rest = f"{user}:***{rest[at:]}"
    return match["scheme"] + _QUERY_PASSWORD.sub(lambda m: f"{m['key']}***", rest)


def mask_url(text: str) -> str:
    """Hide the passwords of every ``scheme://user:password@host...`` URL in ``text``.

    ``postgresql://user:SEC/RET@host/db`` becomes ``postgresql://user:***@host/db``; a
    ``?password=`` query parameter is hidden too. Works on a bare URL and on a message quoting one.
    """
    return _URL.sub(_mask_one, text)


def _redact(text: str, url: str) -> str:
    """``mask_url`` plus any literal copy of the URL's password (a driver may quote it alone)."""
    from urllib.parse import unquote

    masked = mask_url(text)
    match = _URL.match(url)
    if match:
        rest = match["rest"]
        at = rest.rfind("@")
        if at > 0 and ":" in rest[:at]:
            secret = rest[rest.index(":") + 1 : at]
            for form in {secret, unquote(secret)}:
                if len(form) >= 3:  # a one- or two-letter password would blank out ordinary words
                    masked = masked.replace(form, "***")
            # after an unescaped '@' SQLAlchemy takes the rest of the password for the host
            # ("failed to resolve host 'ss@db'"): hide each such piece where it stands before '@'
            pieces = secret.split("@")
            for i in range(1, len(pieces)):
                masked = masked.replace("@".join(pieces[i:]) + "@", "***@")
    return masked


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
    "grpc": "grpcio",  # grpc:// (Optuna's storage proxy client)
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
        if url.startswith("grpc://"):
            return _open_grpc_proxy(url)
        if "://" not in url:
            raise StorageError(
                f"storage {masked!r} is not a URL: use sqlite:///PATH, postgresql://..., mysql://... or journal:PATH"
            )
        return _open_rdb(url)
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
        detail = _redact(str(exc).strip().splitlines()[0], url) if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {masked}: {detail}") from None


PROXY_WAIT_SECONDS = 30.0  # a proxy being (re)started needs a moment


def _open_grpc_proxy(url: str) -> optuna.storages.BaseStorage:
    """``grpc://HOST:PORT``: Optuna's gRPC storage proxy (``run_search.py storage-proxy``), which
    serves many workers from one database connection pool (docs/scaling_out.md)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None or parts.path not in ("", "/"):
        raise StorageError(f"storage {mask_url(url)!r}: write grpc://HOST:PORT, the address of run_search.py storage-proxy")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=PROXY_WAIT_SECONDS)
    except ConnectionError:
        proxy.close()
        raise StorageError(
            f"cannot open storage {mask_url(url)}: no storage proxy answered within {PROXY_WAIT_SECONDS:.0f} s "
            "(start one with: run_search.py storage-proxy --storage URL --host HOST --port PORT)"
        ) from None
    return proxy


SCHEMA_RACE_TRIES = 6


def _open_rdb(url: str) -> optuna.storages.RDBStorage:
    """A database server's storage; survives workers that start together on a fresh database.

    Every worker's RDBStorage creates Optuna's tables if they are missing; workers started at the
    same moment (a job array) race to CREATE them, and the losers get "duplicate key" or "already
    exists" from PostgreSQL (seen in tests/test_search_cluster.py). The tables exist by then, so
    opening again succeeds.
    """
    import random
    import time

    import sqlalchemy.exc

    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            text = str(exc).lower()
            if attempt == SCHEMA_RACE_TRIES - 1 or not ("duplicate key" in text or "already exists" in text):
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling (Optuna and SQLAlchemy wrap)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full ("could not extend file ...")


def storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the storage has no room left: SQLite's
    SQLITE_FULL ("database or disk is full"), PostgreSQL's disk_full, or a file write failing
    with ENOSPC / EDQUOT (a journal file, a study folder; safetensors reports the OS error only in
    its text, "(os error 28)"). Waiting does not help these."""
    for error in _chain(exc):
        sqlite_full = isinstance(error, sqlite3.Error) and (
            getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(error)
        )
        file_full = isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS
        server_full = _PG_DISK_FULL in (getattr(error, "sqlstate", None), getattr(error, "pgcode", None))
        file_full = file_full or (type(error).__name__ == "SafetensorError"
                                  and any(f"(os error {code})" in str(error) for code in _DISK_FULL_ERRNOS))
        if sqlite_full or file_full or server_full:
            return True
    return False


def storage_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the storage could not be reached: a
    database server that is down or restarting (SQLAlchemy ``OperationalError`` /
    ``InterfaceError`` / ``DisconnectionError``, which Optuna may wrap in
    ``StorageInternalError``), an unavailable gRPC proxy, a refused connection. A full storage
    (``storage_full``) is not unreachable, although SQLite reports it as an ``OperationalError``."""
    if storage_full(exc):
        return False
    for error in _chain(exc):
        if isinstance(error, ConnectionError):
            return True
        names = {cls.__name__ for cls in type(error).__mro__}
        module = type(error).__module__
        if module.startswith("sqlalchemy") and names & {"OperationalError", "InterfaceError", "DisconnectionError"}:
            return True
        if module.startswith("grpc") and "UNAVAILABLE" in str(getattr(error, "code", lambda: "")()):
            return True
    return False


class StorageFull(StorageError):
    """The storage has no space left: one line, and the search stops (no waiting for space)."""

    @classmethod
    def on(cls, where: str, what: str) -> StorageFull:
        return cls(f"no space left on the device holding {where} while trying to {what}: free some space, "
                   "then run the same command again to resume")


def storage_place(url: str) -> str:
    """Where a storage keeps its data, for a message: the file of ``sqlite:///`` and ``journal:``
    URLs, else the masked URL (the database server's disk)."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            return str(Path(url[len(prefix):]).expanduser())
    return f"the database server of {mask_url(url)}"


RETRY_FIRST_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 30.0
RETRY_GIVE_UP_S = 600.0  # a storage down this long is not a restart: stop with one line


def retry_storage(operation: Callable[[], T], *, what: str, log: Callable[[str], None] | None = None,
                  give_up_s: float | None = None, first_delay_s: float = RETRY_FIRST_DELAY_S,
                  sleep: Callable[[float], None] | None = None, storage_url: str | None = None,
                  retryable: Callable[[BaseException], bool] = storage_unreachable) -> T:
    """Run ``operation``; while the storage is unreachable (``retryable``, by default
    ``storage_unreachable``), wait and retry with exponential backoff (1, 2, 4, ... s, at most 30 s
    between tries), saying so in ``log``.

    A database restart or a network blip then costs a worker some seconds, not its life. After
    ``give_up_s`` (default ``RETRY_GIVE_UP_S``) of failures a ``StorageError`` (one line) ends the
    worker. A full storage (``storage_full``) raises ``StorageFull`` at once, naming where
    (``storage_url``) and what was being written. Other errors pass at once. ``give_up_s`` and
    ``sleep`` default to ``RETRY_GIVE_UP_S`` and ``time.sleep`` as they are when called.
    """
    give_up_s = RETRY_GIVE_UP_S if give_up_s is None else give_up_s
    sleep = sleep or time.sleep
    delay = first_delay_s
    waited = 0.0
    while True:
        try:
            return operation()
        except Exception as exc:
            if storage_full(exc):
                raise StorageFull.on(storage_place(storage_url) if storage_url else "the storage's disk", what) from exc
            if not retryable(exc):
                raise
            if waited >= give_up_s:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StorageError(f"storage unreachable for {waited:.0f} s while trying to {what}: "
                                   f"{mask_url(first)}") from None
            if log is not None:
                log(f"storage unreachable, retrying in {delay:.0f} s ({what})")
            sleep(delay)
            waited += delay
            delay = min(RETRY_MAX_DELAY_S, delay * 2)


def retrying(log: Callable[[str], None] | None = None, storage_url: str | None = None) -> Callable[..., Any]:
    """``retry(what, function, *args, **kwargs)``: ``function(*args, **kwargs)`` under
    ``retry_storage`` (one closure for the many storage calls of a loop)."""

    def retry(what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return retry_storage(lambda: function(*args, **kwargs), what=what, log=log, storage_url=storage_url)

    return retry


# ---------------------------------------------------------------------------------------------
# several attributes of a running trial in one write


def _batching_rdb(storage: Any) -> optuna.storages.RDBStorage | None:
    """The SQLite or PostgreSQL storage behind ``storage`` when this Optuna's storage internals that
    the one-transaction writes use are all there, else None (Optuna's own writes are used)."""
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, optuna.storages.RDBStorage) or _upsert_for(rdb) is None:
        return None
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session  # noqa: F401
    except ImportError:
        return None
    needed = (getattr(models, "TrialModel", None), getattr(models, "TrialParamModel", None),
              getattr(models, "TrialUserAttributeModel", None))
    if any(model is None for model in needed) or not hasattr(models.TrialModel, "find_or_raise_by_id") \
            or not hasattr(rdb, "check_trial_is_updatable"):
        return None
    return rdb


def write_user_attrs(storage: optuna.storages.BaseStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """Set the user attributes ``attrs`` of the running trial ``trial_id``.

    Optuna writes each attribute in a transaction of its own (read the trial, upsert, commit: three
    or four round trips to a database server). On an SQLite or PostgreSQL storage all of ``attrs``
    go in one transaction here: the trial read once, one multi-row upsert, one commit, with the
    same checks as Optuna's (the trial exists and is not finished) and the same JSON encoding.
    Other storages (journal files, the gRPC proxy, MySQL) get Optuna's own writes, one by one.
    """
    attrs = dict(attrs)
    if not attrs:
        return
    rdb = _batching_rdb(storage) if len(attrs) > 1 else None
    if rdb is not None:
        _write_in_one_transaction(rdb, trial_id, attrs)
        return
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


def set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """``trial.set_user_attr`` for each of ``attrs``, written as ``write_user_attrs`` writes them.

    ``trial``: a running ``optuna.Trial``; its own copy of the attributes is updated as
    ``Trial.set_user_attr`` updates it. Anything else with ``set_user_attr`` gets it called per key.
    """
    attrs = dict(attrs)
    cached = getattr(trial, "_cached_frozen_trial", None)
    storage = getattr(trial, "storage", None)
    if not isinstance(trial, optuna.Trial) or cached is None or storage is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    write_user_attrs(storage, trial._trial_id, attrs)
    cached.user_attrs.update(attrs)


class _HeldParams:
    """Stands in for a trial's storage while its parameters are suggested: keeps the parameter
    writes, passes everything else to the storage."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.params: list[tuple[str, float, Any]] = []  # (name, internal value, distribution)

    def set_trial_param(self, trial_id: int, name: str, internal: float, distribution: Any) -> None:
        self.params.append((name, internal, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def suggest_and_set(trial: Any, suggest: Callable[[], T], attrs_of: Callable[[T], dict[str, Any]]) -> T:
    """``suggest()`` (the space's suggestions on ``trial``), then the user attributes
    ``attrs_of(result)``, stored in one transaction with the suggested parameters.

    Optuna writes each suggested parameter in a transaction of its own (about three round trips
    each, some ten parameters a trial). On an SQLite or PostgreSQL storage the parameter writes
    are held while ``suggest`` runs (the trial's own copy has them, so the suggestions and the
    sampler see them as usual) and written with the attributes at the end, with Optuna's checks:
    the trial is running, each distribution agrees with the study's earlier one of that name. If
    ``suggest`` or the write fails, the held parameters are dropped from the trial's copy too, so
    a retry suggests them again. Elsewhere: Optuna's own writes, then ``set_user_attrs``.
    """
    rdb = _batching_rdb(getattr(trial, "storage", None)) if isinstance(trial, optuna.Trial) else None
    cached = getattr(trial, "_cached_frozen_trial", None)
    if rdb is None or cached is None:
        result = suggest()
        set_user_attrs(trial, attrs_of(result))
        return result
    real = trial.storage
    held = _HeldParams(real)
    trial.storage = held
    try:
        result = suggest()
        attrs = attrs_of(result)
    except BaseException:
        _drop_params(cached, held.params)
        raise
    finally:
        trial.storage = real
    try:
        _write_in_one_transaction(rdb, trial._trial_id, attrs, held.params)
    except BaseException:
        _drop_params(cached, held.params)
        raise
    cached.user_attrs.update(attrs)
    return result


def _drop_params(cached: Any, params: list[tuple[str, float, Any]]) -> None:
    for name, _, _ in params:
        cached.params.pop(name, None)
        cached.distributions.pop(name, None)


# per storage object: (study id, parameter name) -> the distribution the study stored first
_KNOWN_DISTRIBUTIONS: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], Any]] = weakref.WeakKeyDictionary()


def _upsert_for(rdb: optuna.storages.RDBStorage) -> Callable[..., Any] | None:
    """The dialect's ``insert`` with ``on_conflict_do_update`` (SQLite 3.24+, PostgreSQL), else None."""
    name = rdb.engine.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert
    if name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert

        return insert
    return None


def _write_in_one_transaction(rdb: optuna.storages.RDBStorage, trial_id: int, attrs: dict[str, Any],
                              params: list[tuple[str, float, Any]] = ()) -> None:
    """``attrs`` (user attributes) and ``params`` (name, internal value, distribution) of the
    running trial ``trial_id`` in one transaction, checked as Optuna checks them."""
    import json

    import sqlalchemy
    from optuna.distributions import (
        check_distribution_compatibility,
        distribution_to_json,
        json_to_distribution,
    )
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    insert = _upsert_for(rdb)
    model = models.TrialUserAttributeModel
    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    known = _KNOWN_DISTRIBUTIONS.setdefault(rdb, {})
    seen: dict[tuple[int, str], Any] = {}
    with _create_scoped_session(rdb.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        rdb.check_trial_is_updatable(trial_id, trial.state)
        for name, _, distribution in params:
            key = (trial.study_id, name)
            previous = seen.get(key) or known.get(key)
            if previous is None or not _compatible(previous, distribution):
                # not known here, or known otherwise (a study made again under its id): the study's
                # earlier parameter of that name, looked up as Optuna looks it up
                record = (session.query(models.TrialParamModel).join(models.TrialModel)
                          .filter(models.TrialModel.study_id == trial.study_id)
                          .filter(models.TrialParamModel.param_name == name).first())
                previous = json_to_distribution(record.distribution_json) if record is not None else None
                if previous is not None:
                    check_distribution_compatibility(previous, distribution)  # Optuna's refusal
            seen[key] = previous or distribution
        if params:  # one multi-row INSERT
            session.execute(sqlalchemy.insert(models.TrialParamModel).values([
                {"trial_id": trial_id, "param_name": name, "param_value": internal,
                 "distribution_json": distribution_to_json(distribution)} for name, internal, distribution in params]))
        if rows:
            statement = insert(model).values(rows)
            session.execute(statement.on_conflict_do_update(
                index_elements=[model.trial_id, model.key], set_={"value_json": statement.excluded.value_json}))
    known.update(seen)


def _compatible(previous: Any, distribution: Any) -> bool:
    from optuna.distributions import check_distribution_compatibility

    try:
        check_distribution_compatibility(previous, distribution)
    except ValueError:
        return False
    return True
