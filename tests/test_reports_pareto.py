"""trials.csv, pareto.csv, the knee, and the data behind the Pareto plots."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest

from ehrsr.reports import knee_point, knee_trial, pareto_plot_data, pareto_table, trials_table, write_report
from ehrsr.study_schema import StudyInfo
from tests.reports_study import make_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

MAX_LATENCY_MS = 8.0


@pytest.fixture(scope="module")
def constrained(tmp_path_factory):
    """A psnr/latency study with a latency limit: some finished trials are infeasible."""
    root = tmp_path_factory.mktemp("constrained")
    study = make_study(root, max_latency_ms=MAX_LATENCY_MS)
    report = write_report(study, root / "report", quiet=True)
    return study, report.parent


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a dominates b (both in minimisation form)."""
    return bool(np.all(a <= b) and np.any(a < b))


def test_pareto_csv_is_optunas_front_with_no_dominated_point(constrained):
    study, out = constrained
    pareto = pd.read_csv(out / "pareto.csv")
    best = study.best_trials
    # the same set of trials as Optuna's best_trials, and the stored values
    assert sorted(pareto["number"]) == sorted(t.number for t in best)
    assert len(best) >= 3  # the fixture is meant to have a real front
    by_number = {t.number: t for t in best}
    for _, row in pareto.iterrows():
        assert row["value.psnr"] == pytest.approx(by_number[row["number"]].values[0], rel=1e-12)
        assert row["value.latency"] == pytest.approx(by_number[row["number"]].values[1], rel=1e-12)
    # no point of pareto.csv is dominated by another one
    loss = np.column_stack([-pareto["value.psnr"], pareto["value.latency"]])
    for i in range(len(loss)):
        assert not any(_dominates(loss[j], loss[i]) for j in range(len(loss)) if j != i)
    # every feasible finished trial missing from it is dominated by a point on it (the front is complete)
    trials = pd.read_csv(out / "trials.csv")
    done = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    rest = done[~done["number"].isin(pareto["number"])]
    assert len(rest) > 0
    for _, row in rest.iterrows():
        point = np.array([-row["value.psnr"], row["value.latency"]])
        assert any(_dominates(front_point, point) for front_point in loss)
    # infeasible trials (latency over the limit) are never on the front, however good their PSNR
    infeasible = trials[(trials["state"] == "COMPLETE") & ~trials["feasible"]]
    assert len(infeasible) > 0
    assert (infeasible["latency_ms"] > MAX_LATENCY_MS).all()
    assert not infeasible["number"].isin(pareto["number"]).any()
    assert (infeasible["constraint.latency_ms"] > 0).all()
    # best first in the first objective, the knee marked exactly once
    assert list(pareto["value.psnr"]) == sorted(pareto["value.psnr"], reverse=True)
    assert pareto["knee"].sum() == 1


def test_trials_csv_has_every_trial_with_state_reason_and_timings(constrained):
    study, out = constrained
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["number"]) == [t.number for t in study.trials]
    frozen = {t.number: t for t in study.trials}
    states = {t.number: t.state.name for t in study.trials}
    assert dict(zip(trials["number"], trials["state"])) == states
    assert set(trials["state"]) == {"COMPLETE", "PRUNED", "FAIL", "RUNNING"}
    diverged = trials[trials["status"] == "diverged"]
    assert len(diverged) == 1 and diverged["reason"].iloc[0] == "loss became NaN at step 57"
    pruned = trials[trials["state"] == "PRUNED"]
    assert (pruned["status"] == "pruned").all() and pruned["reason"].str.contains("MO-ASHA").all()
    references = trials.dropna(subset=["reference"])
    assert sorted(references["reference"]) == ["all-modules", "conv-only"]
    for _, row in trials[trials["state"] == "COMPLETE"].iterrows():
        attrs = frozen[row["number"]].user_attrs
        for key in ("train", "eval", "profile", "total"):
            assert row[f"seconds.{key}"] == pytest.approx(attrs["seconds"][key])
        assert row["charged_seconds"] == pytest.approx(attrs["charged_seconds"])
        assert row["psnr"] == pytest.approx(attrs["metrics"]["psnr"])
        assert row["config.width"] == attrs["config"]["width"]
        assert row["param.width"] == frozen[row["number"]].params["width"]


