"""Ranking proxies: scores of a brief training run that stand in for quality after full training.

Every front, ablation verdict and pick of a search is a ranking by what a trial's brief training
measured. A proxy is judged by one thing: does it rank configurations as long training does
(docs/proxy_fidelity.md)? This module holds what a proxy computes from a run's record:

- the final validation PSNR (what a trial's objective has always been);
- learning-curve extrapolation: a three-parameter fit of the validation PSNR over steps (a power
  law ``a - b * t**-c`` or a saturating exponential ``a - b * exp(-c t)``, two of the parametric
  families of Domhan et al., IJCAI 2015) read at a longer step count;
- the training-loss sum over the last part of training ("TSE-E", Ru et al., "Speedy performance
  estimation for neural architecture search", NeurIPS 2021), negated so that higher is better.

Scores are plain functions of a ``LearningCurve`` so a benchmark can score stored curves again
without training (``benchmarks/proxy_fidelity.py``). The second half keeps a study's verdicts
(``FidelityCheck``): the one its space's measured agreement gives at the start, and the steps per
rung a failed check raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import optuna

from ehrsr.stats import MIN_RANK_POINTS, MIN_TRUST_POINTS, TRUST_TAU_LOW, StatsError, rank_agreement
from ehrsr.study_schema import (
    FIDELITY_CHECKS_ATTR,
    STEPS_SCALE_ATTR,
    TRIAL,
    FidelityCheck,
    finite,
    steps_scale,
)

__all__ = [
    "CURVE_MODELS",
    "CurveFit",
    "LearningCurve",
    "RetrainPoint",
    "add_check",
    "check_line",
    "extrapolated_psnr",
    "final_psnr",
    "fit_learning_curve",
    "loss_sum",
    "raise_steps",
    "raised_steps_text",
    "retrain_check",
    "retrain_points",
    "start_check",
    "study_verdict",
]

CurveModel = Literal["pow3", "exp3"]
CURVE_MODELS: tuple[str, ...] = ("pow3", "exp3")


@dataclass(frozen=True)
class LearningCurve:
    """What one training run recorded.

    ``psnr``: ``(step, validation PSNR in dB)`` at the steps it was evaluated, increasing steps.
    ``loss``: ``(step, mean training loss of the steps since the previous entry)``.
    ``steps``: the run's length (its schedule spans them).
    """

    psnr: tuple[tuple[int, float], ...]
    loss: tuple[tuple[int, float], ...]
    steps: int

    @classmethod
    def from_lists(cls, psnr: Sequence[Sequence[float]], loss: Sequence[Sequence[float]], steps: int) -> LearningCurve:
        return cls(tuple((int(s), float(v)) for s, v in psnr), tuple((int(s), float(v)) for s, v in loss), int(steps))

    def psnr_at(self, step: int) -> float:
        """The validation PSNR recorded at ``step`` (``KeyError`` when it was not evaluated there)."""
        for s, value in self.psnr:
            if s == step:
                return value
        raise KeyError(f"no validation PSNR recorded at step {step} (recorded: {[s for s, _ in self.psnr]})")


def final_psnr(curve: LearningCurve) -> float:
    """The validation PSNR at the end of the run."""
    return curve.psnr_at(curve.steps)


def loss_sum(curve: LearningCurve, fraction: float = 0.5) -> float:
    """Minus the mean training loss over the last ``fraction`` of the run's steps (TSE-E: higher is
    better). Each history entry is weighted by the steps it covers."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    start = curve.steps * (1 - fraction)
    total, weight, previous = 0.0, 0.0, 0
    for step, value in curve.loss:
        covered = step - max(previous, start)
        if covered > 0:
            total += value * covered
            weight += covered
        previous = step
    if weight == 0:
        raise ValueError(f"the loss history has no entry in the last {fraction:.0%} of {curve.steps} steps")
    return -total / weight


@dataclass(frozen=True)
class CurveFit:
    """A fitted learning curve ``y(t)``: ``pow3`` is ``a - b * t**-c``, ``exp3`` is
    ``a - b * exp(-c * t)`` (``a``: the asymptote; ``b`` >= 0, ``c`` > 0)."""

    model: CurveModel
    a: float
    b: float
    c: float
    rmse: float  # root mean square residual on the fitted points

    def __call__(self, step: float) -> float:
        return float(_curve(self.model, np.asarray(float(step)), self.a, self.b, self.c))


