"""Running the controlled ablation: retrain every variant of a reference at full fidelity, with
several seeds, on the ablation's share of the budget.

``--ablation-seeds auto`` (the default) starts every variant with 2 seeds, then gives another
seed, while the budget lasts and up to 6, only to variants whose PSNR interval over (seed,
validation image) still contains zero (``ehrsr.stats.auto_seed_plan``, docs/statistics.md).
The budget share is a promise: a run starts only when the most expensive run so far still fits,
and its training gets a deadline; one that hits it is recorded ``cut_short`` (docs/budget.md).

Each run is stored as one trial of the ``<study>-ablation`` study (docs/study_schema.md) through
the search's one recording path (``ehrsr.search.record``), so an interrupted ablation resumes
where it stopped, a dead ablation process's run is closed by the same stale-trial rule as a dead
search worker's, and the table can be rebuilt from storage alone (``ehrsr.ablation.table``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ehrsr.ablation.table import CUT_SHORT, ablation_runs, controlled_table, delta_table, stored_runs
from ehrsr.ablation.variants import AblationError, Variant, build_variants, module_settings_from_space
from ehrsr.config import EHRSRConfig
from ehrsr.interrupts import interrupt_name
from ehrsr.search.budget import trial_charge
from ehrsr.search.pareto import knee_trial
from ehrsr.search.record import Heartbeat, TrialOutcome, record_outcome
from ehrsr.stats import SeedPlan, auto_seed_plan
from ehrsr.study_schema import PLAN_ATTR, TRIAL, StudyInfo, ablation_study_name
from ehrsr.training import TrainSettings

__all__ = ["AUTO_MAX_SEEDS", "AUTO_MIN_SEEDS", "AblationResult", "SeedsSetting", "run_controlled_ablation"]

SeedsSetting = int | Literal["auto"]
"""``--ablation-seeds``: a fixed number of seeds per variant, or "auto" (module docstring)."""
AUTO_MIN_SEEDS = 2  # no verdict from one seed (docs/statistics.md)
AUTO_MAX_SEEDS = 6
OVERRUN_MARGIN_FRACTION = 0.05
"""How far past its share the ablation may end (docs/budget.md): a run's training stops at its
deadline between two steps, so the overrun is one training step plus any under-estimate of its
evaluation and profiling; the tests hold the total to share x (1 + this)."""

_clock = time.perf_counter  # wall clock of a run's charge (a module attribute so tests can drive it)


@dataclass
class AblationResult:
    """What ``run_controlled_ablation`` did, and the table."""

    study_name: str  # the <study>-ablation study
    reference_trial: int
    variants: list[Variant]
    seeds: list[int]
    runs_planned: int  # (variant, seed) runs the table asks for (with auto: including the added seeds)
    runs_run: int  # run by this call
    runs_skipped: int  # already stored (resumed)
    stopped: str | None  # why runs were left out (budget), None when all are done
    table: pd.DataFrame = field(repr=False)
    seconds_spent: float = 0.0  # device-seconds charged by every ablation run so far
    seed_mode: str = "fixed"  # "auto" or "fixed"
    seed_plan: SeedPlan | None = None  # the last round of --ablation-seeds auto (None: fixed or no round)


def _runner() -> Callable[..., Any]:
    from ehrsr.search.runner import run_configuration  # heavy (data, training); only when running

    return run_configuration


def _reference_trial(study: optuna.Study, reference: int | None) -> FrozenTrial:
    if reference is None:
        trial = knee_trial(study)
        if trial is None:
            raise AblationError(
                f"study {study.study_name!r} has no finished feasible trial, so there is no Pareto "
                "front and no knee to ablate; run the search first or pass --reference TRIAL"
            )
        return trial
    trials = study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == reference]
    if not match:
        raise AblationError(
            f"--reference {reference}: study {study.study_name!r} has no trial {reference} "
            f"(trials 0..{len(trials) - 1})"
        )
    trial = match[0]
    if trial.state != TrialState.COMPLETE:
        raise AblationError(
            f"--reference {reference}: trial {reference} is {trial.state.name}, not COMPLETE; "
            "only trials trained at full fidelity can be ablated"
        )
    if not trial.user_attrs.get(TRIAL.config):
        raise AblationError(f"--reference {reference}: trial {reference} stores no configuration")
    return trial


def _read_study(study: optuna.Study, reference: int | None) -> tuple[FrozenTrial, Any]:
    """The reference trial and the space's switchable modules (storage reads, retried as one);
    refuses a study whose objectives it does not know."""
    StudyInfo.from_study(study)
    return _reference_trial(study, reference), module_settings_from_space(study)


def _open_ablation_study(study: optuna.Study) -> optuna.Study:
    from ehrsr.ablation.side import open_side_study

    return open_side_study(study, ablation_study_name(study.study_name))


def _charge_estimate(done: Sequence[FrozenTrial], reference: FrozenTrial) -> float:
    """What the next run may cost: the most expensive run so far (on a busy machine runs get
    slower than the first one, so neither the first nor the median is a safe bound); before any
    run, the reference trial's own charge."""
    charges = [trial_charge(t).seconds for t in done if trial_charge(t).seconds > 0]
    if charges:
        return float(max(charges))
    attrs = reference.user_attrs
    return float(attrs.get(TRIAL.charged_seconds) or (attrs.get(TRIAL.seconds) or {}).get("total") or 0.0)


