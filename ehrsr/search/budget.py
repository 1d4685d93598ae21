"""Search budgets: parsing ``--budget`` and accounting for it in the Optuna storage.

A budget is one or more limits joined by commas; the first one exhausted stops the search::

    gpu-hours=48        device-seconds of trials that ran on CUDA, / 3600
    cpu-hours=2         device-seconds of trials that ran on the CPU, / 3600
    hours=1.5           device-seconds of every trial whatever its device, / 3600
    minutes=10          the same, / 60
    trials=30           trials that ran (refused-before-training ones and recorded repeats do
                        not count)

A trial's *charge* is its wall time times the devices it used (one GPU = one device; a CPU trial
is one device whatever its thread count). Each trial records its own charge in its user
attributes (``record_start`` when it begins, ``record_charge`` when it ends), and the spent budget
is the sum over the study's trials, read from the storage. So every worker on the storage sees
the same total, resumes continue from it, and no worker ever read-modify-writes a shared counter.

How each trial is counted:

* ``WAITING`` (enqueued, not started): nothing.
* refused before training (user attribute ``refused``): nothing, neither time nor ``trials``.
* a recorded repeat (user attribute ``repeat_of``, see ``ehrsr.search.revisits`` and
  docs/search_spaces.md "Repeated configurations"): its charge (0 s: it did not train) and not a
  ``trials`` slot, so ``trials=N`` means N configurations actually trained; a converged sampler
  that only repeats is stopped by ``RepeatPolicy.max_consecutive``, not by the budget.
* ``RUNNING``: its elapsed wall time so far (``now - datetime_start``) times its devices; it
  counts as one trial. An orphan (``liveness.orphan_of``: its worker provably gone from this
  host, or silent for ``liveness.STALE_SECONDS``) is charged only up to its last heartbeat: a dead
  trial's clock stops. When deciding whether a new trial may start (``allows_new_trial``) a
  running trial is counted as ``max(elapsed, estimate)``: it will most likely use the estimate.
* ``COMPLETE``/``PRUNED``/``FAIL``: ``charged_seconds`` if recorded, else
  ``datetime_complete - datetime_start`` times its devices (a worker killed mid-trial leaves no
  charge; Optuna's heartbeat or the driver later marks that trial failed, and its time up to then
  is charged).

Cost: a finished trial's charge never changes, so each process sums it once (``_Ledger``, with
``ehrsr.search.settled``); a budget query then reads only the trials not finished yet and those
finished since the last query, however long the study.

Clocks: Optuna stores ``datetime_start`` in the local time of the worker that started the trial,
so workers on several machines should share a time zone and NTP-synchronised clocks.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from optuna.trial import TrialState

from ehrsr.search.liveness import orphan_of
from ehrsr.search.settled import FinishedScan, read_trials, study_cache
from ehrsr.study_schema import TRIAL

__all__ = [
    "UNITS",
    "Budget",
    "BudgetError",
    "BudgetLimit",
    "Spent",
    "TrialCharge",
    "charge_of",
    "check_budget_device",
    "estimate_trial_seconds",
    "parse_budget",
    "record_charge",
    "record_refused",
    "record_start",
    "start_attrs",
    "trial_charge",
]

UNITS: tuple[str, ...] = ("gpu-hours", "cpu-hours", "hours", "minutes", "trials")
_SECONDS_PER_UNIT = {"gpu-hours": 3600.0, "cpu-hours": 3600.0, "hours": 3600.0, "minutes": 60.0}
_UNIT_KIND = {"gpu-hours": "cuda", "cpu-hours": "cpu"}  # time units that count one device kind
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class BudgetError(ValueError):
    """A budget is malformed or cannot be honoured on this machine (one line, for the CLI)."""


@dataclass(frozen=True)
class BudgetLimit:
    """One limit of a budget, in the unit the user wrote (``gpu-hours=48``)."""

    unit: str
    amount: float

    @property
    def amount_text(self) -> str:
        return str(int(self.amount)) if float(self.amount).is_integer() else str(self.amount)

    def describe(self) -> str:
        return f"{self.unit}={self.amount_text}"

    @property
    def seconds(self) -> float | None:
        """The limit in device-seconds; None for ``trials``."""
        factor = _SECONDS_PER_UNIT.get(self.unit)
        return None if factor is None else self.amount * factor


@dataclass(frozen=True)
class Spent:
    """What a study has used so far."""

    gpu_seconds: float  # device-seconds charged by CUDA trials
    cpu_seconds: float  # device-seconds charged by CPU trials
    total_seconds: float  # device-seconds charged by every trial, any device
    trials: int  # trials that ran or are running (refused ones excluded)
    running: int  # of which still running
    refused: int  # trials refused before training (not in ``trials``)
    orphaned: int = 0  # of the running ones, those whose worker is dead (not yet marked failed)
    repeats: int = 0  # recorded repeats of finished configurations (not in ``trials``)

    def amount(self, unit: str) -> float:
        """Spent in a budget unit's own terms (GPU-hours, minutes, trials, ...)."""
        if unit == "trials":
            return float(self.trials)
        seconds = {"gpu-hours": self.gpu_seconds, "cpu-hours": self.cpu_seconds}.get(unit, self.total_seconds)
        return seconds / _SECONDS_PER_UNIT[unit]

    def describe(self) -> str:
        parts = [f"{self.trials} trial{'s' if self.trials != 1 else ''}"]
        if self.repeats:
            parts[0] += f" (+{self.repeats} recorded repeat{'s' if self.repeats != 1 else ''})"
        if self.gpu_seconds:
            parts.append(f"{self.gpu_seconds / 3600:.3g} GPU-hours")
        if self.cpu_seconds:
            parts.append(f"{self.cpu_seconds / 3600:.3g} CPU-hours")
        parts.append(f"{self.total_seconds / 60:.3g} device-minutes in all")
        return ", ".join(parts)