def _curve(model: str, t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    if model == "pow3":
        return a - b * np.power(t, -c)
    return a - b * np.exp(-c * t)


def fit_learning_curve(steps: Sequence[float], values: Sequence[float], model: CurveModel = "pow3") -> CurveFit:
    """Least-squares fit of ``model`` to ``(steps, values)`` (at least 3 points, steps > 0).

    The exponential's rate is fitted on steps scaled to the last one, so ``c`` is returned per step.
    Raises ``ValueError`` for too few points or a fit that does not converge."""
    from scipy.optimize import curve_fit

    if model not in CURVE_MODELS:
        raise ValueError(f"curve model must be one of {', '.join(CURVE_MODELS)}, got {model!r}")
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1 or t.size < 3:
        raise ValueError(f"a learning-curve fit needs at least 3 (step, value) points, got {t.size}")
    if np.any(t <= 0) or not (np.all(np.isfinite(t)) and np.all(np.isfinite(y))):
        raise ValueError("learning-curve steps must be > 0 and values finite")
    scale = float(t.max())
    u = t / scale
    span = max(float(np.ptp(y)), 1e-6)
    if model == "pow3":
        # a - b * t^-c = a - (b * scale^-c) * u^-c: fit on u, convert b back
        initial = (float(y.max()) + 0.1 * span, span, 0.5)
        bounds = ([-np.inf, 0.0, 1e-4], [np.inf, np.inf, 5.0])
    else:
        initial = (float(y.max()) + 0.1 * span, span, 3.0)
        bounds = ([-np.inf, 0.0, 1e-4], [np.inf, np.inf, 1e3])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (a, b_u, c_u), _ = curve_fit(lambda x, a, b, c: _curve(model, x, a, b, c), u, y, p0=initial,
                                         bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the {model} learning-curve fit did not converge: {exc}") from None
    if model == "pow3":
        b, c = b_u * scale**c_u, c_u
    else:
        b, c = b_u, c_u / scale
    fit = CurveFit(model, float(a), float(b), float(c), 0.0)
    residual = y - np.array([fit(s) for s in t])
    return CurveFit(model, float(a), float(b), float(c), float(math.sqrt(float(np.mean(residual**2)))))


def extrapolated_psnr(curve: LearningCurve, target_steps: int, model: CurveModel = "pow3",
                      skip_before: int = 1) -> float:
    """The validation PSNR that ``model`` fitted to the run's PSNR curve (points at steps >=
    ``skip_before``) predicts at ``target_steps``."""
    points = [(s, v) for s, v in curve.psnr if s >= skip_before]
    fit = fit_learning_curve([s for s, _ in points], [v for _, v in points], model)
    return fit(target_steps)


# ---------------------------------------------------------------------------------------------
# verdicts of a study, and what the search does about them


def start_check(space: Any, record: Any) -> tuple[FidelityCheck | None, int]:
    """The study's verdict before its first trial, from its space's ``proxy`` section when that was
    measured on the study's task and data (``ProxyAgreement.applies_to``), and the factor on the
    space's steps to train with: 1, or the space's ``eta`` when the measured agreement is not
    trusted. ``(None, 1)`` when no measurement applies (the in-study check decides later)."""
    agreement = space.proxy
    steps = space.fidelity.max_steps
    if agreement is None or not agreement.applies_to(record.task, record.data.train, record.data.val):
        return None, 1
    check = FidelityCheck(
        when="start", source="space", trial_steps=steps, kendall=agreement.kendall,
        kendall_low=agreement.kendall_low, kendall_high=agreement.kendall_high, spearman=agreement.spearman,
        configurations=agreement.configurations, factor=None, trusted=agreement.trusted,
        note=f"measured by benchmarks/proxy_fidelity.py on this space and data: {agreement.reference}",
    )
    if agreement.trusted:
        return check, 1
    scale = space.fidelity.eta
    return replace(check, action=raised_steps_text(steps, steps * scale)), scale


def study_verdict(checks: Sequence[FidelityCheck]) -> FidelityCheck | None:
    """The check a study's ranking stands on: the latest one that reached a verdict (a later check
    that could not, e.g. too few retrains, does not undo it), else the latest; None without checks."""
    decided = [c for c in checks if c.trusted is not None]
    return decided[-1] if decided else (checks[-1] if checks else None)


def space_check_applies(checks: Sequence[FidelityCheck], steps_factor: int) -> FidelityCheck | None:
    """The space's measured verdict when it stands for this study: it was stored at the start (the
    study's task and data are the benchmark's), trusted, and the trials still train as measured."""
    start = next((c for c in checks if c.source == "space"), None)
    return start if start is not None and start.trusted and steps_factor == 1 else None


def raised_steps_text(before: int, after: int) -> str:
    return f"steps per trial raised from {before} to {after} (every rung x{after // before}) for the trials after it"


def add_check(study: optuna.Study, check: FidelityCheck) -> None:
    """Append ``check`` to the study's stored verdicts."""
    checks = list(study.user_attrs.get(FIDELITY_CHECKS_ATTR) or [])
    study.set_user_attr(FIDELITY_CHECKS_ATTR, [*checks, check.to_dict()])


def raise_steps(study: optuna.Study, factor: int) -> int:
    """Multiply the study's steps per rung by ``factor`` for the trials that start from now on;
    returns the new factor on the space's steps."""
    scale = steps_scale(study) * int(factor)
    study.set_user_attr(STEPS_SCALE_ATTR, scale)
    return scale


def check_line(check: FidelityCheck) -> str:
    """One line for logs and the report: the verdict, tau with its interval, where it comes from,
    and what the search did."""
    if check.kendall is None or check.trusted is None:
        verdict = f"no verdict ({check.note or 'too few long retrains'})"
    else:
        word = "trusted" if check.trusted else "not trusted"
        verdict = (f"{word}: Kendall tau {check.kendall:+.2f} [{check.kendall_low:+.2f}, {check.kendall_high:+.2f}] "
                   f"over {check.configurations} configurations at {check.trial_steps} steps per trial")
        source = ("the space's agreement measured against long training" if check.source == "space"
                  else f"this study's retrains, {check.factor:g}x longer")
        verdict += f" ({source})"
    return verdict + (f"; {check.action}" if check.action else "")


@dataclass(frozen=True)
class RetrainPoint:
    """One configuration of a proxy-fidelity check: its trial's brief PSNR and the long retrain's."""

    source_trial: int
    brief: float
    long: float
    brief_steps: int
    factor: float


def retrain_points(side: optuna.Study | None, *, sources: Sequence[int] | None = None,
                   brief_steps: int | None = None) -> list[RetrainPoint]:
    """The finished long retrains of a ``<study>-fidelity`` study, optionally only those of trials
    ``sources`` or of trials that trained ``brief_steps`` steps; ordered by trial number."""
    if side is None:
        return []
    points = []
    for trial in side.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        brief = (attrs.get(TRIAL.brief_metrics) or {}).get("psnr")
        long = (attrs.get(TRIAL.metrics) or {}).get("psnr")
        if not (finite(brief) and finite(long)):
            continue
        point = RetrainPoint(int(attrs[TRIAL.source_trial]), float(brief), float(long),
                             int(attrs.get(TRIAL.brief_steps, 0)), float(attrs.get(TRIAL.factor, 0.0)))
        if (sources is None or point.source_trial in sources) and (brief_steps is None or point.brief_steps == brief_steps):
            points.append(point)
    return sorted(points, key=lambda p: p.source_trial)


def retrain_check(points: Sequence[RetrainPoint], *, when: str, trial_steps: int, note: str = "") -> FidelityCheck:
    """The verdict of long retrains: trusted when tau's interval starts above ``TRUST_TAU_LOW``;
    no verdict (``trusted`` None) below ``MIN_TRUST_POINTS`` configurations."""
    factors = {p.factor for p in points}
    factor = next(iter(factors)) if len(factors) == 1 else None
    if len(points) < MIN_RANK_POINTS:
        return FidelityCheck(when, "retrains", trial_steps, None, None, None, None, len(points), factor, None,
                             note=note or f"{len(points)} long retrains finished; at least {MIN_TRUST_POINTS} are needed")
    try:
        agreement = rank_agreement([p.brief for p in points], [p.long for p in points])
    except StatsError as exc:
        return FidelityCheck(when, "retrains", trial_steps, None, None, None, None, len(points), factor, None,
                             note=note or f"no rank agreement: {exc}")
    trusted = agreement.kendall_low > TRUST_TAU_LOW if agreement.n >= MIN_TRUST_POINTS else None
    if trusted is None and not note:
        note = f"{agreement.n} configurations are too few for a verdict (at least {MIN_TRUST_POINTS})"
    return FidelityCheck(when, "retrains", trial_steps, agreement.kendall, agreement.kendall_low,
                         agreement.kendall_high, agreement.spearman, agreement.n, factor, trusted, note=note)
