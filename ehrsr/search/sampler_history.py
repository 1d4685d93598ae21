"""A bounded history for Optuna's TPE at thousands of trials (docs/scaling_out.md, "Sampler").

Optuna's ``TPESampler`` reads every finished trial at every proposal: with ``multivariate=True,
group=True`` (``build_sampler``) it decomposes the search space over all of them, splits them into
a good and a bad group and builds both Parzen estimators, once per parameter group. Its time per
proposal grows linearly with the study: measured on the tiny space (``benchmarks/study_overhead.py``,
two objectives) it is tens of milliseconds at 100 finished trials and the better part of a second
at 5,000, more than everything else the search does around a trial. Optuna's documentation
recommends TPE for budgets of 100 to 1,000 trials (the samplers overview of ``optuna.samplers``).

``BoundedHistorySampler`` keeps TPE and bounds what it reads. Up to ``max_trials`` finished
(COMPLETE or PRUNED) trials it passes the study through untouched: the proposals are TPE's own,
bit for bit. Beyond that, the sampler sees

* the ``max_trials`` most recent finished trials, and
* the leading non-dominated fronts of the whole study's feasible COMPLETE trials, whole fronts
  until they hold at least ``ceil(0.1 * max_trials)`` trials: the size of TPE's good group for
  ``max_trials`` trials (Optuna's ``default_gamma_multiobjective``; with one objective TPE keeps
  at most 25, fewer than this).

So TPE's good group, the best tenth of what it sees, is drawn from the best trials of the whole
study (elitism: the study's best fronts are never forgotten) and its bad group from the recent
proposals, which TPE already weights most (its ``default_weights`` ramp down older trials). The
cost per proposal stays that of about ``1.1 * max_trials`` trials however long the study runs.
The fronts are kept up to date per new trial (``pareto.ParetoLevels``), so selecting the view
costs O(n) per proposal, not a sort of the study.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ehrsr.search.pareto import ParetoLevels
from ehrsr.search.settled import FinishedScan
from ehrsr.study_schema import study_storage

__all__ = ["TPE_HISTORY_LIMIT", "BoundedHistorySampler"]

# Finished trials TPE reads in full; beyond this it reads a bounded view (module docstring).
# Optuna recommends TPE for 100 - 1,000 trials; its time per proposal at 1,000 is measured in
# docs/scaling_out.md.
TPE_HISTORY_LIMIT = 1000

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _HistoryView(optuna.Study):
    """The study as the wrapped sampler sees it: the same storage, directions and settings, but its
    finished trials limited to ``visible``. Other states (running, waiting, failed) are read from
    the study itself."""

    def __init__(self, study: optuna.Study, visible: list[FrozenTrial]) -> None:
        # not Study.__init__: the view shares the study's state (storage, ids, thread-local cache)
        self.__dict__.update(study.__dict__)
        self._study = study
        self._visible = visible

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        wanted = tuple(TrialState) if states is None else tuple(s for s in TrialState if s in states)
        trials = [t for t in self._visible if t.state in wanted]
        others = tuple(s for s in wanted if s not in _FINISHED)
        if others:
            trials = sorted(trials + self._study._get_trials(deepcopy=False, states=others, use_cache=use_cache),
                            key=lambda t: t.number)
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class BoundedHistorySampler(BaseSampler):
    """``sampler`` (TPE) reading at most about ``1.1 * max_trials`` finished trials (module docstring)."""

    def __init__(self, sampler: BaseSampler, max_trials: int = TPE_HISTORY_LIMIT) -> None:
        if max_trials < 10:
            raise ValueError(f"max_trials must be >= 10, got {max_trials}")
        self.sampler = sampler
        self.max_trials = max_trials
        self._study_key: tuple[int, str] | None = None
        self._levels: ParetoLevels | None = None  # feasible COMPLETE trials of the whole study
        self._scan = FinishedScan()
        self._view_for: tuple[int, optuna.Study] | None = None  # (trial number, view) of this ask

    def __repr__(self) -> str:
        return f"BoundedHistorySampler({self.sampler!r}, max_trials={self.max_trials})"

    # -- the view -----------------------------------------------------------------------------
    def visible_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        """The finished trials the wrapped sampler sees now, by number (all of them up to ``max_trials``)."""
        finished = study.get_trials(deepcopy=False, states=_FINISHED)
        return self._select(study, finished) or finished

    def _select(self, study: optuna.Study, finished: list[FrozenTrial]) -> list[FrozenTrial] | None:
        """The bounded view of ``finished``, or None when every finished trial is seen."""
        if len(finished) <= self.max_trials:
            return None
        best = set(self._leading(study))
        oldest_recent = finished[-self.max_trials].number
        return [t for t in finished if t.number >= oldest_recent or t.number in best]

    def _leading(self, study: optuna.Study) -> list[int]:
        """Numbers of the whole study's leading fronts (feasible COMPLETE trials), updated with the
        trials finished since the last call."""
        key = (id(study_storage(study)), study.study_name)
        if key != self._study_key or self._levels is None:
            self._study_key, self._scan, self._levels = key, FinishedScan(), None
        new, reset = self._scan.update(study.get_trials(deepcopy=False))
        if reset or self._levels is None:
            self._levels = ParetoLevels(study.directions)
        feasible = [t for t in new if t.state == TrialState.COMPLETE and _feasible(t)]
        if len(self._levels) == 0:
            self._levels.extend([t.values for t in feasible], [t.number for t in feasible])
        else:
            for trial in feasible:
                self._levels.add(trial.values, trial.number)
        return self._levels.leading(math.ceil(0.1 * self.max_trials))

    def _view(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        if self._view_for is not None and self._view_for[0] == trial.number:
            return self._view_for[1]
        visible = self._select(study, study.get_trials(deepcopy=False, states=_FINISHED))
        view = study if visible is None else _HistoryView(study, visible)
        self._view_for = (trial.number, view)
        return view

    # -- BaseSampler ----------------------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._view_for = None  # a new proposal: select the view again
        return self.sampler.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def _feasible(trial: FrozenTrial) -> bool:
    """No constraint violated (Optuna's constraints: a value above 0 is a violation)."""
    return all(value <= 0 for value in (trial.constraints or {}).values())