@dataclass(frozen=True)
class TrialCharge:
    """One trial's share of the budget."""

    seconds: float  # device-seconds (wall x devices)
    device_kind: str | None  # None when the trial never recorded it
    counted: bool  # counts toward ``trials``
    running: bool
    refused: bool
    orphaned: bool = False  # RUNNING, but its worker is provably dead or silent: charged to its last sign of life
    repeat: bool = False  # a recorded repeat: not counted toward ``trials``


# ---------------------------------------------------------------------------------------------
# parsing


def parse_budget(text: str) -> Budget:
    """Parse ``gpu-hours=48``, ``minutes=10``, ``trials=30,hours=2`` ... (see the module docstring).

    Malformed text raises ``BudgetError`` with one line naming what is wrong.
    """
    if not isinstance(text, str) or not text.strip():
        raise BudgetError("empty budget; give UNIT=AMOUNT, e.g. gpu-hours=48, minutes=10 or trials=30")
    limits: list[BudgetLimit] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise BudgetError(f"budget {text!r} has an empty item; separate limits with single commas")
        if "=" not in item:
            raise BudgetError(f"budget item {item!r} has no '='; write UNIT=AMOUNT, e.g. trials=30")
        unit, _, amount_text = (part.strip() for part in item.partition("="))
        unit = unit.lower()
        if unit not in UNITS:
            raise BudgetError(f"unknown budget unit {unit!r} in {item!r}; valid units: {', '.join(UNITS)}")
        try:
            amount = float(amount_text)
        except ValueError:
            raise BudgetError(f"budget amount {amount_text!r} of {unit} is not a number") from None
        if not math.isfinite(amount):
            raise BudgetError(f"budget amount of {unit} must be a finite number, got {amount_text!r}")
        if amount <= 0:
            raise BudgetError(f"budget amount of {unit} must be > 0, got {amount_text}")
        if unit == "trials" and not amount.is_integer():
            raise BudgetError(f"trials must be a whole number, got {amount_text}")
        if any(limit.unit == unit for limit in limits):
            raise BudgetError(f"budget unit {unit!r} is given twice in {text!r}")
        if {unit, *(limit.unit for limit in limits)} >= {"hours", "minutes"}:
            raise BudgetError("hours and minutes both limit the total device time; give one of them")
        limits.append(BudgetLimit(unit, int(amount) if unit == "trials" else amount))
    return Budget(tuple(limits), text.strip())