def test_knee_is_the_point_closest_to_utopia_after_normalising():
    # maximise PSNR, minimise latency. Normalised losses: (0, 1), (0.2, 0.222), (1, 0)
    values = [[30.0, 10.0], [29.0, 3.0], [25.0, 1.0]]
    assert knee_point(values, ["maximize", "minimize"]) == 1
    # scale does not matter: latency in seconds instead of ms picks the same point
    assert knee_point([[v[0], v[1] / 1000] for v in values], ["maximize", "minimize"]) == 1
    # Euclidean distance: the middle (0.5, 0.5) is at 0.707, the extremes at 1
    assert knee_point([[10.0, 10.0], [5.0, 5.0], [0.0, 0.0]], ["maximize", "minimize"]) == 1
    # normalised (0, 1), (0.1, 0.55), (0.35, 0.35), (1, 0): Euclidean distances 1, 0.559, 0.495, 1
    # pick the third point, where a sum of normalised losses (0.65 < 0.70) would pick the second
    assert knee_point([[10.0, 20.0], [9.0, 11.0], [6.5, 7.0], [0.0, 0.0]], ["maximize", "minimize"]) == 2
    # a point best in every objective is the knee
    assert knee_point([[10.0, 0.0], [9.0, 0.0]], ["maximize", "minimize"]) == 0
    # equal points: the lower index; one objective: the best value; empty front: None
    assert knee_point([[1.0, 2.0], [1.0, 2.0]], ["minimize", "minimize"]) == 0
    assert knee_point([[3.0], [1.0], [2.0]], ["minimize"]) == 1
    assert knee_point(np.zeros((0, 2)), ["minimize", "minimize"]) is None


def test_knee_trial_is_on_the_front(constrained):
    study, _ = constrained
    knee = knee_trial(study)
    front = sorted(study.best_trials, key=lambda t: t.number)
    assert knee is not None and knee.number in {t.number for t in front}
    index = knee_point([list(t.values) for t in front], ["maximize", "minimize"])
    assert knee.number == front[index].number


def test_pareto_plot_data_marks_front_dominated_infeasible_and_references(constrained):
    study, _ = constrained
    trials = trials_table(study)
    info = StudyInfo.from_study(study)
    front = [t.number for t in study.best_trials]
    knee = knee_trial(study).number
    data = pareto_plot_data(trials, info, "psnr", "latency_ms", front, knee)
    done = trials[trials["state"] == "COMPLETE"]
    feasible = done[done["feasible"]]
    # every finished trial appears once, in exactly one group
    groups = [data.study_front, data.dominated, data.infeasible]
    numbers = [p.number for group in groups for p in group]
    assert sorted(numbers) == sorted(done["number"])
    assert {p.number for p in data.infeasible} == set(done[~done["feasible"]]["number"])
    # psnr and latency are the study's objectives: the 2-D front of the pair is the study's front
    assert {p.number for p in data.front_line} == set(front) == {p.number for p in data.study_front}
    xs = [p.x for p in data.front_line]
    ys = [p.y for p in data.front_line]
    assert xs == sorted(xs) and ys == sorted(ys)  # cheaper points have lower PSNR along a front
    assert len(feasible) == len(data.study_front) + len(data.dominated)
    assert {name for _, name in data.references} == {"conv-only", "all-modules"}
    assert data.knee is not None and data.knee.number == knee
    assert "ms" in data.x_label and "Test CPU" in data.x_label and "1x3x256x256" in data.x_label
    assert data.y_label.startswith("PSNR (dB")
    # a cost that is not an objective: its own 2-D front, every point of it feasible and non-dominated
    macs = pareto_plot_data(trials, info, "psnr", "macs", front, knee)
    points = np.array([[p.x, -p.y] for p in macs.front_line])
    others = np.array([[p.x, -p.y] for p in macs.study_front + macs.dominated])
    for point in points:
        assert not any(_dominates(other, point) for other in others)
    assert "fvcore" in macs.x_label and "1x3x256x256" in macs.x_label
    # LPIPS was never measured: no plot
    assert pareto_plot_data(trials, info, "lpips", "latency_ms", front) is None
    # the study stores no baseline: no baseline line
    assert data.baseline is None


def test_baseline_quality_is_drawn_and_reported(tmp_path):
    study = make_study(tmp_path, n_trials=8)
    study.set_user_attr("baseline", {"name": "bicubic (MATLAB)", "psnr": 27.5, "ssim": 0.71, "lpips": None})
    trials = trials_table(study)
    info = StudyInfo.from_study(study)
    front = [t.number for t in study.best_trials]
    assert pareto_plot_data(trials, info, "psnr", "latency_ms", front).baseline == ("bicubic (MATLAB)", 27.5)
    assert pareto_plot_data(trials, info, "ssim", "macs", front).baseline == ("bicubic (MATLAB)", 0.71)
    report = write_report(study, tmp_path / "out", quiet=True).read_text()
    assert "bicubic (MATLAB) on the validation set: PSNR 27.50 dB, SSIM 0.7100" in report


def test_single_objective_study(tmp_path):
    study = make_study(tmp_path, objectives=("psnr",), n_trials=10)
    table = pareto_table(study)
    best = max(t.values[0] for t in study.trials if t.state.name == "COMPLETE")
    # one objective: best_trials holds every trial tied at the best value
    assert set(table["number"]) == {t.number for t in study.best_trials}
    assert table["value.psnr"].max() == pytest.approx(best)
    assert table["knee"].sum() == 1
    assert math.isclose(table.loc[table["knee"], "value.psnr"].iloc[0], best)
