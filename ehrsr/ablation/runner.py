"""Running the controlled ablation: retrain every variant of a reference at full fidelity, with
several seeds, on the ablation's share of the budget.

Each run is stored as one trial of the ``<study>-ablation`` study (docs/study_schema.md) through
the search's one recording path (``ehrsr.search.record``), so an interrupted ablation resumes
where it stopped, a dead ablation process's run is closed by the same stale-trial rule as a dead
search worker's, and the table can be rebuilt from storage alone (``ehrsr.ablation.table``).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ehrsr.ablation.table import ablation_runs, controlled_table, stored_runs
from ehrsr.ablation.variants import AblationError, Variant, build_variants, module_settings_from_space
from ehrsr.config import EHRSRConfig
from ehrsr.search.budget import record_start, trial_charge
from ehrsr.search.pareto import knee_trial
from ehrsr.search.record import Heartbeat, TrialOutcome, fail_stale_trials, record_outcome
from ehrsr.study_schema import StudyInfo, ablation_study_name, study_storage
from ehrsr.training import TrainSettings

__all__ = ["AblationResult", "run_controlled_ablation"]

_clock = time.perf_counter  # wall clock of a run's charge (a module attribute so tests can drive it)


@dataclass
class AblationResult:
    """What ``run_controlled_ablation`` did, and the table."""

    study_name: str  # the <study>-ablation study
    reference_trial: int
    variants: list[Variant]
    seeds: list[int]
    runs_planned: int  # (variant, seed) runs the table asks for
    runs_run: int  # run by this call
    runs_skipped: int  # already stored (resumed)
    stopped: str | None  # why runs were left out (budget), None when all are done
    table: pd.DataFrame = field(repr=False)
    seconds_spent: float = 0.0  # device-seconds charged by every ablation run so far


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
    if not trial.user_attrs.get("config"):
        raise AblationError(f"--reference {reference}: trial {reference} stores no configuration")
    return trial


def _open_ablation_study(study: optuna.Study) -> optuna.Study:
    name = ablation_study_name(study.study_name)
    ablation = optuna.create_study(
        study_name=name,
        storage=study_storage(study),
        directions=list(study.directions),
        sampler=optuna.samplers.RandomSampler(seed=0),  # nothing is sampled: runs are told by hand
        load_if_exists=True,
    )
    if list(ablation.directions) != list(study.directions):
        raise AblationError(
            f"study {name!r} exists with directions {[d.name for d in ablation.directions]} but "
            f"{study.study_name!r} has {[d.name for d in study.directions]}; delete it or rename the study"
        )
    if study.metric_names and not ablation.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ablation.set_metric_names(list(study.metric_names))
    return ablation


def _charge_estimate(done: Sequence[FrozenTrial], reference: FrozenTrial) -> float:
    charges = [trial_charge(t).seconds for t in done if trial_charge(t).seconds > 0]
    if charges:
        return float(statistics.median(charges))
    attrs = reference.user_attrs
    return float(attrs.get("charged_seconds") or (attrs.get("seconds") or {}).get("total") or 0.0)


def _device_kind(ctx: Any) -> str:
    device = getattr(ctx, "device", None)
    return str(getattr(device, "type", device) or "cpu").split(":")[0]


def run_controlled_ablation(
    study: optuna.Study,
    ctx: Any,
    *,
    reference: int | None = None,
    seeds: int = 2,
    budget_seconds: float | None = None,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
    steps: int | None = None,
) -> AblationResult:
    """Run (or resume) the controlled ablation of ``study`` and return its table.

    ``ctx`` is the runner's ``RunContext`` (``ehrsr.search.driver.build_context`` from the
    study's stored context): data, task, objectives and profiling settings. ``reference``: trial number to ablate (default: the knee of
    the Pareto front). ``seeds``: runs per variant (seeds 0..seeds-1). ``budget_seconds``: device
    seconds the whole ablation study may spend (its stored runs included, so a resumed ablation
    continues the same budget); a run is not started when the estimate of its cost (median of the
    runs so far) would overrun it. ``steps``: training steps per run (default: the reference
    trial's, i.e. full fidelity). ``runner`` replaces ``ehrsr.search.runner.run_configuration``
    (tests). Runs go seed by seed (every variant's seed 0 first), so a budget cut still leaves one
    run of every variant.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise AblationError(f"seeds must be a positive integer, got {seeds!r}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise AblationError(f"budget_seconds must be > 0 or None, got {budget_seconds!r}")
    StudyInfo.from_study(study)  # refuses a study whose objectives it does not know
    ref_trial = _reference_trial(study, reference)
    ref_config = EHRSRConfig.from_dict(ref_trial.user_attrs["config"])
    stored_train = dict(ref_trial.user_attrs.get("train") or {})
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
    switchable, settings = module_settings_from_space(study)
    variants = build_variants(ref_config, switchable, settings)
    seed_list = list(range(seeds))

    ablation = _open_ablation_study(study)
    fail_stale_trials(ablation)
    ablation.set_user_attr("reference_trial", ref_trial.number)
    ablation.set_user_attr(
        "plan",
        {
            "reference_trial": ref_trial.number,
            "seeds": seed_list,
            "steps": steps,
            "variants": [v.to_dict() for v in variants],
        },
    )
    stored = stored_runs(ablation, ref_trial.number, steps)
    planned = [(v, s) for s in seed_list for v in variants if v.runnable]
    todo = []
    skipped = 0
    for variant, seed in planned:
        previous = stored.get((variant.name, seed))
        if previous is not None and previous.user_attrs.get("config") == variant.config.to_dict():
            skipped += 1
        else:
            todo.append((variant, seed))

    run = runner or _runner()
    kind = _device_kind(ctx)
    stopped: str | None = None
    ran = 0
    bar = _progress(len(todo), progress, f"ablation of trial {ref_trial.number}")
    try:
        for variant, seed in todo:
            finished = [t for t in ablation.get_trials(deepcopy=False) if t.state.is_finished()]
            spent = sum(trial_charge(t).seconds for t in finished)
            estimate = _charge_estimate(
                [t for t in finished if t.user_attrs.get("reference_trial") == ref_trial.number], ref_trial
            )
            if budget_seconds is not None and spent + estimate > budget_seconds:
                left = len(todo) - ran
                stopped = (
                    f"ablation budget of {budget_seconds:.0f} s reached: {spent:.0f} s spent, the next run "
                    f"needs about {estimate:.0f} s; {left} run{'s' if left != 1 else ''} left out"
                )
                break
            status, reason = _run_one(ablation, run, ctx, variant, seed, ref_trial.number, train, kind)
            ran += 1
            bar(f"{variant.name} seed {seed}")
            if status != "complete" and progress:
                print(f"[ablation] {variant.name} seed {seed}: {status}: {reason}", file=sys.stderr)
    finally:
        bar(None)
    if stopped and progress:
        print(stopped, file=sys.stderr)

    runs = ablation_runs(ablation, ref_trial.number, seeds=seed_list, steps=steps)
    table = controlled_table(runs, variants)
    finished = [t for t in ablation.get_trials(deepcopy=False) if t.state.is_finished()]
    return AblationResult(
        study_name=ablation.study_name,
        reference_trial=ref_trial.number,
        variants=variants,
        seeds=seed_list,
        runs_planned=len(planned),
        runs_run=ran,
        runs_skipped=skipped,
        stopped=stopped,
        table=table,
        seconds_spent=sum(trial_charge(t).seconds for t in finished),
    )


def _progress(total: int, enabled: bool, description: str) -> Callable[[str | None], None]:
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
) -> tuple[str, str | None]:
    """Train and measure one (variant, seed), store it as a trial of the ablation study, and
    return its (status, reason)."""
    assert variant.config is not None
    trial = ablation.ask()
    run_train = {**dataclasses.asdict(train), "seed": seed}
    for key, value in (
        ("variant", variant.name),
        ("kind", variant.kind),
        ("module", variant.module),
        ("seed", seed),
        ("reference_trial", reference_trial),
        ("config", variant.config.to_dict()),
        ("train", run_train),
    ):
        trial.set_user_attr(key, value)
    record_start(trial, device_kind, 1)
    start = _clock()
    try:
        with Heartbeat(ablation, trial._trial_id):
            result = run(variant.config, train, ctx, seed=seed)
    except KeyboardInterrupt:
        record_outcome(ablation, trial, TrialOutcome.failed("interrupted", "interrupted by the user"),
                       wall_seconds=_clock() - start)
        raise
    except Exception as exc:  # a crash of one run must not lose the others: record it, go on
        failed = TrialOutcome.failed("error", f"{type(exc).__name__}: {exc}"[:500])
        outcome = record_outcome(ablation, trial, failed, wall_seconds=_clock() - start)
        return outcome.status, outcome.reason
    outcome = TrialOutcome(
        status=result.status,
        reason=str(result.reason) if result.reason else None,
        values=list(result.values or []),
        metrics=dict(result.metrics or {}),
        seconds=dict(result.seconds or {}),
        steps_done=int(result.steps_done),
    )
    outcome = record_outcome(ablation, trial, outcome, wall_seconds=_clock() - start)
    return outcome.status, (None if outcome.status == "complete" else outcome.reason)