def _overhead_estimate(done: Sequence[FrozenTrial], reference: FrozenTrial) -> float:
    """Seconds of a run that are not training (profiling, evaluation, set-up): the largest seen
    so far (charge minus training time), else the reference trial's (total minus training)."""
    seen = []
    for trial in done:
        train_s = (trial.user_attrs.get(TRIAL.seconds) or {}).get("train")
        charge = trial_charge(trial).seconds
        if train_s is not None and charge > 0:
            seen.append(max(0.0, charge - float(train_s)))
    if seen:
        return float(max(seen))
    seconds = reference.user_attrs.get(TRIAL.seconds) or {}
    if seconds.get("total") is not None and seconds.get("train") is not None:
        return max(0.0, float(seconds["total"]) - float(seconds["train"]))
    return 0.0


def _device_kind(ctx: Any) -> str:
    device = getattr(ctx, "device", None)
    return str(getattr(device, "type", device) or "cpu").split(":")[0]


def run_controlled_ablation(
    study: optuna.Study,
    ctx: Any,
    *,
    reference: int | None = None,
    seeds: SeedsSetting = "auto",
    budget_seconds: float | None = None,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
    steps: int | None = None,
    max_seeds: int = AUTO_MAX_SEEDS,
    fidelity_note: str | None = None,
) -> AblationResult:
    """Run (or resume) the controlled ablation of ``study`` and return its table.

    ``ctx`` is the runner's ``RunContext`` (``ehrsr.search.driver.build_context`` from the
    study's stored context): data, task, objectives and profiling settings. ``reference``: trial
    number to ablate (default: the knee of the Pareto front). ``seeds``: runs per variant (seeds
    0..seeds-1), or ``"auto"``: every variant gets ``AUTO_MIN_SEEDS`` (2) seeds, then, while the
    budget lasts, variants whose PSNR interval still contains zero get one more seed at a time
    (``ehrsr.stats.auto_seed_plan``), up to ``max_seeds``. ``budget_seconds``: device seconds the
    whole ablation study may spend (its stored runs included, so a resumed ablation continues the
    same budget): a run is not started when the most expensive run so far would overrun it, and
    a started run's training gets the rest of the budget (minus its profiling / evaluation
    estimate) as a deadline; a run that hits it is recorded ``cut_short`` and left out of the
    deltas (docs/budget.md). ``steps``: training steps per run (default: the reference trial's,
    i.e. full fidelity); ``fidelity_note`` says why (``ablation.fidelity.ablation_fidelity``) and is
    stored with the plan, so the table says at which fidelity it was measured. ``runner`` replaces ``ehrsr.search.runner.run_configuration`` (tests).
    Runs go seed by seed (every variant's seed 0 first), so a budget cut still leaves one run of
    every variant.
    """
    auto = seeds == "auto"
    if not auto and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise AblationError(f"seeds must be a positive integer or 'auto', got {seeds!r}")
    if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < AUTO_MIN_SEEDS:
        raise AblationError(f"max_seeds must be an integer >= {AUTO_MIN_SEEDS}, got {max_seeds!r}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise AblationError(f"budget_seconds must be > 0 or None, got {budget_seconds!r}")
    from ehrsr.ablation.side import (  # the search's run path: imported when running
        finished_runs,
        storage_retry,
    )

    ref_trial, (switchable, settings) = storage_retry("read the study", _read_study, study, reference)
    ref_config = EHRSRConfig.from_dict(ref_trial.user_attrs[TRIAL.config])
    stored_train = dict(ref_trial.user_attrs.get(TRIAL.train) or {})
    steps = int(steps if steps is not None else stored_train.get("steps", 0))
    if steps < 1:
        raise AblationError(
            f"reference trial {ref_trial.number} records no training steps (user_attrs['train']['steps']); "
            "pass steps="
        )
    try:
        train = TrainSettings.from_dict({**stored_train, "steps": steps}, ignore=("seed",))
    except (TypeError, ValueError) as exc:
        raise AblationError(f"reference trial {ref_trial.number}'s stored training settings: {exc}") from None
    variants = build_variants(ref_config, switchable, settings)
    seed_list = list(range(AUTO_MIN_SEEDS if auto else int(seeds)))

    ablation = _open_ablation_study(study)  # closes runs of dead processes (fail_stale_trials)
    storage_retry("write the plan", ablation.set_user_attr, TRIAL.reference_trial, ref_trial.number)
    plan_attr: dict[str, Any] = {
        "reference_trial": ref_trial.number,
        "seeds": seed_list,
        "seed_mode": "auto" if auto else "fixed",
        "max_seeds": max_seeds if auto else len(seed_list),
        "steps": steps,
        "fidelity": fidelity_note or f"at the reference trial's {steps} steps",
        "variants": [v.to_dict() for v in variants],
    }
    storage_retry("write the plan", ablation.set_user_attr, PLAN_ATTR, plan_attr)
    planned = [(v, s) for s in seed_list for v in variants if v.runnable]

    run = runner or _runner()
    kind = _device_kind(ctx)
    state = _Progress()
    attempted: set[tuple[str, int]] = set()

    def is_stored(variant: Variant, seed: int) -> bool:
        previous = storage_retry("read the runs", stored_runs, ablation, ref_trial.number, steps).get((variant.name, seed))
        return previous is not None and previous.user_attrs.get(TRIAL.config) == variant.config.to_dict()

    def run_all(pairs: Sequence[tuple[Variant, int]]) -> bool:
        """Run the pairs not stored yet, within the budget; False once the budget stops them."""
        todo = [(v, s) for v, s in pairs if (v.name, s) not in attempted and not is_stored(v, s)]
        for index, (variant, seed) in enumerate(todo):
            finished = finished_runs(ablation)
            spent = sum(trial_charge(t).seconds for t in finished)
            mine = [t for t in finished if t.user_attrs.get(TRIAL.reference_trial) == ref_trial.number]
            estimate = _charge_estimate(mine, ref_trial)
            deadline = None
            if budget_seconds is not None:
                if spent + estimate > budget_seconds:
                    left = len(todo) - index
                    state.stopped = (
                        f"ablation budget of {budget_seconds:.0f} s reached: {spent:.0f} s spent, the next run "
                        f"needs about {estimate:.0f} s (the costliest run so far, or the reference trial before any); {left} run"
                        f"{'s' if left != 1 else ''} left out"
                    )
                    return False
                deadline = max(0.0, budget_seconds - spent - _overhead_estimate(mine, ref_trial))
            attempted.add((variant.name, seed))
            status, reason = _run_one(ablation, run, ctx, variant, seed, ref_trial.number, train, kind, deadline)
            state.ran += 1
            state.bar(f"{variant.name} seed {seed}")
            if status != "complete" and progress:
                print(f"[ablation] {variant.name} seed {seed}: {status}: {reason}", file=sys.stderr)
            if status == CUT_SHORT:
                state.stopped = (
                    f"ablation budget of {budget_seconds:.0f} s reached: {variant.name} seed {seed} was cut short "
                    "at its training deadline and is left out of the table"
                )
                return False
        return True

    skipped = sum(1 for v, s in planned if is_stored(v, s))
    state.bar = _progress(None if auto else len(planned) - skipped, progress, f"ablation of trial {ref_trial.number}")
    seed_plan: SeedPlan | None = None
    try:
        within = run_all(planned)
        while auto and within:
            seed_plan, pairs = _next_auto_round(
                ablation, ref_trial, variants, steps, budget_seconds, max_seeds, attempted
            )
            if not pairs:
                break
            state.extra_planned += len(pairs)
            within = run_all(pairs)
    finally:
        state.bar(None)
    if state.stopped and progress:
        print(state.stopped, file=sys.stderr)

    used = storage_retry("read the runs", stored_runs, ablation, ref_trial.number, steps)
    highest = max([s for _, s in used] + [len(seed_list) - 1]) if auto else len(seed_list) - 1
    seed_list = list(range(highest + 1))
    if plan_attr["seeds"] != seed_list:
        storage_retry("write the plan", ablation.set_user_attr, PLAN_ATTR, {**plan_attr, "seeds": seed_list})
    runs = storage_retry("read the runs", ablation_runs, ablation, ref_trial.number, seeds=seed_list, steps=steps)
    table = controlled_table(runs, variants)
    finished = finished_runs(ablation)
    return AblationResult(
        study_name=ablation.study_name,
        reference_trial=ref_trial.number,
        variants=variants,
        seeds=seed_list,
        runs_planned=len(planned) + state.extra_planned,
        runs_run=state.ran,
        runs_skipped=skipped,
        stopped=state.stopped,
        table=table,
        seconds_spent=sum(trial_charge(t).seconds for t in finished),
        seed_mode="auto" if auto else "fixed",
        seed_plan=seed_plan,
    )


@dataclass
class _Progress:
    ran: int = 0
    extra_planned: int = 0  # runs added by --ablation-seeds auto rounds
    stopped: str | None = None
    bar: Callable[[str | None], None] = lambda label: None


def _next_auto_round(
    ablation: optuna.Study,
    ref_trial: FrozenTrial,
    variants: Sequence[Variant],
    steps: int,
    budget_seconds: float | None,
    max_seeds: int,
    attempted: set[tuple[str, int]],
) -> tuple[SeedPlan | None, list[tuple[Variant, int]]]:
    """One round of ``--ablation-seeds auto``: the (variant, seed) runs that give the undecided
    variants (PSNR interval over (seed, image) containing zero) one more seed, as
    ``stats.auto_seed_plan`` picks them within the remaining budget. Variants without per-image
    values (runs stored before they existed) stay at their seeds."""
    from ehrsr.ablation.side import finished_runs, storage_retry

    by_name = {v.name: v for v in variants}

    def source(name: str) -> Variant:
        variant = by_name[name]
        return by_name[variant.same_as] if variant.same_as else variant

    done = storage_retry("read the runs", stored_runs, ablation, ref_trial.number, steps)
    runs = storage_retry("read the runs", ablation_runs, ablation, ref_trial.number, steps=steps)
    complete = runs[runs["status"] == "complete"]
    finished = finished_runs(ablation)
    mine = [t for t in finished if t.user_attrs.get(TRIAL.reference_trial) == ref_trial.number]
    estimate = _charge_estimate(mine, ref_trial)
    remaining = math.inf if budget_seconds is None else budget_seconds - sum(trial_charge(t).seconds for t in finished)

    deltas: dict[str, Any] = {}
    missing: dict[str, list[tuple[Variant, int]]] = {}
    for variant in variants:
        if variant.compare_to is None or variant.refused or source(variant.name).config is None:
            continue
        mine_runs = complete[complete["variant"] == source(variant.name).name].set_index("seed")
        other_runs = complete[complete["variant"] == source(variant.compare_to).name].set_index("seed")
        paired = sorted(set(mine_runs.index) & set(other_runs.index))
        if not paired:
            continue
        table, unit = delta_table(mine_runs, other_runs, "psnr", paired)
        if unit != "seed x image" or table.shape[1] < 2:
            continue
        sides = (source(variant.name), source(variant.compare_to))
        seed = next((s for s in range(max_seeds) if any((v.name, s) not in done for v in sides)), None)
        deltas[variant.name] = table  # auto_seed_plan marks it at_max when it has max_seeds already
        missing[variant.name] = [] if seed is None else [
            (v, seed) for v in sides if (v.name, seed) not in done and (v.name, seed) not in attempted
        ]
    if not deltas:
        return None, []
    cost = {name: estimate * max(1, len(pairs)) for name, pairs in missing.items()}
    plan = auto_seed_plan(deltas, remaining, cost, min_seeds=AUTO_MIN_SEEDS, max_seeds=max_seeds)
    pairs: list[tuple[Variant, int]] = []
    for name in plan.next_seed:
        pairs += [p for p in missing[name] if (p[0].name, p[1]) not in {(v.name, s) for v, s in pairs}]
    return plan, pairs


def _progress(total: int | None, enabled: bool, description: str) -> Callable[[str | None], None]:
    """A tqdm bar advanced by calling it with a label; called with None it closes."""
    if not enabled:
        return lambda label: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="run", file=sys.stderr)

    def step(label: str | None) -> None:
        if label is None:
            bar.close()
        else:
            bar.set_postfix_str(label)
            bar.update(1)

    return step


