"""``run_search.py storage-proxy``: Optuna's gRPC storage proxy in front of the study's database.

With hundreds of workers, each holding its own connection pool and re-reading every trial of the
study from the database, the database server becomes the bottleneck. Optuna's gRPC storage proxy
(``optuna.storages.run_grpc_proxy_server``, experimental since Optuna 4.2) keeps one connection
pool and a cache of finished trials in one process; workers then connect with
``--storage grpc://HOST:PORT`` (``storage.open_storage``). See docs/scaling_out.md.
"""

from __future__ import annotations

import argparse
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna

from ehrsr.interrupts import sigterm_as_interrupt
from ehrsr.search.storage import StorageError, mask_url, open_storage

__all__ = ["DEFAULT_PORT", "add_storage_proxy_parser", "run_storage_proxy", "storage_proxy_parser"]

DEFAULT_PORT = 13000  # Optuna's default for the proxy

DESCRIPTION = (
    "Serve a study database to many workers through Optuna's gRPC storage proxy; workers then "
    "use --storage grpc://HOST:PORT. Runs until Ctrl-C or SIGTERM."
)


def _fill(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--storage", required=True,
                        help="the database behind the proxy: postgresql://... or mysql://... (or sqlite:///PATH)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines: the "
                             "proxy has no authentication, so only on a trusted network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--server-threads", type=int, default=16,
                        help="threads answering requests (default 16)")
    return parser


def storage_proxy_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                         ) -> argparse.ArgumentParser:
    """A stand-alone parser for the subcommand (the CLI's one-parser-per-subcommand layout)."""
    return _fill(parser_class(prog="run_search.py storage-proxy", description=DESCRIPTION))


def add_storage_proxy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``storage-proxy`` to an ``argparse`` sub-parser set (``parser.add_subparsers()``)."""
    return _fill(subparsers.add_parser("storage-proxy", help="serve a study database to many workers (gRPC)",
                                       description=DESCRIPTION))


def run_storage_proxy(args: argparse.Namespace) -> int:
    """Open ``args.storage`` and serve it on ``args.host:args.port`` until interrupted.

    Bad input (journal or grpc storage, a port that cannot be bound, an unreachable database)
    raises ``StorageError`` (one line, exit 2 from the CLI). Returns 0 when stopped.
    """
    url: str = args.storage
    masked = mask_url(url)
    if url.startswith(("journal:", "grpc://")):
        raise StorageError(f"storage-proxy serves a database (postgresql://, mysql://, sqlite:///), not {masked}")
    if not 0 < args.port < 65536:
        raise StorageError(f"storage-proxy --port {args.port}: give a port between 1 and 65535")
    _check_address(args.host, args.port)  # before the storage exists: a refusal leaves nothing behind
    new_file = _new_sqlite_file(url)
    # Optuna's advice: the proxy caches finished trials in process (get_storage wraps RDBStorage)
    storage = optuna.storages.get_storage(open_storage(url))
    print(f"storage proxy for {masked} listening on {args.host}:{args.port} "
          f"(workers: --storage grpc://{args.host}:{args.port})", flush=True)
    try:
        with sigterm_as_interrupt(), warnings.catch_warnings():  # a scheduler's SIGTERM ends it like Ctrl-C
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port,
                                                  thread_pool=ThreadPoolExecutor(max_workers=args.server_threads))
    except KeyboardInterrupt:
        print("storage proxy stopped", flush=True)
        return 0
    except RuntimeError as exc:
        if "bind" in str(exc).lower():  # grpc: "Failed to bind to address ..." (taken since the check)
            if new_file is not None:
                new_file.unlink(missing_ok=True)
            raise _cannot_listen(args.host, args.port) from None
        raise
    return 0


def _cannot_listen(host: str, port: int) -> StorageError:
    return StorageError(f"storage-proxy cannot listen on {host}:{port}: the port is taken or the address is "
                        "not this machine's")


def _check_address(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go: a taken port or a foreign address is refused before
    the storage is opened (which would create a SQLite file)."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            probe.bind(address)
    except OSError:
        raise _cannot_listen(host, port) from None


def _new_sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL that does not exist yet (opening the storage creates it)."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url[len("sqlite:///"):])
    return None if path.exists() else path
