"""Ablation tables: observational (from the study) and controlled (what papers call an ablation).

**Observational** (``observational_table``, ``param_importances``): read off the trials the search
already ran. For each module toggle, the best and median of every objective among finished
trials with the module on and with it off; and Optuna's parameter importance per objective
(PED-ANOVA, Watanabe et al., IJCAI 2023, Optuna 5's default evaluator). These are correlations
over a sampled population, not causal effects: other parameters vary together with the toggles.

**Controlled** (``run_controlled_ablation``): fix a reference configuration (the knee of the Pareto
front by default, see ``ehrsr.reports.pareto.knee_point``) and retrain, at full fidelity and with
several seeds,

* the reference itself;
* the reference with each of its modules switched off (leave-one-out, ``-wab``);
* the conv-only baseline (the reference with every module off);
* the baseline with each module the search space can switch on added back (add-one-in, ``+wab``).

Each run is stored as one trial of the ``<study>-ablation`` study (docs/study_schema.md), so an
interrupted ablation resumes where it stopped and the table can be rebuilt from storage alone.
The table gives, per variant, the change in quality (mean ± sample std over seeds of the
per-seed differences with the comparison: the reference for leave-one-out rows and for the
baseline row, the baseline for add-one-in rows) and in cost (MACs, parameters, latency, memory).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from ehrsr.config import MODULE_TOGGLES, EHRSRConfig
from ehrsr.reports._study import (
    COST_METRICS,
    QUALITY_METRICS,
    ObjectiveInfo,
    StudyInfo,
    ablation_study_name,
    load_ablation_study,
    study_storage,
)
from ehrsr.reports.pareto import knee_trial
from ehrsr.search.budget import record_charge, record_start, trial_charge
from ehrsr.training import TrainSettings

__all__ = [
    "AblationError",
    "AblationResult",
    "Variant",
    "ablation_runs",
    "build_variants",
    "controlled_table",
    "load_controlled_ablation",
    "module_settings_from_space",
    "observational_table",
    "param_importances",
    "run_controlled_ablation",
]

_clock = time.perf_counter  # wall clock of a run's charge (a module attribute so tests can drive it)

# Outcomes that a rerun with the same seed would repeat: a resumed ablation does not retry them.
FINAL_FAILURES: tuple[str, ...] = ("diverged", "oom", "refused")


class AblationError(ValueError):
    """The controlled ablation cannot start (no reference, a bad ``--reference``, ...)."""


# ---------------------------------------------------------------------------------------------
# observational


def observational_table(trials: pd.DataFrame, objectives: Sequence[ObjectiveInfo]) -> pd.DataFrame:
    """Per module toggle and objective: trial counts, best and median among finished (COMPLETE)
    trials with the module on and off, and the difference of the medians (on - off).

    Computed from ``trials_table`` (``trials.csv``): a trial's toggle is its
    ``config.<module>.enabled`` column, an objective's value its metric column (for finished
    trials it equals the stored objective value). Trials without a configuration are left out.
    """
    rows = []
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials.iloc[0:0]
    for module in MODULE_TOGGLES:
        column = f"config.{module}.enabled"
        flags = done[column] if column in done else pd.Series([np.nan] * len(done), index=done.index)
        known = flags.notna()
        on = done[known & (flags.astype(object) == True)]  # noqa: E712 (object column of bools)
        off = done[known & (flags.astype(object) == False)]  # noqa: E712
        for objective in objectives:
            key = objective.metric_key
            on_values = pd.to_numeric(on[key], errors="coerce").dropna() if key in on else pd.Series(dtype=float)
            off_values = pd.to_numeric(off[key], errors="coerce").dropna() if key in off else pd.Series(dtype=float)

            rows.append(
                {
                    "module": module,
                    "objective": objective.name,
                    "metric": key,
                    "direction": objective.direction,
                    "n_on": int(on_values.size),
                    "n_off": int(off_values.size),
                    "best_on": _best(on_values, objective.maximize),
                    "best_off": _best(off_values, objective.maximize),
                    "median_on": _median(on_values),
                    "median_off": _median(off_values),
                    "median_on_minus_off": _median(on_values) - _median(off_values),
                }
            )
    return pd.DataFrame(rows)


def _best(values: pd.Series, maximize: bool) -> float:
    if values.empty:
        return math.nan
    return float(values.max() if maximize else values.min())


def _median(values: pd.Series) -> float:
    return float(values.median()) if not values.empty else math.nan


def param_importances(study: optuna.Study) -> pd.DataFrame:
    """Parameter importance per objective (columns) with PED-ANOVA, Optuna 5's default evaluator.

    PED-ANOVA ranks how much each parameter's distribution among the top 10 % of finished trials
    differs from its distribution among all of them; it treats lower target values as better, so
    maximised objectives are negated. Multi-objective studies get one more column, ``pareto``:
    the importance for reaching the Pareto front (Optuna's multi-objective mode, ``target=None``).
    Each column sums to 1. Empty when fewer than two trials finished or no parameter was searched.

    Cost objectives (latency, MACs, parameters, memory) are properties of the architecture, so
    their columns consider architecture parameters only: a training parameter such as ``lr`` can
    only look important for them through the sampler's correlations, never through cause.
    """
    info = StudyInfo.from_study(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = sorted({name for t in finished for name in t.params})
    if len(finished) < 2 or not params:
        return pd.DataFrame()
    training = {name for t in finished for name in t.params if name in (t.user_attrs.get("train") or {})}
    architecture = [name for name in params if name not in training]
    columns: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        # PED-ANOVA warns that it treats low targets as better (we negate maximised objectives)
        # and that few trials give equal importances (the report says how many trials there are)
        warnings.simplefilter("ignore")
        for index, objective in enumerate(info.objectives):
            sign = -1.0 if objective.maximize else 1.0
            is_cost = _is_cost(objective)
            columns[objective.name] = optuna.importance.get_param_importances(
                study,
                evaluator=PedAnovaImportanceEvaluator(),
                params=architecture if is_cost and architecture else None,
                target=lambda t, i=index, s=sign: s * t.values[i],
            )
        if len(info.objectives) > 1:
            columns["pareto"] = optuna.importance.get_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator()
            )
    table = pd.DataFrame(columns).reindex(params).fillna(0.0)
    table.index.name = "param"
    return table.loc[table.sum(axis=1).sort_values(ascending=False, kind="stable").index]


def _is_cost(objective: ObjectiveInfo) -> bool:
    from ehrsr.search.objectives import OBJECTIVES

    known = OBJECTIVES.get(objective.name)
    return known is not None and known.kind == "cost"


# ---------------------------------------------------------------------------------------------
# controlled: variants


@dataclass(frozen=True)
class Variant:
    """One configuration of the controlled ablation."""

    name: str  # "reference", "baseline", "-wab", "+ssm"
    kind: str  # "reference" | "baseline" | "leave-one-out" | "add-one-in"
    module: str | None  # the module switched (None for reference and baseline)
    config: EHRSRConfig | None  # None when the configuration is invalid (see ``refused``)
    same_as: str | None = None  # another variant with the identical configuration: its runs count
    refused: str | None = None  # why the configuration could not be built

    @property
    def compare_to(self) -> str | None:
        """The variant this one's deltas are taken against."""
        if self.kind == "reference":
            return None
        return "baseline" if self.kind == "add-one-in" else "reference"

    @property
    def runnable(self) -> bool:
        return self.config is not None and self.same_as is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "module": self.module,
            "config": self.config.to_dict() if self.config is not None else None,
            "same_as": self.same_as,
            "refused": self.refused,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        config = data.get("config")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            module=data.get("module"),
            config=EHRSRConfig.from_dict(config) if config is not None else None,
            same_as=data.get("same_as"),
            refused=data.get("refused"),
        )


