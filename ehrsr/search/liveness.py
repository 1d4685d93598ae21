"""Is the worker that runs a trial still alive? Who it is, and a check that cannot be fooled.

A heartbeat only says a worker is late; after a SIGKILL, an out-of-memory kill or a node reboot,
its trial would stay RUNNING for the whole grace period (``trial.STALE_SECONDS``). A worker on the
same host can do better: if the recorded process no longer exists there, the trial is orphaned
now. "Same host" must be provable, not guessed from a host name: containers on one machine can
share a name but not their process tables, and a rebooted node keeps its name. So a worker is
identified by host name, boot id and pid namespace together, and a pid counts as its own only if
the process there started when the recorded one did (pids are reused).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import psutil

__all__ = ["WorkerIdentity", "current_worker", "worker_gone"]


@dataclass(frozen=True)
class WorkerIdentity:
    """Where a worker process runs: written into its trial's ``worker`` user attribute."""

    host: str  # host name, boot id and pid namespace: equal only on the same running kernel and pid table
    pid: int
    started: float  # the process's creation time (s since the epoch), told apart from a reused pid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> WorkerIdentity | None:
        try:
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]))
        except (TypeError, KeyError, ValueError):
            return None


def _read(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as handle:
        return handle.read().strip()
    return ""


@lru_cache(maxsize=1)
def _host_key() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id")
    pid_ns = ""
    with contextlib.suppress(OSError):
        pid_ns = os.readlink("/proc/self/ns/pid")
    return f"{socket.gethostname()}|{boot}|{pid_ns}"


def current_worker() -> WorkerIdentity:
    """This process, as other workers on the same host can check it."""
    return WorkerIdentity(_host_key(), os.getpid(), psutil.Process().create_time())


def worker_gone(recorded: Any) -> bool:
    """True only when ``recorded`` (a ``worker`` attribute) is provably dead: same host key as this
    process, and its pid is free, a zombie, or now another process. Anything else: False."""
    worker = WorkerIdentity.from_dict(recorded) if not isinstance(recorded, WorkerIdentity) else recorded
    if worker is None or not worker.host or worker.host != _host_key() or not _host_key().split("|")[1]:
        return False  # another machine (or no boot id to prove it is this one): only the heartbeat can tell
    try:
        process = psutil.Process(worker.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return abs(process.create_time() - worker.started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # no permission to look: it exists, so assume it is alive
        return False