def _run_one(
    ablation: optuna.Study,
    run: Callable[..., Any],
    ctx: Any,
    variant: Variant,
    seed: int,
    reference_trial: int,
    train: TrainSettings,
    device_kind: str,
    train_seconds: float | None = None,
) -> tuple[str, str | None]:
    """Train and measure one (variant, seed) (training stopped after ``train_seconds``), store it
    as a trial of the ablation study, and return its (status, reason)."""
    from ehrsr.ablation.side import start_run, storage_retry

    assert variant.config is not None
    trial = storage_retry("ask for a run", ablation.ask)
    attrs = {TRIAL.variant: variant.name, TRIAL.kind: variant.kind, TRIAL.module: variant.module, TRIAL.seed: seed,
             TRIAL.reference_trial: reference_trial, TRIAL.config: variant.config.to_dict(),
             TRIAL.train: {**dataclasses.asdict(train), "seed": seed}}
    storage_retry("start a run", start_run, trial, attrs, device_kind)
    start = _clock()
    heartbeat = Heartbeat(ablation, trial._trial_id)
    storage_retry("start the heartbeat", heartbeat.__enter__)
    try:
        try:
            # train_seconds only with a budget: a runner without a deadline need not take the keyword
            extra = {} if train_seconds is None else {TRIAL.train_seconds: train_seconds}
            result = run(variant.config, train, ctx, seed=seed, **extra)
        finally:
            heartbeat.__exit__(None, None, None)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (ehrsr.interrupts)
        storage_retry("record a run", record_outcome, ablation, trial,
                      TrialOutcome.failed("interrupted", f"interrupted ({interrupt_name(exc)})"),
                      wall_seconds=_clock() - start)
        raise
    except Exception as exc:  # a crash of one run must not lose the others: record it, go on
        failed = TrialOutcome.failed("error", f"{type(exc).__name__}: {exc}"[:500])
        outcome = storage_retry("record a run", record_outcome, ablation, trial, failed, wall_seconds=_clock() - start)
        return outcome.status, outcome.reason
    outcome = TrialOutcome(
        status=result.status,
        reason=str(result.reason) if result.reason else None,
        values=list(result.values or []),
        metrics=dict(result.metrics or {}),
        seconds=dict(result.seconds or {}),
        steps_done=int(result.steps_done),
        # RunResult.per_image; getattr: a runner stand-in (tests) may return a result without it
        per_image=getattr(result, "per_image", None) if result.status == "complete" else None,
        loss_history=getattr(result, "loss_history", None) if result.status == "complete" else None,
    )
    outcome = storage_retry("record a run", record_outcome, ablation, trial, outcome, wall_seconds=_clock() - start)
    return outcome.status, (None if outcome.status == "complete" else outcome.reason)