def build_variants(
    reference: EHRSRConfig,
    switchable: Sequence[str],
    module_settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Variant]:
    """The variants of a controlled ablation of ``reference``.

    Leave-one-out: one per module the reference has on. Add-one-in: one per module in
    ``switchable`` (the modules the search space can switch on), added to the baseline with the
    reference's own settings for that module when the reference uses it, else with
    ``module_settings[module]`` (the space's middle values) when they fit the reference (e.g. the
    heads divide its width), else with the values the reference's configuration holds for the
    switched-off module (the space's fixed values or the configuration defaults).
    A variant whose configuration equals an earlier one's is marked ``same_as`` it (its runs are
    shared, never repeated); one that cannot be built is kept with ``refused`` set.
    """
    unknown = sorted(set(switchable) - set(MODULE_TOGGLES))
    if unknown:
        raise ValueError(f"unknown modules {unknown}; modules are {', '.join(MODULE_TOGGLES)}")
    settings = dict(module_settings or {})
    baseline = reference.replace(**{m: {"enabled": False} for m in MODULE_TOGGLES})
    variants: list[Variant] = []

    def add(name: str, kind: str, module: str | None, config: EHRSRConfig | None, refused: str | None = None) -> None:
        same = None
        if config is not None:
            same = next((v.name for v in variants if v.runnable and v.config == config), None)
        variants.append(Variant(name, kind, module, config, same, refused))

    add("reference", "reference", None, reference)
    add("baseline", "baseline", None, baseline)
    for module in reference.enabled_modules():
        add(f"-{module}", "leave-one-out", module, reference.replace(**{module: {"enabled": False}}))
    reference_on = set(reference.enabled_modules())
    for module in MODULE_TOGGLES:
        if module not in switchable:
            continue
        candidates: list[dict[str, Any]] = []
        if module in reference_on:
            candidates.append(reference.to_dict()[module])
        else:
            if module in settings:
                candidates.append({**settings[module], "enabled": True})
            candidates.append({"enabled": True})  # the reference's own (switched-off) section
        config, errors = None, []
        for section in candidates:
            try:
                config = baseline.replace(**{module: section})
                break
            except ValueError as exc:
                errors.append(str(exc))
        add(f"+{module}", "add-one-in", module, config, None if config is not None else "; ".join(errors))
    return variants


