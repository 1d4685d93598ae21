"""Proxy fidelity: does the brief training of a trial rank configurations as longer training does?

A search ranks configurations after a few dozen to a few thousand steps. ``run_fidelity``
retrains K of its finished configurations (chosen across the Pareto front and the dominated cloud,
spread over the range of brief PSNR) for F times the trial's steps, with the trial's settings and
seed otherwise unchanged, and stores them in ``<study>-fidelity`` through the one recording path
(``ehrsr.search.record``). ``ehrsr.reports.fidelity`` then compares the brief and long rankings
(Spearman and Kendall with bootstrap intervals, ``ehrsr.stats.rank_agreement``); see
docs/reports.md, "Proxy fidelity".
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ehrsr.ablation.side import (
    SideBudget,
    finished_runs,
    median_charge,
    open_side_study,
    run_recorded,
    storage_retry,
)
from ehrsr.ablation.variants import AblationError
from ehrsr.config import EHRSRConfig
from ehrsr.search.pareto import comparable_trials, front_trials, trial_steps
from ehrsr.search.ranking import (
    add_check,
    check_line,
    raise_steps,
    raised_steps_text,
    retrain_check,
    retrain_points,
    study_verdict,
)
from ehrsr.stats import MIN_RANK_POINTS, MIN_TRUST_POINTS
from ehrsr.study_schema import (
    PLAN_ATTR,
    TRIAL,
    FidelityCheck,
    StudyInfo,
    fidelity_checks,
    fidelity_study_name,
    finite,
    is_feasible,
    load_side_study,
)
from ehrsr.training import TrainSettings

__all__ = [
    "DEFAULT_CONFIGS",
    "DEFAULT_FACTOR",
    "EARLY_CHECK_AT",
    "EARLY_SHARE",
    "AblationFidelity",
    "CheckPlan",
    "FidelityError",
    "FidelityResult",
    "ablation_fidelity",
    "act_on",
    "check_now",
    "choose_configurations",
    "fidelity_sources",
    "plan_check",
    "run_fidelity",
]

DEFAULT_CONFIGS = 8  # enough for a Kendall tau whose interval says something, cheap enough to afford
DEFAULT_FACTOR = 4.0  # long = 4x the trial's steps: long enough to reorder what brief training misranks


class FidelityError(AblationError):
    """The proxy-fidelity check cannot run (too few finished trials, bad K or F): one line, exit 2."""


@dataclass
class FidelityResult:
    study_name: str  # the <study>-fidelity study
    sources: list[int]  # trial numbers chosen
    factor: float
    runs_run: int
    runs_skipped: int
    stopped: str | None
    seconds_spent: float


def _brief_quality(trial: FrozenTrial, key: str) -> float | None:
    value = (trial.user_attrs.get(TRIAL.metrics) or {}).get(key)
    return float(value) if finite(value) else None


def choose_configurations(study: optuna.Study, k: int, quality_key: str = "psnr") -> list[FrozenTrial]:
    """K finished trials with a stored configuration: about half from the study's Pareto front and
    half from the dominated cloud, each half spread evenly over its range of brief ``quality_key``
    (sorted, then evenly spaced ranks); a short half is filled from the other. Deterministic."""
    done = [
        t for t in comparable_trials(study)  # trained as long as the latest trial
        if t.user_attrs.get(TRIAL.config) and t.user_attrs.get(TRIAL.train) and _brief_quality(t, quality_key) is not None
    ]
    front_numbers = {t.number for t in front_trials(study)}
    front = sorted((t for t in done if t.number in front_numbers), key=lambda t: _brief_quality(t, quality_key))
    cloud = sorted((t for t in done if t.number not in front_numbers), key=lambda t: _brief_quality(t, quality_key))

    def spread(items: list[FrozenTrial], n: int) -> list[FrozenTrial]:
        if n >= len(items):
            return list(items)
        if n <= 0:
            return []
        return [items[int(i)] for i in np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))]

    n_front = min(len(front), math.ceil(k / 2))
    n_cloud = min(len(cloud), k - n_front)
    n_front = min(len(front), k - n_cloud)
    chosen = spread(front, n_front) + spread(cloud, n_cloud)
    return sorted(chosen, key=lambda t: t.number)


def fidelity_sources(study: optuna.Study, configs: int, factor: float) -> list[FrozenTrial]:
    """``choose_configurations``, after checking ``configs`` and ``factor``; ``FidelityError``
    (one line) when the study has fewer than ``MIN_RANK_POINTS`` usable finished trials."""
    if isinstance(configs, bool) or not isinstance(configs, int) or configs < MIN_RANK_POINTS:
        raise FidelityError(f"--configs must be an integer >= {MIN_RANK_POINTS}, got {configs!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise FidelityError(f"--factor must be a number > 1, got {factor!r}")
    chosen = choose_configurations(study, configs)
    if len(chosen) < MIN_RANK_POINTS:
        raise FidelityError(
            f"study {study.study_name!r} has {len(chosen)} finished trial{'s' if len(chosen) != 1 else ''} with a "
            f"stored configuration; the proxy-fidelity check needs at least {MIN_RANK_POINTS}"
        )
    return chosen


def run_fidelity(
    study: optuna.Study,
    ctx: Any,
    *,
    configs: int = DEFAULT_CONFIGS,
    factor: float = DEFAULT_FACTOR,
    budget_seconds: float | None = None,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
) -> FidelityResult:
    """Retrain (or resume) ``configs`` configurations of ``study`` for ``factor`` times their
    steps and store them in ``<study>-fidelity``. ``budget_seconds``: device-seconds that study may
    spend in all; a run whose estimate (the median long run so far, else ``factor`` times its
    trial's charge) would overrun it is not started. Fewer than ``MIN_RANK_POINTS`` finished
    trials raise ``FidelityError``. ``runner`` replaces ``ehrsr.search.runner.run_configuration``."""
    chosen, info = storage_retry("read the study", lambda: (fidelity_sources(study, configs, factor),
                                                             StudyInfo.from_study(study)))
    side = open_side_study(study, fidelity_study_name(study.study_name))
    plan = {"sources": [t.number for t in chosen], "factor": float(factor), "configs": configs}
    storage_retry("write the plan", side.set_user_attr, PLAN_ATTR, plan)
    done = {
        (t.user_attrs.get(TRIAL.source_trial), t.user_attrs.get(TRIAL.factor))
        for t in storage_retry("read the runs", side.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
    }
    todo = [t for t in chosen if (t.number, float(factor)) not in done]
    if runner is None:
        from ehrsr.search.runner import run_configuration as runner  # heavy: only when running
    budget = SideBudget(budget_seconds)
    kind = str(getattr(getattr(ctx, "device", None), "type", "cpu"))
    limits = getattr(ctx, "limits", None)
    stopped = None
    ran = 0
    for index, source in enumerate(todo):
        finished = finished_runs(side)
        fallback = factor * float(source.user_attrs.get(TRIAL.charged_seconds) or 0.0)
        stopped = budget.refusal(side, median_charge(finished, fallback), len(todo) - index)
        if stopped:
            break
        stored = dict(source.user_attrs[TRIAL.train])
        brief_steps = int(stored["steps"])
        train = TrainSettings.from_dict({**stored, "steps": max(brief_steps + 1, round(brief_steps * factor))}, ignore=("seed",))
        # the trial's own seed (the driver's rule: study seed + trial number), so only the length differs
        seed = int(stored.get("seed", 0)) + source.number
        config = EHRSRConfig.from_dict(source.user_attrs[TRIAL.config])
        attrs = {TRIAL.source_trial: source.number, TRIAL.factor: float(factor), TRIAL.brief_steps: brief_steps,
                 TRIAL.brief_values: list(source.values or []),
                 TRIAL.brief_metrics: {k: v for k, v in (source.user_attrs.get(TRIAL.metrics) or {}).items()
                                   if k in ("psnr", "ssim", "lpips")},
                 TRIAL.brief_feasible: is_feasible(source), TRIAL.seed: seed, TRIAL.config: config.to_dict(),
                 TRIAL.train: {**dataclasses.asdict(train), "seed": seed}}

        def run(on_rung: Callable[[int, dict[str, Any]], None], config: EHRSRConfig = config,
                train: TrainSettings = train, seed: int = seed) -> Any:
            return runner(config, train, ctx, seed=seed)

        outcome = run_recorded(side, attrs, run, device_kind=kind,
                               constraints=limits.constraints if limits is not None else None)
        ran += 1
        if progress:
            psnr = (outcome.metrics or {}).get(info.quality_objective.metric_key)
            print(f"[fidelity] trial #{source.number} x{factor:g} ({train.steps} steps): {outcome.status}"
                  + (f", {psnr:.3f}" if finite(psnr) else f": {outcome.reason}"), file=sys.stderr)
    if stopped and progress:
        print(f"[fidelity] {stopped}", file=sys.stderr)
    return FidelityResult(side.study_name, [t.number for t in chosen], float(factor), ran, len(chosen) - len(todo),
                          stopped, SideBudget(None).spent(side))



# ---------------------------------------------------------------------------------------------
# the study's own checks: part-way through the search (acted on) and at its end

EARLY_CHECK_AT = 0.4
"""Share of the search's budget after which a study without a measured agreement checks its proxy
fidelity with its own long retrains (docs/proxy_fidelity.md)."""

EARLY_SHARE = 0.5  # of the fidelity share: the part-way check may spend half of it


@dataclass(frozen=True)
class CheckPlan:
    """How many configurations to retrain how much longer, sized to the seconds available."""

    configs: int
    factor: float
    note: str  # how it was sized


def plan_check(study: optuna.Study, seconds: float | None, configs: int, factor: float) -> CheckPlan:
    """``configs`` retrains ``factor`` times longer, or fewer and shorter ones when ``seconds``
    (device seconds) cannot pay for them at the median charge of the comparable trials: first fewer
    configurations (down to ``MIN_TRUST_POINTS``), then a smaller factor (down to 2)."""
    charges = [float(t.user_attrs.get(TRIAL.charged_seconds) or 0.0) for t in comparable_trials(study)]
    charges = [c for c in charges if c > 0]
    if seconds is None or not charges:
        return CheckPlan(configs, factor, "as asked")
    trial = float(np.median(charges))
    affordable = int(seconds // (factor * trial))
    if affordable >= configs:
        return CheckPlan(configs, factor, "as asked")
    if affordable >= MIN_TRUST_POINTS:
        return CheckPlan(affordable, factor, f"{affordable} of {configs} configurations: what {seconds:.0f} s buy")
    smaller = max(2.0, min(factor, math.floor(seconds / (MIN_TRUST_POINTS * trial))))
    fits = int(seconds // (smaller * trial))
    return CheckPlan(max(MIN_RANK_POINTS, min(configs, fits)), smaller,
                     f"factor {smaller:g} instead of {factor:g}: what {seconds:.0f} s buy at {trial:.1f} s a trial")


def check_now(study: optuna.Study, ctx: Any, *, when: str, seconds: float | None, configs: int, factor: float,
              progress: bool = True, runner: Callable[..., Any] | None = None) -> FidelityCheck:
    """Retrain (``run_fidelity``) configurations of the study's current steps and return the verdict
    of those retrains; nothing is stored here (``act_on`` stores it)."""
    plan = plan_check(study, seconds, configs, factor)
    steps = max((s for s in map(trial_steps, comparable_trials(study)) if s is not None), default=0)
    try:
        result = run_fidelity(study, ctx, configs=plan.configs, factor=plan.factor, budget_seconds=seconds,
                              progress=progress, runner=runner)
    except FidelityError as exc:
        return FidelityCheck(when, "retrains", steps, None, None, None, None, 0, plan.factor, None, note=str(exc))
    side = load_side_study(study, fidelity_study_name(study.study_name))
    points = retrain_points(side, sources=result.sources if when == "early" else None, brief_steps=steps)
    note = "" if plan.note == "as asked" else plan.note
    if result.stopped:
        note = "; ".join(filter(None, [note, result.stopped]))
    return retrain_check(points, when=when, trial_steps=steps, note=note)


def act_on(study: optuna.Study, check: FidelityCheck, eta: int, log: Callable[[str], None] | None = None,
           ) -> FidelityCheck:
    """Store ``check``; when it says the study's ranking is not trusted and the search goes on (the
    part-way check), raise the steps per rung by ``eta`` for the trials after it. Logs one line."""
    if check.when != "end" and check.trusted is False:
        before = check.trial_steps
        raise_steps(study, eta)
        check = replace(check, action=raised_steps_text(before, before * eta))
    add_check(study, check)
    if log is not None:
        log(f"proxy fidelity ({check.when}): {check_line(check)}")
    return check


@dataclass(frozen=True)
class AblationFidelity:
    """How long the controlled ablation trains each variant, and why (docs/proxy_fidelity.md)."""

    steps: int | None  # None: the reference trial's own steps
    seeds: int | str
    note: str


def ablation_fidelity(study: optuna.Study, factor: float, seeds: int | str) -> AblationFidelity:
    """The trials' own steps when the study's latest proxy-fidelity verdict trusts them; otherwise
    ``factor`` times longer (what that check retrained with) with one seed when ``seeds`` is
    ``"auto"``: longer runs and fewer seeds, within the same share."""
    latest = study_verdict(fidelity_checks(study))
    steps = max((s for s in map(trial_steps, comparable_trials(study)) if s is not None), default=None)
    if latest is not None and latest.trusted:
        return AblationFidelity(None, seeds, f"at the trials' {latest.trial_steps} steps, which the study's "
                                f"proxy-fidelity check found to rank like long training ({check_line(latest)})")
    if steps is None:
        return AblationFidelity(None, seeds, "at the trials' own steps (no trial records its steps)")
    longer = max(steps + 1, round(steps * factor))
    why = check_line(latest) if latest is not None else "no proxy-fidelity verdict"
    return AblationFidelity(longer, 1 if seeds == "auto" else seeds,
                            f"at {longer} steps ({factor:g}x the trials' {steps}, one seed per variant unless "
                            f"--ablation-seeds says otherwise): the trials' ranking is not shown to hold ({why})")