def check_budget_device(budget: Budget, cuda_available: bool, device_kind: str | None = None) -> None:
    """Refuse budgets this machine cannot spend: ``gpu-hours`` without CUDA, or a budget whose
    only limits count a device kind the trials will not run on (it would never be exhausted)."""
    units = {limit.unit for limit in budget.limits}
    if "gpu-hours" in units and not cuda_available:
        limit = next(limit for limit in budget.limits if limit.unit == "gpu-hours")
        raise BudgetError(
            f"{limit.describe()} needs a CUDA GPU and none is available; "
            f"budget CPU time with cpu-hours=... or minutes=... (or use trials=...)"
        )
    if (
        device_kind is not None
        and units <= set(_UNIT_KIND)
        and all(_UNIT_KIND[unit] != device_kind for unit in units)
    ):
        raise BudgetError(
            f"budget {budget.describe_short()} only counts "
            f"{' and '.join(sorted(_UNIT_KIND[u] for u in units))} trials but the trials run on "
            f"{device_kind}, so it would never be spent; use hours=..., minutes=... or trials=..."
        )


# ---------------------------------------------------------------------------------------------
# recording (called by the driver inside each trial)


def start_attrs(device_kind: str, n_devices: int = 1) -> dict[str, Any]:
    """The attributes ``record_start`` writes: which device kind and how many devices a trial uses."""
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    return {TRIAL.device_kind: str(device_kind), TRIAL.n_devices: int(n_devices)}


def record_start(trial: Any, device_kind: str, n_devices: int = 1) -> None:
    """Mark which device kind and how many devices a trial uses (set at its start, so a running
    trial is charged to the right limit)."""
    from ehrsr.search.storage import set_user_attrs

    set_user_attrs(trial, start_attrs(device_kind, n_devices))


def charge_of(trial: Any, wall_seconds: float, n_devices: int | None = None) -> float:
    """A finished trial's charge: ``wall_seconds`` x its devices (recorded at its start)."""
    if n_devices is None:
        n_devices = int(getattr(trial, "user_attrs", {}).get(TRIAL.n_devices, 1))
    return max(0.0, float(wall_seconds)) * n_devices


def record_charge(trial: Any, wall_seconds: float, n_devices: int | None = None) -> float:
    """Record a finished trial's charge (``wall_seconds`` x devices) and return it."""
    charged = charge_of(trial, wall_seconds, n_devices)
    trial.set_user_attr(TRIAL.charged_seconds, charged)
    return charged


def record_refused(trial: Any, reason: str) -> None:
    """Mark a trial refused before training: it costs no budget and does not count as a trial."""
    trial.set_user_attr(TRIAL.refused, str(reason))


# ---------------------------------------------------------------------------------------------
# accounting


def _elapsed_seconds(start: datetime, now: datetime | None) -> float:
    if now is None:
        now = datetime.now(start.tzinfo) if start.tzinfo is not None else datetime.now()
    elif (now.tzinfo is None) != (start.tzinfo is None):
        now = now.astimezone(start.tzinfo) if start.tzinfo is not None else now.astimezone().replace(tzinfo=None)
    return max(0.0, (now - start).total_seconds())


def trial_charge(trial: Any, now: datetime | None = None) -> TrialCharge:
    """One frozen trial's charge (see the module docstring for the rules)."""
    attrs = trial.user_attrs
    kind = attrs.get(TRIAL.device_kind)
    n_devices = int(attrs.get(TRIAL.n_devices, 1))
    if trial.state == TrialState.WAITING:
        return TrialCharge(0.0, kind, counted=False, running=False, refused=False)
    if TRIAL.refused in attrs:
        return TrialCharge(0.0, kind, counted=False, running=trial.state == TrialState.RUNNING, refused=True)
    if TRIAL.repeat_of in attrs and trial.state != TrialState.RUNNING:
        seconds = float(attrs.get(TRIAL.charged_seconds, 0.0))
        return TrialCharge(seconds, kind, counted=False, running=False, refused=False, repeat=True)
    if trial.state == TrialState.RUNNING:
        orphan = orphan_of(trial, (now or datetime.now()).timestamp())
        if orphan is not None:  # charged as ``fail_stale_trials`` will charge it
            return TrialCharge(orphan.seconds * n_devices, kind, counted=True, running=True, refused=False,
                               orphaned=True)
        seconds = _elapsed_seconds(trial.datetime_start, now) * n_devices if trial.datetime_start else 0.0
        return TrialCharge(seconds, kind, counted=True, running=True, refused=False)
    if TRIAL.charged_seconds in attrs:
        seconds = float(attrs[TRIAL.charged_seconds])
    elif trial.datetime_start is not None and trial.datetime_complete is not None:
        seconds = max(0.0, (trial.datetime_complete - trial.datetime_start).total_seconds()) * n_devices
    else:
        seconds = 0.0
    return TrialCharge(seconds, kind, counted=True, running=False, refused=False)