def module_settings_from_space(study: optuna.Study) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Modules the study's search space can switch on, and the settings each gets in the space's
    ``all-modules`` reference configuration (its middle values), read from the space text stored
    in ``study.user_attrs["space"]``."""
    from ehrsr.search.space import SearchSpace  # the search package, imported when needed

    space_attr = study.user_attrs.get("space") or {}
    text = space_attr.get("yaml")
    if not text:
        raise AblationError(
            f"study {study.study_name!r} stores no search space (user_attrs['space']['yaml']); "
            "cannot tell which modules the add-one-in rows should add"
        )
    space = SearchSpace.from_text(text, name=str(space_attr.get("name", "<study space>")))
    switchable = [m for m, state in space.toggles().items() if state in ("searched", "on")]
    settings: dict[str, dict[str, Any]] = {}
    all_on = space.reference_params().get("all-modules")
    if all_on is not None:
        sampled = space.config_from_params(all_on, scale=StudyInfo.from_study(study).scale)
        if sampled.config is not None:
            data = sampled.config.to_dict()
            settings = {m: data[m] for m in switchable}
    return switchable, settings


# ---------------------------------------------------------------------------------------------
# controlled: running


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


def _close_stale_runs(ablation: optuna.Study) -> None:
    """Mark runs left RUNNING by an ablation process that died as failed (``interrupted``).

    One ablation process per study at a time is assumed (the CLI runs one); the interrupted run
    is charged its recorded seconds if any, else nothing (its true time is unknown).
    """
    storage = study_storage(ablation)
    for trial in ablation.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
        storage.set_trial_user_attr(
            trial._trial_id, "reason", "left running by an earlier ablation process that stopped"
        )
        seconds = (trial.user_attrs.get("seconds") or {}).get("total")
        storage.set_trial_user_attr(trial._trial_id, "charged_seconds", float(seconds or 0.0))
        ablation.tell(trial.number, state=TrialState.FAIL)


def _is_done(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("status") in FINAL_FAILURES


def _stored_runs(
    ablation: optuna.Study, reference_trial: int, steps: int | None = None
) -> dict[tuple[str, int], FrozenTrial]:
    """The last finished run of each (variant, seed) for this reference (and training length)."""
    runs: dict[tuple[str, int], FrozenTrial] = {}
    for trial in ablation.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get("reference_trial") != reference_trial or not _is_done(trial):
            continue
        if steps is not None and (attrs.get("train") or {}).get("steps") != steps:
            continue
        runs[(str(attrs.get("variant")), int(attrs.get("seed", -1)))] = trial
    return runs


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
    info = StudyInfo.from_study(study)
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
    _close_stale_runs(ablation)
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
    stored = _stored_runs(ablation, ref_trial.number, steps)
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
            status, reason = _run_one(ablation, run, ctx, variant, seed, ref_trial.number, train, kind, info)
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
    info: StudyInfo,
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
        result = run(variant.config, train, ctx, seed=seed)
    except KeyboardInterrupt:
        record_charge(trial, _clock() - start)
        trial.set_user_attr("status", "interrupted")
        trial.set_user_attr("reason", "interrupted by the user")
        ablation.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a crash of one run must not lose the others: record it, go on
        record_charge(trial, _clock() - start)
        reason = f"{type(exc).__name__}: {exc}"[:500]
        trial.set_user_attr("status", "error")
        trial.set_user_attr("reason", reason)
        ablation.tell(trial, state=TrialState.FAIL)
        return "error", reason
    record_charge(trial, _clock() - start)
    trial.set_user_attr("metrics", dict(result.metrics or {}))
    trial.set_user_attr("seconds", dict(result.seconds or {}))
    trial.set_user_attr("steps_done", int(result.steps_done))
    trial.set_user_attr("status", result.status)
    if result.reason:
        trial.set_user_attr("reason", str(result.reason))
    values = list(result.values or [])
    if result.status == "complete" and len(values) == len(info.objectives) and all(map(math.isfinite, values)):
        ablation.tell(trial, values)
        return "complete", None
    status, reason = result.status, result.reason
    if result.status == "complete":
        status = "error"
        reason = f"runner returned {len(values)} finite objective values for {len(info.objectives)} objectives"
        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
    ablation.tell(trial, state=TrialState.FAIL)
    return status, reason


# ---------------------------------------------------------------------------------------------
# controlled: the table

TABLE_METRICS: tuple[str, ...] = (*QUALITY_METRICS, *COST_METRICS)


def ablation_runs(
    ablation: optuna.Study,
    reference_trial: int | None = None,
    *,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
) -> pd.DataFrame:
    """One row per stored run (the last finished one of each variant and seed) of a reference
    (default: the ablation study's current ``reference_trial``), optionally only ``seeds`` and
    runs trained for ``steps``."""
    if reference_trial is None:
        reference_trial = ablation.user_attrs.get("reference_trial")
    rows = []
    for (variant, seed), trial in sorted(_stored_runs(ablation, reference_trial, steps).items()):
        if seeds is not None and seed not in seeds:
            continue
        metrics = trial.user_attrs.get("metrics") or {}
        row = {
            "trial": trial.number,
            "variant": variant,
            "kind": trial.user_attrs.get("kind"),
            "module": trial.user_attrs.get("module"),
            "seed": seed,
            "status": trial.user_attrs.get("status", trial.state.name.lower()),
            "reason": trial.user_attrs.get("reason"),
            "charged_seconds": trial_charge(trial).seconds,
        }
        for key in TABLE_METRICS:
            value = metrics.get(key)
            row[key] = math.nan if value is None else float(value)
        rows.append(row)
    columns = ["trial", "variant", "kind", "module", "seed", "status", "reason", "charged_seconds", *TABLE_METRICS]
    return pd.DataFrame(rows, columns=columns)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    mean = float(np.mean(clean))
    std = float(np.std(clean, ddof=1)) if len(clean) >= 2 else math.nan
    return mean, std


def controlled_table(runs: pd.DataFrame, variants: Sequence[Variant]) -> pd.DataFrame:
    """The controlled ablation table from ``ablation_runs`` and the variant plan.

    Per variant: finished runs, absolute means (and std) of every metric, and deltas against its
    comparison (``Variant.compare_to``). Quality deltas are paired by seed (variant seed s minus
    comparison seed s), then averaged: mean ± sample std of the paired differences. Cost deltas
    are differences of means (costs do not depend on the seed, except for timing noise).
    A variant marked ``same_as`` another uses that one's runs.
    """
    complete = runs[runs["status"] == "complete"] if not runs.empty else runs
    by_name = {v.name: v for v in variants}

    def source(name: str) -> str:
        variant = by_name.get(name)
        return variant.same_as if variant is not None and variant.same_as else name

    def per_seed(name: str) -> pd.DataFrame:
        return complete[complete["variant"] == source(name)].set_index("seed")

    rows = []
    for variant in variants:
        mine = per_seed(variant.name)
        all_runs = runs[runs["variant"] == source(variant.name)] if not runs.empty else runs
        row: dict[str, Any] = {
            "variant": variant.name,
            "kind": variant.kind,
            "module": variant.module,
            "vs": variant.compare_to,
            "same_as": variant.same_as,
            "n_complete": len(mine),
            "n_paired": 0,
        }
        failures = all_runs[all_runs["status"] != "complete"] if not all_runs.empty else all_runs
        if variant.refused:
            row["note"] = f"not run: {variant.refused}"
        elif len(mine) == 0 and len(failures):
            row["note"] = "; ".join(sorted({f"{s}: {r}" for s, r in zip(failures["status"], failures["reason"])}))
        elif len(mine) == 0:
            row["note"] = "not run yet (budget or interrupted)"
        else:
            row["note"] = f"same runs as {variant.same_as}" if variant.same_as else ""
        for key in TABLE_METRICS:
            mean, std = _mean_std(mine[key].tolist()) if len(mine) else (math.nan, math.nan)
            row[f"{key}_mean"] = mean
            row[f"{key}_std"] = std
        other = per_seed(variant.compare_to) if variant.compare_to else None
        for key in TABLE_METRICS:
            row[f"delta_{key}_mean"] = math.nan
            row[f"delta_{key}_std"] = math.nan
        if other is not None and len(mine) and len(other):
            paired = sorted(set(mine.index) & set(other.index))
            row["n_paired"] = len(paired)
            for key in QUALITY_METRICS:
                diffs = [float(mine.at[s, key]) - float(other.at[s, key]) for s in paired]
                row[f"delta_{key}_mean"], row[f"delta_{key}_std"] = _mean_std(diffs)
            for key in COST_METRICS:
                row[f"delta_{key}_mean"] = _mean_std(mine[key].tolist())[0] - _mean_std(other[key].tolist())[0]
        rows.append(row)
    return pd.DataFrame(rows)


def load_controlled_ablation(study: optuna.Study) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The controlled table of the ablation study stored beside ``study`` (its current plan), and
    the plan; None when no controlled ablation was ever started."""
    ablation = load_ablation_study(study)
    if ablation is None:
        return None
    plan = ablation.user_attrs.get("plan")
    if not plan:
        return None
    variants = [Variant.from_dict(v) for v in plan["variants"]]
    runs = ablation_runs(ablation, plan["reference_trial"], seeds=plan.get("seeds"), steps=plan.get("steps"))
    return controlled_table(runs, variants), plan
