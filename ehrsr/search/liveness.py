"""Is the worker that runs a trial still alive? Who it is, a check that cannot be fooled, and the
one rule that declares a running trial orphaned (``orphan_of``).

A heartbeat only says a worker is late; after a SIGKILL, an out-of-memory kill or a node reboot,
its trial would stay RUNNING for the whole grace period (``STALE_SECONDS``). A worker on the
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

from ehrsr.study_schema import TRIAL

__all__ = ["STALE_SECONDS", "Orphan", "WorkerIdentity", "current_worker", "orphan_of", "worker_gone"]

STALE_SECONDS = 300.0  # a running trial silent this long belongs to a dead process


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


@dataclass(frozen=True)
class Orphan:
    """A RUNNING trial whose process is dead: when it last showed life and what that makes its charge."""

    last_sign: float  # s since the epoch: its last heartbeat, or its start when it never beat
    seconds: float  # from its start to its last sign of life: its charge per device (a dead trial's clock stops)
    worker_gone: bool  # its worker provably ended on this host (else it was silent for STALE_SECONDS)


def orphan_of(trial: Any, now: float) -> Orphan | None:
    """The rule for a dead run, shared by the budget (which charges an orphan only up to its last
    sign of life) and ``record.fail_stale_trials`` (which fails it): a RUNNING trial (a frozen
    trial with ``user_attrs``) is orphaned when its worker is provably gone from this host
    (``worker_gone``) or its last heartbeat (its start, when it never beat) is ``STALE_SECONDS``
    older than ``now`` (s since the epoch). None for a live trial, or one not started."""
    if trial.datetime_start is None:
        return None
    start = trial.datetime_start.timestamp()
    beat = float(trial.user_attrs.get(TRIAL.heartbeat, start))
    gone = worker_gone(trial.user_attrs.get(TRIAL.worker))
    if now - beat < STALE_SECONDS and not gone:
        return None
    return Orphan(last_sign=beat, seconds=max(0.0, beat - start), worker_gone=gone)
