"""Stop signals: SIGTERM is handled as Ctrl-C (docs/scaling_out.md, "What survives which fault").

Schedulers stop a job with SIGTERM and follow with SIGKILL after a grace period (Slurm's
``scancel``, time limit and preemption: ``KillWait``, 30 s by default; Kubernetes: the pod's
``terminationGracePeriodSeconds``, 30 s by default). Python's default for SIGTERM is to die on the
spot, so a search left its trial RUNNING and ``train`` lost everything since its last checkpoint.

Two ways to handle both signals alike:

* ``sigterm_as_interrupt()``: SIGTERM raises ``Terminated``, a ``KeyboardInterrupt``, so every
  ``except KeyboardInterrupt`` that marks a running trial failed and prints the summary handles it.
  The command line installs it for every subcommand; search worker processes and isolated trial
  processes install it too.
* ``deferred_stop()``: Ctrl-C and SIGTERM only set a flag that a loop checks between two steps
  (``train``: the checkpoint it then writes must hold a whole step, never half of one).

Only the first SIGTERM counts: Slurm may deliver it twice (to the task, and forwarded by
``srun``), and a second one must not interrupt the clean-up of the first. A second Ctrl-C does
interrupt it (a person pressing it again wants out). The command line exits with status 130 after
Ctrl-C and 143 after SIGTERM (128 + the signal number, the shell's convention).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CTRL_C",
    "SIGTERM",
    "StopRequest",
    "Terminated",
    "deferred_stop",
    "exit_status",
    "interrupt_name",
    "sigterm_as_interrupt",
]

CTRL_C = "Ctrl-C"
SIGTERM = "SIGTERM"
_EXIT_STATUS = {CTRL_C: 128 + signal.SIGINT, SIGTERM: 128 + signal.SIGTERM}  # 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises ``KeyboardInterrupt``."""


def interrupt_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for ``Terminated``, ``"Ctrl-C"`` for any other ``KeyboardInterrupt``."""
    return SIGTERM if isinstance(exc, Terminated) else CTRL_C


def exit_status(name: str) -> int:
    """The exit status after a stop by ``name`` (``CTRL_C``: 130, ``SIGTERM``: 143)."""
    return _EXIT_STATUS[name]


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and installs them only from there
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the first SIGTERM counts (module docstring)
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread; the previous handler is
    restored on the way out. Off the main thread (where no signal is delivered) it does nothing."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class StopRequest:
    """Set by ``deferred_stop``'s handlers: ``name`` is ``CTRL_C`` or ``SIGTERM`` once one arrived."""

    name: str | None = None

    @property
    def requested(self) -> bool:
        return self.name is not None


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    """While inside, Ctrl-C and SIGTERM set the yielded ``StopRequest`` instead of raising; the
    caller stops at its next safe point. A second Ctrl-C raises ``KeyboardInterrupt`` at once; a
    second SIGTERM is ignored. A signal the process ignores (``nohup``, a background job's SIGINT)
    stays ignored. The previous handlers are restored on the way out."""
    request = StopRequest()
    if not _in_main_thread():
        yield request
        return

    def note(signum: int, frame: Any) -> None:
        name = SIGTERM if signum == signal.SIGTERM else CTRL_C
        if request.name is None:
            request.name = name
        elif name == CTRL_C:
            raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, note)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(sig, handler)
