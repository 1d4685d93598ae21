"""Hand-designed baselines trained with exactly a study's trial protocol (docs/baselines.md).

After a search, each baseline of ``ehrsr.baselines`` (SPAN, SAFMN, PLKSR, RLFN, OmniSR, DITN; by
default the "+bicubic skip" form at the space's size class) is trained by the same run path as a
trial (``ehrsr.search.runner.run_model``): the study's data, the reference (knee) trial's training
settings (steps = the top rung, batch, patch, schedule, loss, lr, weight decay), the study's seed,
evaluation at the same rungs and at the end, and the cost of its deploy form
(``deploy_baseline``) at the study's profile size. Runs are stored in ``<study>-baselines`` through
``ehrsr.search.record`` and charged like trials; the reports read them from there.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from ehrsr.baselines import (
    BaselineUnavailable,
    UnknownBaseline,
    available_baselines,
    baseline_label,
    baseline_names,
    baselines_off,
    build_baseline,
    deploy_baseline,
)
from ehrsr.search.pareto import knee_trial
from ehrsr.study_schema import PLAN_ATTR, STUDY, TRIAL, StudyInfo, baselines_study_name
from ehrsr.training import TrainSettings

__all__ = [
    "BaselineError",
    "BaselineSpec",
    "BaselinesResult",
    "default_baselines",
    "parse_baselines",
    "run_baselines",
    "space_size_class",
]


class BaselineError(AblationError):
    """A baseline request that cannot be met (unknown name, no reference trial): one line, exit 2."""


@dataclass(frozen=True)
class BaselineSpec:
    """One baseline to train: registry name, size class and whether it gets the bicubic skip."""

    name: str
    size_class: str = "tiny"
    bicubic_skip: bool = True

    @property
    def label(self) -> str:
        return baseline_label(self.name, self.bicubic_skip)


@dataclass
class BaselinesResult:
    study_name: str  # the <study>-baselines study
    reference_trial: int
    planned: list[BaselineSpec]
    runs_run: int
    runs_skipped: int  # already stored (resumed)
    stopped: str | None  # why runs were left out (budget), None when all are done
    seconds_spent: float  # device-seconds charged by every baseline run so far
    statuses: dict[str, str]  # label -> status of this call's run


def space_size_class(study: optuna.Study) -> str:
    """``full`` for the GPU-sized space, else ``tiny`` (the baselines' two sizes, docs/baselines.md)."""
    space = study.user_attrs.get(STUDY.space) or {}
    return "full" if str(space.get("name", "")).lower() == "full" else "tiny"


def default_baselines(size_class: str = "tiny") -> list[BaselineSpec]:
    """Every baseline buildable here (spandrel installed or not), with the bicubic skip: the fair
    form at search fidelities (docs/baselines.md, "Fair starts")."""
    return [BaselineSpec(b.name, size_class, True) for b in available_baselines() if b.available]


def parse_baselines(text: str | None, size_class: str = "tiny") -> list[BaselineSpec]:
    """``--baselines``: None / ``default`` -> ``default_baselines``; ``none`` -> []; else a comma
    list of names, each optionally ending in ``+skip`` or ``-skip`` (default +skip). Unknown names
    raise ``BaselineError`` listing the valid ones."""
    if text is None or text.strip().lower() in ("", "default", "all"):
        return default_baselines(size_class)
    if baselines_off(text):
        return []
    specs = []
    valid = baseline_names()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        skip = True
        lowered = item.lower()
        if lowered.endswith("-skip"):
            item, skip = item[: -len("-skip")], False
        elif lowered.endswith("+skip"):
            item = item[: -len("+skip")]
        match = next((n for n in valid if n.lower() == item.lower()), None)
        if match is None:
            raise BaselineError(
                f"--baselines: unknown baseline {item!r}; valid: {', '.join(valid)} "
                "(optionally NAME-skip for the published start), 'none' or 'default'"
            )
        specs.append(BaselineSpec(match, size_class, skip))
    return specs


def _reference(study: optuna.Study) -> FrozenTrial:
    trial = knee_trial(study)
    if trial is None or not trial.user_attrs.get(TRIAL.train):
        raise BaselineError(
            f"study {study.study_name!r} has no finished feasible trial with stored training settings: "
            "there is no trial protocol to train the baselines with; run the search first"
        )
    return trial


def trial_protocol(study: optuna.Study, reference: FrozenTrial) -> tuple[TrainSettings, int, list[int]]:
    """(training settings, seed, rung steps) of a trial of ``study``: the reference trial's stored
    settings (steps = the top rung), the study's seed, the study's MO-ASHA rungs below the top."""
    stored = dict(reference.user_attrs[TRIAL.train])
    try:
        train = TrainSettings.from_dict(stored, ignore=("seed",))
    except (TypeError, ValueError) as exc:
        raise BaselineError(f"trial {reference.number}'s stored training settings: {exc}") from None
    early = study.user_attrs.get(STUDY.early_stopping) or {}
    rungs = [int(s) for s in early.get("rung_steps") or [] if 0 < int(s) < train.steps] if early.get("enabled") else []
    return train, int(stored.get("seed", 0)), rungs


def _read_study(study: optuna.Study, specs: Sequence[BaselineSpec] | None) -> tuple[Any, ...]:
    """What the baselines take from the study (storage reads, retried as one): the specs (default:
    the space's size class), the reference trial, its protocol and the task's scale; refuses a
    study whose objectives it does not know."""
    StudyInfo.from_study(study)
    if specs is None:
        specs = default_baselines(space_size_class(study))
    reference = _reference(study)
    scale = int((study.user_attrs.get(STUDY.task) or {}).get("scale", 4))
    return specs, reference, trial_protocol(study, reference), scale


def run_baselines(
    study: optuna.Study,
    ctx: Any,
    specs: Sequence[BaselineSpec] | None = None,
    *,
    budget_seconds: float | None = None,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
) -> BaselinesResult:
    """Train (or resume) ``specs`` (default: ``default_baselines`` at the space's size class) with
    ``study``'s trial protocol and store them in ``<study>-baselines``.

    ``ctx``: the search's ``RunContext`` (``ehrsr.search.study.build_context``). ``budget_seconds``:
    device-seconds the baselines study may spend in all; a run is not started when its estimate
    (median of the runs so far, else the reference trial's charge) would overrun it.
    ``runner`` replaces ``ehrsr.search.runner.run_model`` (tests).
    """
    specs, reference, (train, seed, rungs), scale = storage_retry("read the study", _read_study, study, specs)
    side = open_side_study(study, baselines_study_name(study.study_name))
    plan = {"reference_trial": reference.number, "train": dataclasses.asdict(train), "seed": seed,
            "rung_steps": rungs, "labels": [s.label for s in specs]}
    storage_retry("write the plan", side.set_user_attr, PLAN_ATTR, plan)
    run_train = {**dataclasses.asdict(train), "seed": seed}
    done = {
        t.user_attrs.get(TRIAL.label)
        for t in storage_retry("read the runs", side.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(TRIAL.train) == run_train and t.user_attrs.get(TRIAL.size_class) in {s.size_class for s in specs}
    }
    todo = [s for s in specs if s.label not in done]
    if runner is None:
        from ehrsr.search.runner import run_model as runner  # heavy (data, training): only when running
    budget = SideBudget(budget_seconds)
    fallback = float(reference.user_attrs.get(TRIAL.charged_seconds) or 0.0)
    kind = str(getattr(getattr(ctx, "device", None), "type", "cpu"))
    statuses: dict[str, str] = {}
    stopped = None
    for index, spec in enumerate(todo):
        finished = finished_runs(side)
        stopped = budget.refusal(side, median_charge(finished, fallback), len(todo) - index)
        if stopped:
            break
        try:
            build_baseline(spec.name, scale, spec.size_class, spec.bicubic_skip)  # refuse before asking
        except (UnknownBaseline, BaselineUnavailable) as exc:
            statuses[spec.label] = f"skipped: {exc}"
            continue
        attrs = {TRIAL.baseline: spec.name, TRIAL.label: spec.label, TRIAL.size_class: spec.size_class,
                 TRIAL.bicubic_skip: spec.bicubic_skip, TRIAL.seed: seed, TRIAL.reference_trial: reference.number,
                 TRIAL.train: run_train}

        def run(on_rung: Callable[[int, dict[str, Any]], None], spec: BaselineSpec = spec) -> Any:
            def rung(i: int, step: int, values: list[float], metrics: dict[str, Any]) -> bool:
                on_rung(i, {"step": step, "values": values})
                return True  # a baseline is never stopped early: it gets the top rung

            return runner(lambda: build_baseline(spec.name, scale, spec.size_class, spec.bicubic_skip), train, ctx,
                          seed=seed, rung_steps=rungs, on_rung=rung, deploy=deploy_baseline)

        limits = getattr(ctx, "limits", None)
        outcome = run_recorded(side, attrs, run, device_kind=kind,
                               constraints=limits.constraints if limits is not None else None)
        statuses[spec.label] = outcome.status
        if progress:
            extra = "" if outcome.status == "complete" else f": {outcome.reason}"
            print(f"[baselines] {spec.label}: {outcome.status}{extra}", file=sys.stderr)
    if stopped and progress:
        print(f"[baselines] {stopped}", file=sys.stderr)
    return BaselinesResult(
        study_name=side.study_name, reference_trial=reference.number, planned=list(specs),
        runs_run=len(statuses), runs_skipped=len(specs) - len(todo), stopped=stopped,
        seconds_spent=SideBudget(None).spent(side), statuses=statuses,
    )
