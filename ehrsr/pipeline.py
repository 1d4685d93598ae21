"""The whole job, in the order the data flows: search -> controlled ablation -> deployment picks
-> report (docs/architecture.md, "Layout").

``run_search.py`` (``ehrsr.cli``) calls these functions; nothing below this module imports it,
so the search never depends on the ablation, the deployment or the reports. Each step after the
search reads the study from storage: a failure there is reported and never loses a trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import optuna

from ehrsr.ablation import AblationError, AblationResult, run_controlled_ablation
from ehrsr.ablation.baselines import BaselinesResult, parse_baselines, run_baselines, space_size_class
from ehrsr.ablation.fidelity import (
    EARLY_CHECK_AT,
    EARLY_SHARE,
    FidelityResult,
    ablation_fidelity,
    act_on,
    check_now,
    fidelity_sources,
    run_fidelity,
)
from ehrsr.deploy import (
    DeploymentError,
    DeploymentPick,
    DeviceProfileError,
    load_device_profiles,
    pick_deployment,
    profiles_for_device,
)
from ehrsr.interrupts import SIGTERM, interrupt_name
from ehrsr.reports import write_report, write_trials_csv
from ehrsr.search.driver import SearchLog, SearchSummary, print_summary, run_search
from ehrsr.search.pareto import front_trials
from ehrsr.search.ranking import add_check, check_line, space_check_applies, study_verdict
from ehrsr.search.storage import open_storage
from ehrsr.search.study import (
    PreparedStudy,
    SearchSettings,
    build_context,
    context_spec,
    load_study,
    space_of,
    stored_record,
)
from ehrsr.study_schema import fidelity_checks, steps_scale

__all__ = [
    "ablation_budget_seconds",
    "deploy_study",
    "refresh_report",
    "refresh_trials_table",
    "report_study",
    "run_ablation",
    "run_baselines_for_study",
    "run_fidelity_for_study",
    "run_pipeline",
    "share_seconds",
    "write_trials_table",
]


# ``refresh_trials_table`` rewrites trials.csv only when the time since its last rewrite is at
# least this many times what that rewrite took: at most 1/(1 + factor), 1 %, of a worker's time
TRIALS_TABLE_PAUSE_FACTOR = 100.0
_TABLE_WRITES: dict[Path, tuple[float, float]] = {}  # study folder -> (end of last write, its seconds)


def write_trials_table(study: optuna.Study, study_dir: Path) -> None:
    """Write ``trials.csv`` now; a full disk must not stop the search."""
    start = time.monotonic()
    with contextlib.suppress(OSError):
        write_trials_csv(study, study_dir / "trials.csv")
    end = time.monotonic()
    _TABLE_WRITES[Path(study_dir)] = (end, end - start)


def refresh_trials_table(study: optuna.Study, study_dir: Path) -> None:
    """``trials.csv`` after a trial (the search's ``after_trial`` hook), unless the last rewrite
    was too recent: the file holds every trial, so a rewrite costs time in proportion to the study
    (0.3-2 s at 5,000 trials on the 2-core development machine, docs/scaling_out.md), and it is
    skipped until ``TRIALS_TABLE_PAUSE_FACTOR`` times that has passed. While a rewrite takes less
    than a hundredth of a trial, the table is rewritten after every trial; the search's end
    rewrites it in any case."""
    last = _TABLE_WRITES.get(Path(study_dir))
    if last is None or time.monotonic() - last[0] >= TRIALS_TABLE_PAUSE_FACTOR * last[1]:
        write_trials_table(study, study_dir)


def run_pipeline(settings: SearchSettings) -> SearchSummary:
    """``run_search.py``: the search, then (unless ``--no-report``, Ctrl-C or SIGTERM) the
    controlled ablation on its share of the budget and the deployment picks for the device
    profiles matching this machine, then the report; prints the summary and returns it.

    Stopped by SIGTERM, it writes no report: a scheduler kills the job a grace period after the
    signal (Slurm's ``KillWait``, Kubernetes' ``terminationGracePeriodSeconds``, 30 s by default),
    and the summary must come first. ``run_search.py report`` writes the report from the storage."""
    log = SearchLog(settings.verbosity)
    # a study whose space's proxy agreement does not apply to it checks its own, part-way
    summary = run_search(settings, log=log, after_trial=refresh_trials_table, pause_at=EARLY_CHECK_AT)
    if summary.paused and not summary.interrupted and summary.prepared is not None:
        try:
            _early_check(summary.prepared, log)
            summary = run_search(settings, log=log, after_trial=refresh_trials_table)
        except KeyboardInterrupt as exc:  # the running retrain is already recorded as interrupted
            summary.interrupted_by = interrupt_name(exc)
            summary.stopped_reason = f"interrupted ({summary.interrupted_by}) during the proxy-fidelity check"
    prepared = summary.prepared
    assert prepared is not None  # run_search always sets it
    settings = prepared.settings  # the study record's values (a resume may not change them)
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(prepared.storage_url))
    write_trials_table(study, prepared.study_dir)
    if settings.write_reports and not summary.interrupted:
        try:
            ctx = _lazy_context(study, prepared, settings)
            spare = _fidelity_step(study, prepared, settings, log, ctx)  # first: the ablation runs at its verdict
            try:
                summary.ablation = _after_search(study, prepared, settings, log, extra_share=spare)
            except Exception as exc:  # the search results are safe in the storage; say what went wrong
                log(f"warning: ablation / deployment step failed: {type(exc).__name__}: {exc}")
            _baselines_step(study, prepared, settings, log, ctx)
        except KeyboardInterrupt as exc:  # the running side run is already recorded as interrupted
            summary.interrupted_by = interrupt_name(exc)
            summary.stopped_reason = f"interrupted ({summary.interrupted_by}) after the search"
    if settings.write_reports and summary.interrupted_by == SIGTERM:
        log(f"report not written (stopped by SIGTERM): run_search.py report --study-name {summary.study_name} "
            "writes it (with the same --storage and --out-dir)")
    elif settings.write_reports:
        try:
            summary.report = write_report(study, prepared.study_dir, quiet=settings.verbosity == 0,
                                          html=settings.write_html)
        except Exception as exc:  # a report problem must not hide the search results
            log(f"warning: could not write the report: {type(exc).__name__}: {exc}")
    verdict = study_verdict(fidelity_checks(study))
    summary.fidelity = check_line(verdict) if verdict is not None else (
        "no verdict: the space states no measured agreement for this task and data, and no check ran "
        f"(run_search.py fidelity --study-name {summary.study_name})")
    print_summary(summary, prepared.objectives, log)
    return summary


def _after_search(study: optuna.Study, prepared: PreparedStudy, settings: SearchSettings, log: SearchLog,
                  extra_share: float = 0.0) -> str | None:
    """The controlled ablation on its reserved budget (plus ``extra_share`` of the budget that
    another step left unspent), then deployment picks for the device profiles that match this
    machine. Problems are reported, never fatal. Returns a line on the ablation for the summary."""
    if not front_trials(study):
        log("no finished feasible trial: no controlled ablation and no deployment pick")
        return None
    ablation_line = None
    if settings.ablation_share > 0:
        share = settings.ablation_share + extra_share
        seconds = share_seconds(prepared.budget, study, share, settings.reserved_share)
        fidelity = ablation_fidelity(study, settings.fidelity_factor, settings.ablation_seeds)
        log(f"controlled ablation: up to {seconds / 60:.1f} device-minutes ({share:.0%} of the budget"
            f"{', the proxy-fidelity share included' if extra_share else ''}), {fidelity.note}")
        try:
            result = run_ablation(
                study.study_name, prepared.storage_url, settings.out_dir, device=str(prepared.device),
                reference=None, seeds=fidelity.seeds, budget_seconds=seconds,
                lpips_weights=settings.lpips_weights, verbosity=settings.verbosity, steps=fidelity.steps,
                fidelity_note=fidelity.note, cache_dir=prepared.spec.cache_dir,
            )
            ablation_line = (
                f"trial #{result.reference_trial}: {result.runs_run + result.runs_skipped} of {result.runs_planned} "
                f"runs, {result.seconds_spent / 60:.3g} device-minutes"
            )
            log(f"controlled ablation of {ablation_line}" + (f" ({result.stopped})" if result.stopped else ""))
        except AblationError as exc:
            log(f"controlled ablation skipped: {exc}")
    try:
        profiles = load_device_profiles()
    except DeviceProfileError as exc:
        log(f"deployment picks skipped: {exc}")
        return ablation_line
    for name in profiles_for_device(profiles, prepared.device.type):
        try:
            pick = pick_deployment(study, name, prepared.study_dir, weights_root=prepared.study_dir,
                                   progress=settings.verbosity >= 2)
            log(f"deployment pick for {name}: trial #{pick.trial} ({pick.json_path})")
        except (DeploymentError, DeviceProfileError) as exc:
            log(f"deployment pick for {name}: none ({exc})")
    return ablation_line


def ablation_budget_seconds(budget: Any, study: optuna.Study, share: float) -> float:
    """Device-seconds kept for the controlled ablation run on its own (``ablate``): ``share`` of
    the time budget; for a trials-only budget, the same proportion of what the search spent."""
    return share_seconds(budget, study, share, share)


def run_ablation(
    study_name: str,
    storage: str | None,
    out_dir: Path,
    *,
    device: str | None,
    reference: int | None,
    seeds: int | Literal["auto"] | None = None,
    steps: int | None = None,
    fidelity_note: str | None = None,
    budget_seconds: float | None,
    lpips_weights: str | None,
    verbosity: int = 1,
    cache_dir: str | None = None,
) -> AblationResult:
    """``run_search.py ablate``: rebuild the study's run context here, run the controlled
    ablation and rewrite the report."""
    study, _, study_dir = load_study(study_name, storage, out_dir)
    ctx = _context_of(study, device, lpips_weights, verbosity, cache_dir)
    if seeds is None:  # the study's --ablation-seeds
        seeds = stored_record(study).shares.ablation_seeds
    if steps is None and fidelity_note is None:  # the ablate subcommand: the same rule as after a search
        shares = stored_record(study).shares
        fidelity = ablation_fidelity(study, shares.fidelity_factor, seeds)
        steps, seeds, fidelity_note = fidelity.steps, fidelity.seeds, fidelity.note
    result = run_controlled_ablation(study, ctx, reference=reference, seeds=seeds, budget_seconds=budget_seconds,
                                     steps=steps, fidelity_note=fidelity_note,
                                     progress=verbosity >= 1)
    refresh_report(study, study_dir)
    return result


def deploy_study(
    study_name: str,
    storage: str | None,
    out_dir: Path,
    profiles: Sequence[str],
    *,
    onnx: bool = False,
    devices_path: str | None = None,
    progress: bool = True,
    on_pick: Callable[[str, DeploymentPick], None] | None = None,
) -> list[DeploymentPick]:
    """``run_search.py deploy``: a pick per device profile (re-profiled here; ``on_pick`` is told
    of each as it is made), then the report."""
    study, _, study_dir = load_study(study_name, storage, out_dir)
    picks = []
    for name in profiles:
        pick = pick_deployment(study, name, study_dir, weights_root=study_dir, onnx=onnx, devices_path=devices_path,
                               progress=progress)
        picks.append(pick)
        if on_pick is not None:
            on_pick(name, pick)
    refresh_report(study, study_dir)
    return picks


def report_study(study_name: str, storage: str | None, out_dir: Path, *, quiet: bool = False,
                 html: bool = True) -> Path:
    """``run_search.py report``: regenerate ``<out_dir>/<study>/`` from the storage alone (``html``:
    with report.html)."""
    study, _, study_dir = load_study(study_name, storage, out_dir)
    return write_report(study, study_dir, quiet=quiet, html=html)


def refresh_report(study: optuna.Study, study_dir: Path) -> Path:
    """Rewrite the report after ``ablate``, ``deploy``, ``baselines`` or ``fidelity`` added to the
    study: report.md always, report.html when the folder has one (a report written with
    ``--no-html`` stays without)."""
    return write_report(study, study_dir, quiet=True, html=(study_dir / "report.html").exists())


# ---------------------------------------------------------------------------------------------
# baselines and proxy fidelity (docs/baselines.md, docs/reports.md "Proxy fidelity")


def _lazy_context(study: optuna.Study, prepared: PreparedStudy, settings: SearchSettings) -> Callable[[], Any]:
    """The study's run context, built once and only when a step runs something."""
    built: list[Any] = []

    def ctx() -> Any:
        if not built:
            built.append(_context_of(study, str(prepared.device), settings.lpips_weights, settings.verbosity,
                                     prepared.spec.cache_dir))
        return built[0]

    return ctx


def _early_check(prepared: PreparedStudy, log: SearchLog) -> None:
    """Part-way through the search: retrain some of its configurations longer on half the
    fidelity share, store the verdict, and raise the steps per rung when the ranking is not
    trusted (docs/proxy_fidelity.md). Problems are reported, never fatal."""
    settings = prepared.settings
    study = optuna.load_study(study_name=prepared.study.study_name, storage=open_storage(prepared.storage_url))
    seconds = EARLY_SHARE * share_seconds(prepared.budget, study, settings.fidelity_share, settings.reserved_share)
    log(f"proxy fidelity, part-way: up to {seconds / 60:.1f} device-minutes of long retrains")
    try:
        check = check_now(study, _lazy_context(study, prepared, settings)(), when="early", seconds=seconds,
                          configs=settings.fidelity_configs, factor=settings.fidelity_factor,
                          progress=settings.verbosity >= 1)
    except AblationError as exc:
        log(f"proxy fidelity, part-way: skipped ({exc})")
        return
    act_on(study, check, prepared.space.fidelity.eta, log)


def _fidelity_step(study: optuna.Study, prepared: PreparedStudy, settings: SearchSettings, log: SearchLog,
                   ctx: Callable[[], Any]) -> float:
    """After the search: the proxy-fidelity retrains on the share (the part-way check's included),
    and the study's verdict at the end. When the space's measured agreement stands for the study
    (its task, data and trial protocol are the benchmark's), the verdict at the end is that one and
    the share is returned unspent for the ablation. Problems are reported, never fatal."""
    if settings.fidelity_share <= 0:
        return 0.0
    measured = space_check_applies(fidelity_checks(study), steps_scale(study))
    if measured is not None:
        check = dataclasses.replace(
            measured, when="end", action="no retrains: their share went to the controlled ablation",
            note="the space's measurement stands: this study trains the measured protocol on the benchmark's "
                 "task and data (docs/proxy_fidelity.md)")
        add_check(study, check)
        log(f"proxy fidelity (end): {check_line(check)}")
        return settings.fidelity_share
    seconds = share_seconds(prepared.budget, study, settings.fidelity_share, settings.reserved_share)
    log(f"proxy fidelity: up to {seconds / 60:.1f} device-minutes ({settings.fidelity_share:.0%} of the budget)")
    try:
        fidelity_sources(study, settings.fidelity_configs, settings.fidelity_factor)  # before any data
        check = check_now(study, ctx(), when="end", seconds=seconds, configs=settings.fidelity_configs,
                          factor=settings.fidelity_factor, progress=settings.verbosity >= 1)
        act_on(study, check, prepared.space.fidelity.eta, log)
    except AblationError as exc:  # too few trials: one line
        log(f"proxy fidelity skipped: {exc}")
    except Exception as exc:  # the search results are safe in the storage; say what went wrong
        log(f"warning: proxy fidelity step failed: {type(exc).__name__}: {exc}")
    return 0.0


def _baselines_step(study: optuna.Study, prepared: PreparedStudy, settings: SearchSettings, log: SearchLog,
                    ctx: Callable[[], Any]) -> None:
    """After the search: the hand-designed baselines with the study's trial protocol, on their
    share of the budget. Problems are reported, never fatal."""
    try:
        specs = parse_baselines(settings.baselines, space_size_class(study))
    except AblationError as exc:  # the CLI checks the names first; a direct caller hears it here
        log(f"baselines skipped: {exc}")
        return
    if not specs or settings.baselines_share <= 0:
        return
    seconds = share_seconds(prepared.budget, study, settings.baselines_share, settings.reserved_share)
    log(f"baselines: up to {seconds / 60:.1f} device-minutes ({settings.baselines_share:.0%} of the budget)")
    try:
        result = run_baselines(study, ctx(), specs, budget_seconds=seconds, progress=settings.verbosity >= 1)
        log(f"baselines: {result.runs_run} trained now, {result.runs_skipped} already stored, "
            f"{result.seconds_spent / 60:.3g} device-minutes" + (f" ({result.stopped})" if result.stopped else ""))
    except AblationError as exc:  # no reference: one line
        log(f"baselines skipped: {exc}")
    except Exception as exc:  # the search results are safe in the storage; say what went wrong
        log(f"warning: baselines step failed: {type(exc).__name__}: {exc}")


def share_seconds(budget: Any, study: optuna.Study, share: float, reserved: float) -> float:
    """Device-seconds of ``share`` of a time budget; for a trials-only budget, the same proportion
    of what the search spent on its ``1 - reserved`` part."""
    time_limits = [limit.seconds for limit in budget.limits if limit.seconds is not None]
    if time_limits:
        return share * min(time_limits)
    return budget.spent(study).total_seconds * share / (1 - reserved)


def _context_of(study: optuna.Study, device: str | None, lpips_weights: str | None, verbosity: int,
                cache_dir: str | None = None) -> Any:
    """The study's run context (data, objectives, profiling), from its stored record, rebuilt on
    ``device`` (the ablation, baselines and fidelity steps all run the study's own settings);
    ``cache_dir``: this machine's cache folder, if not the record's."""
    spec = context_spec(stored_record(study), cache_dir)
    run_device = SearchSettings(device=device).resolved_device()
    return build_context(spec, run_device, lpips_weights=lpips_weights, progress=verbosity >= 2)


def run_baselines_for_study(
    study_name: str, storage: str | None, out_dir: Path, *, baselines: str | None = None, device: str | None = None,
    budget_seconds: float | None = None, lpips_weights: str | None = None, verbosity: int = 1,
) -> BaselinesResult:
    """Train (or resume) the baselines of a finished study with its trial protocol (``baselines``:
    None = the study's own ``--baselines``); rewrite the report."""
    study, _, study_dir = load_study(study_name, storage, out_dir)
    if baselines is None:
        baselines = stored_record(study).shares.baselines
    specs = parse_baselines(baselines, space_size_class(study))
    ctx = _context_of(study, device, lpips_weights, verbosity)
    result = run_baselines(study, ctx, specs, budget_seconds=budget_seconds, progress=verbosity >= 1)
    refresh_report(study, study_dir)
    return result


def run_fidelity_for_study(
    study_name: str, storage: str | None, out_dir: Path, *, configs: int | None = None, factor: float | None = None,
    device: str | None = None, budget_seconds: float | None = None, lpips_weights: str | None = None,
    verbosity: int = 1,
) -> FidelityResult:
    """``run_search.py fidelity``: the proxy-fidelity retrains of a finished study; rewrite the report."""
    study, _, study_dir = load_study(study_name, storage, out_dir)
    shares = stored_record(study).shares  # K and F default to the study's --fidelity-configs / -factor
    configs = shares.fidelity_configs if configs is None else configs
    factor = shares.fidelity_factor if factor is None else factor
    fidelity_sources(study, configs, factor)  # too few trials: say so before preparing any data
    ctx = _context_of(study, device, lpips_weights, verbosity)
    result = run_fidelity(study, ctx, configs=configs, factor=factor, budget_seconds=budget_seconds,
                          progress=verbosity >= 1)
    # the verdict over every retrain at the study's current steps, stored as its end check
    check = check_now(study, ctx, when="end", seconds=budget_seconds, configs=configs, factor=factor, progress=False)
    act_on(study, check, space_of(stored_record(study)).fidelity.eta, print if verbosity >= 1 else None)
    refresh_report(study, study_dir)
    return result
