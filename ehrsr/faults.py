"""Fault injection for the "every fault survived" tests (docs/scaling_out.md, "What survives which fault").

A search must survive a diverging loss, an out-of-memory error, a crash inside profiling and any
other exception in a trial: each ends only its own trial, with its reason recorded. Those faults
are rare and hard to provoke on purpose, so the environment variable ``EHRSR_FAULT`` injects them
at the places where they really happen:

* ``nan@step:5``: the training loss of step 5 becomes NaN (training reports "diverged");
* ``oom@step:3``: training step 3 raises the out-of-memory ``RuntimeError`` PyTorch raises;
* ``profile-error``: ``profile_model`` raises a ``RuntimeError``;
* ``trial-exception``: the trial raises a ``RuntimeError`` before it starts training.

``@trial:N`` limits a fault to trial number N (e.g. ``nan@step:2@trial:1``); without it every
trial is hit. The variable is read each time it is checked (cheap), so it also reaches spawned
worker and trial processes. Unset, nothing changes: every check returns at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ENV_VAR", "KINDS", "Fault", "FaultSpecError", "active_fault", "hits", "inject", "set_trial"]

ENV_VAR = "EHRSR_FAULT"
KINDS = ("nan", "oom", "profile-error", "trial-exception")

_current_trial: int | None = None  # the trial this process is running (set by the trial code)


class FaultSpecError(ValueError):
    """A malformed ``EHRSR_FAULT`` value (a test's mistake: it must not pass silently)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None = None  # training step (1-based) for nan / oom; None: every step
    trial: int | None = None  # trial number; None: every trial


def parse_fault(text: str) -> Fault:
    """``kind[@step:N][@trial:N]`` -> ``Fault``."""
    kind, *parts = text.strip().split("@")
    if kind not in KINDS:
        raise FaultSpecError(f"{ENV_VAR}={text!r}: unknown fault {kind!r}; one of {', '.join(KINDS)}")
    fields: dict[str, int] = {}
    for part in parts:
        key, _, value = part.partition(":")
        if key not in ("step", "trial") or not value.isdigit():
            raise FaultSpecError(f"{ENV_VAR}={text!r}: {part!r} is not step:N or trial:N")
        fields[key] = int(value)
    return Fault(kind, **fields)


def active_fault() -> Fault | None:
    text = os.environ.get(ENV_VAR, "").strip()
    return parse_fault(text) if text else None


def set_trial(number: int | None) -> None:
    """Say which trial this process runs now (``@trial:N`` faults hit only that one)."""
    global _current_trial
    _current_trial = number


def hits(kind: str, step: int | None = None) -> bool:
    """True when the active fault is ``kind`` and matches ``step`` and the current trial."""
    fault = active_fault()
    if fault is None or fault.kind != kind:
        return False
    if fault.trial is not None and fault.trial != _current_trial:
        return False
    return fault.step is None or step is None or fault.step == step


def inject(kind: str, step: int | None = None) -> None:
    """Raise the error of a raising fault (``oom``, ``profile-error``, ``trial-exception``) when it hits."""
    if not hits(kind, step):
        return
    if kind == "oom":
        # the message PyTorch's allocators raise, so is_out_of_memory() recognises it as the real one
        raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {ENV_VAR})")
    raise RuntimeError(f"injected fault {kind} ({ENV_VAR})")