class _Tally:
    """``Spent`` summed one charge at a time, in the order given (float sums are left to right)."""

    def __init__(self) -> None:
        self.gpu_seconds: float = 0
        self.cpu_seconds: float = 0
        self.total_seconds: float = 0
        self.trials = self.running = self.refused = self.orphaned = self.repeats = 0

    def add(self, charge: TrialCharge) -> None:
        if charge.device_kind == "cuda":
            self.gpu_seconds += charge.seconds
        if charge.device_kind == "cpu":
            self.cpu_seconds += charge.seconds
        self.total_seconds += charge.seconds
        self.trials += charge.counted
        self.running += charge.running and charge.counted
        self.refused += charge.refused
        self.orphaned += charge.orphaned
        self.repeats += charge.repeat

    def copy(self) -> _Tally:
        tally = _Tally()
        tally.__dict__.update(self.__dict__)
        return tally

    def spent(self) -> Spent:
        return Spent(self.gpu_seconds, self.cpu_seconds, self.total_seconds, self.trials, self.running,
                     self.refused, self.orphaned, self.repeats)


def _sum(charges: list[TrialCharge]) -> Spent:
    tally = _Tally()
    for charge in charges:
        tally.add(charge)
    return tally.spent()


class _Ledger:
    """The charges of a study's finished trials as this process has read them (a finished trial's
    charge never changes; ``ehrsr.search.settled``): ``prefix`` sums every trial numbered below
    ``mark`` (all finished), ``above`` holds the finished ones from there on, and ``ran`` the
    sorted charges ``estimate_trial_seconds`` takes its median from, by device kind."""

    def __init__(self) -> None:
        self.scan = FinishedScan()
        self.clear()

    def clear(self) -> None:
        self.prefix = _Tally()
        self.mark = 0
        self.above: dict[int, TrialCharge] = {}
        self.ran: dict[str | None, list[float]] = {}  # device kind -> sorted charges
        self.ran_all: list[float] = []

    def read(self, study: Any) -> list[Any]:
        """Take in the trials finished since the last read; returns the study's trials."""
        trials = read_trials(study)
        new, reset = self.scan.update(trials)
        if reset:
            self.clear()
        for frozen in new:
            charge = trial_charge(frozen)
            self.above[frozen.number] = charge
            if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED) and not charge.refused and charge.seconds > 0:
                bisect.insort(self.ran.setdefault(charge.device_kind, []), charge.seconds)
                bisect.insort(self.ran_all, charge.seconds)
        while self.mark < self.scan.settled:
            self.prefix.add(self.above.pop(self.mark))
            self.mark += 1
        return trials


def _ledger(study: Any) -> _Ledger:
    return study_cache(study, "budget ledger", _Ledger)


def _median_of_sorted(values: list[float]) -> float:
    """``statistics.median`` of an already sorted list, without sorting it again."""
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def estimate_trial_seconds(study: Any, prior_seconds: float, device_kind: str | None = None) -> float:
    """Expected charge of the next trial: the median charge of the study's trials that ran to an
    end (complete or stopped early; of ``device_kind`` when given), or ``prior_seconds`` (the
    space's ``seconds_per_trial_estimate``) before there are any."""
    ledger = _ledger(study)
    with ledger.scan.lock:
        ledger.read(study)
        if device_kind is None:
            charges = ledger.ran_all
        else:  # a trial that never recorded its device kind counts for every kind
            of_kind, unknown = ledger.ran.get(device_kind, []), ledger.ran.get(None, [])
            charges = sorted(of_kind + unknown) if unknown else of_kind
        return float(_median_of_sorted(charges)) if charges else float(prior_seconds)


class Budget:
    """Parsed limits plus the accounting against a study. Build with ``parse_budget``."""

    def __init__(self, limits: tuple[BudgetLimit, ...], text: str = "") -> None:
        if not limits:
            raise BudgetError("a budget needs at least one limit")
        self.limits = limits
        self.text = text or ",".join(limit.describe() for limit in limits)

    def __repr__(self) -> str:
        return f"Budget({self.describe_short()!r})"

    def describe_short(self) -> str:
        return ",".join(limit.describe() for limit in self.limits)

    def describe(self) -> str:
        """Plain-English description, e.g. 'at most 48 GPU-hours (CUDA trials' device time) or
        30 trials, whichever is exhausted first'."""
        words = {
            "gpu-hours": "GPU-hours (device time of CUDA trials)",
            "cpu-hours": "CPU-hours (device time of CPU trials)",
            "hours": "hours of device time (all trials)",
            "minutes": "minutes of device time (all trials)",
            "trials": "trials",
        }
        parts = [f"{limit.amount_text} {words[limit.unit]}" for limit in self.limits]
        text = "at most " + " or ".join(parts)
        return text + (", whichever is exhausted first" if len(parts) > 1 else "")

    # -- accounting -------------------------------------------------------------------------------
    def spent(self, study: Any, now: datetime | None = None) -> Spent:
        """Everything charged so far by the study's trials (all workers, all sessions)."""
        ledger = _ledger(study)
        with ledger.scan.lock:
            trials = ledger.read(study)
            tally = ledger.prefix.copy()
            for frozen in trials[ledger.mark:]:
                charge = ledger.above.get(frozen.number)
                tally.add(charge if charge is not None else trial_charge(frozen, now))
            return tally.spent()

    def remaining(self, study: Any, now: datetime | None = None) -> dict[str, float]:
        """What is left of each limit, in its own unit (never below 0)."""
        spent = self.spent(study, now)
        return {limit.unit: max(0.0, limit.amount - spent.amount(limit.unit)) for limit in self.limits}

    def used_fraction(self, spent: Spent) -> float:
        """Share of the budget used, for a progress bar: the largest share over the limits (the
        search stops when the first one is exhausted), capped at 1."""
        return min(1.0, max(spent.amount(limit.unit) / limit.amount for limit in self.limits))

    def exhausted(self, study: Any, now: datetime | None = None) -> str | None:
        """The first exhausted limit, described (e.g. 'trials=3 reached: 3 trials ran'), or None."""
        return self._exhausted(self.spent(study, now))

    def _exhausted(self, spent: Spent) -> str | None:
        for limit in self.limits:
            used = spent.amount(limit.unit)
            if used >= limit.amount:
                return f"{limit.describe()} reached: {spent.describe()}"
        return None

    def allows_new_trial(
        self,
        study: Any,
        estimate_seconds: float,
        *,
        device_kind: str | None = None,
        trial_number: int | None = None,
        now: datetime | None = None,
    ) -> tuple[bool, str]:
        """May one more trial start? Only if no limit is exhausted and every limit that would be
        charged for it (all of them when ``device_kind`` is None) covers ``estimate_seconds``.

        Running trials count as ``max(elapsed, estimate_seconds)``. Call it once before
        ``study.ask()`` and again with ``trial_number`` (the asked trial's number) afterwards:
        then only trials numbered below it count, so when several workers race for the last
        slot, the lower-numbered trial wins and the others (told FAIL with ``record_refused``)
        cost nothing.
        """
        ledger = _ledger(study)
        with ledger.scan.lock:
            trials = ledger.read(study)
            below = trial_number if trial_number is not None else len(trials)
            # the trials below ``mark`` are finished and summed; a trial numbered below them
            # (not the running trial a worker just asked for) is summed from scratch
            tally = ledger.prefix.copy() if below >= ledger.mark else _Tally()
            for frozen in trials[ledger.mark if below >= ledger.mark else 0:]:
                if frozen.number >= below:
                    continue
                charge = ledger.above.get(frozen.number) or trial_charge(frozen, now)
                if charge.running and charge.counted:
                    charge = TrialCharge(max(charge.seconds, estimate_seconds), charge.device_kind, True, True, False)
                tally.add(charge)
        spent = tally.spent()
        reason = self._exhausted(spent)
        if reason is not None:
            return False, reason
        for limit in self.limits:
            if limit.unit == "trials":
                continue  # not exhausted means at least one more trial fits
            kind = _UNIT_KIND.get(limit.unit)
            if kind is not None and device_kind is not None and kind != device_kind:
                continue  # this trial will not be charged to that limit
            left_seconds = limit.seconds - spent.amount(limit.unit) * _SECONDS_PER_UNIT[limit.unit]
            if left_seconds < estimate_seconds:
                return False, (
                    f"{limit.describe()}: {left_seconds:.0f} device-seconds left, less than the "
                    f"{estimate_seconds:.0f} s a trial is estimated to cost"
                )
        return True, f"within budget {self.describe_short()} ({spent.describe()})"
