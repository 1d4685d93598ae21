"""Baselines trained with a study's protocol and the proxy-fidelity check, on synthetic studies
(tests/reports_study.py) with spy runners: what reaches the runner, what is stored, what the
reports compute from it (docs/baselines.md, docs/reports.md)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import scipy.stats as sps
from optuna.trial import TrialState

from ehrsr.ablation.baselines import BaselineError, BaselineSpec, parse_baselines, run_baselines
from ehrsr.ablation.fidelity import FidelityError, choose_configurations, run_fidelity
from ehrsr.baselines import build_baseline, deploy_baseline
from ehrsr.cli import main
from ehrsr.reports import pareto_plot_data, trials_table, write_report
from ehrsr.reports.baselines import (
    PER_IMAGE_PSNR_KEY,
    baseline_runs,
    compare_with_baselines,
    per_image_psnr,
)
from ehrsr.reports.fidelity import fidelity_report
from ehrsr.search.pareto import knee_trial
from ehrsr.search.runner import CostLimits, RunResult
from ehrsr.stats import paired_interval
from ehrsr.study_schema import StudyInfo
from ehrsr.training import TrainSettings
from tests.reports_study import make_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

CTX = SimpleNamespace(device=SimpleNamespace(type="cpu"), limits=CostLimits())


def _study(tmp_path: Path, **kwargs) -> optuna.Study:
    study = make_study(tmp_path, **kwargs)
    study.set_user_attr("baseline", {"name": "bicubic (MATLAB)", "psnr": 26.5, "ssim": 0.7})
    return study


class SpyRunner:
    """Records what reaches the runner and returns a complete run with given metrics."""

    def __init__(self, psnr_by_call: list[float], latency_ms: float = 5.0, macs: float = 2e9) -> None:
        self.calls: list[dict] = []
        self.psnr = list(psnr_by_call)
        self.latency_ms, self.macs = latency_ms, macs

    def __call__(self, what, train, ctx, **kwargs):
        self.calls.append({"what": what, "train": train, "ctx": ctx, **kwargs})
        on_rung = kwargs.get("on_rung")
        for i, step in enumerate(kwargs.get("rung_steps") or []):
            on_rung(i, step, [0.0, 0.0], {})
        psnr = self.psnr[len(self.calls) - 1]
        metrics = {"psnr": psnr, "ssim": 0.8, "latency_ms": self.latency_ms, "macs": self.macs,
                   "params_deploy": 30000, "params": 30000, "peak_memory_mb": 3.0}
        return RunResult("complete", None, metrics, [psnr, self.latency_ms], {"total": 1.0}, train.steps)


def test_baselines_get_exactly_the_reference_trials_protocol(tmp_path: Path, monkeypatch) -> None:
    import ehrsr.ablation.side

    clock = iter(range(0, 1000, 7))  # each run's wall time: 7 s by this clock
    monkeypatch.setattr(ehrsr.ablation.side, "_clock", lambda: float(next(clock)))
    study = _study(tmp_path)
    runner = SpyRunner([27.0, 26.0])
    specs = [BaselineSpec("RLFN", "tiny", True), BaselineSpec("SPAN", "tiny", False)]
    result = run_baselines(study, CTX, specs, progress=False, runner=runner)
    reference = knee_trial(study)
    expected = TrainSettings.from_dict(reference.user_attrs["train"], ignore=("seed",))
    assert result.reference_trial == reference.number and result.runs_run == 2
    for call, spec in zip(runner.calls, specs):
        assert call["train"] == expected  # steps = the top rung (180), batch, patch, lr, loss
        assert call["seed"] == reference.user_attrs["train"]["seed"]
        assert call["rung_steps"] == [20, 60]  # the study's rungs below the top
        assert call["deploy"] is deploy_baseline
        model = call["what"]()
        assert type(model).__name__ == type(build_baseline(spec.name, 4, "tiny", spec.bicubic_skip)).__name__
    side = optuna.load_study(study_name="demo-baselines", storage=study._storage)
    stored = {t.user_attrs["label"]: t for t in side.trials}
    assert set(stored) == {"RLFN (+bicubic skip)", "SPAN"}
    for t in side.trials:
        assert t.state == TrialState.COMPLETE and t.user_attrs["steps_done"] == 180
        assert t.user_attrs["train"]["batch_size"] == 8 and t.user_attrs["train"]["patch_size"] == 32
        assert t.user_attrs["rung_0"]["step"] == 20
        assert t.user_attrs["charged_seconds"] == 7.0  # its wall time times its one device
    # resumed: nothing to do
    again = run_baselines(study, CTX, specs, progress=False, runner=SpyRunner([]))
    assert again.runs_run == 0 and again.runs_skipped == 2


def test_baseline_budget_cuts_runs(tmp_path: Path) -> None:
    study = _study(tmp_path)
    # the reference trial was charged about 16 s: a budget of 1 s starts nothing
    result = run_baselines(study, CTX, [BaselineSpec("RLFN")], budget_seconds=1.0, progress=False,
                           runner=SpyRunner([27.0]))
    assert result.runs_run == 0 and "budget of 1 s" in result.stopped


def test_parse_baselines() -> None:
    assert [s.label for s in parse_baselines("rlfn,SPAN-skip")] == ["RLFN (+bicubic skip)", "SPAN"]
    assert parse_baselines("none") == []
    assert all(s.bicubic_skip for s in parse_baselines(None))
    with pytest.raises(BaselineError, match="unknown baseline 'FOO'; valid: SPAN"):
        parse_baselines("RLFN,FOO")


@pytest.mark.parametrize(("text", "off"), [("none", True), (" NONE ", True), ("None", True), (None, False),
                                         ("default", False), ("RLFN", False)])
def test_baselines_none_is_read_in_one_place(text: str | None, off: bool) -> None:
    # the budget kept for the baselines and the baselines trained agree on every spelling
    from ehrsr.baselines import baselines_off
    from ehrsr.search.study import SearchSettings

    settings = SearchSettings(baselines=text, ablation_share=0.15, baselines_share=0.1, fidelity_share=0.05)
    assert baselines_off(text) is off
    assert settings.reserved_share == pytest.approx(0.2 if off else 0.3)
    assert (parse_baselines(text) == []) is off


def test_unknown_baseline_is_one_line_exit_2_before_any_search(tmp_path: Path, capsys) -> None:
    code = main(["--baselines", "FOO", "--out-dir", str(tmp_path / "r"), "--budget", "trials=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown baseline 'FOO'" in err
    assert not (tmp_path / "r").exists()


def test_comparison_table_and_plot(tmp_path: Path) -> None:
    study = _study(tmp_path)
    info = StudyInfo.from_study(study)
    run_baselines(study, CTX, [BaselineSpec("RLFN"), BaselineSpec("SPAN")], progress=False,
                  runner=SpyRunner([27.0, 26.0], latency_ms=3.0, macs=2e9))
    runs = baseline_runs(study)
    assert [r.below_trivial for r in runs] == [None, "below bicubic (MATLAB) (26.50 dB)"]
    trials = trials_table(study)
    data = pareto_plot_data(trials, info, "psnr", "latency_ms", [t.number for t in study.best_trials], None, runs)
    labels = [label for _, label in data.baselines]
    assert labels == ["RLFN (+bicubic skip)", "SPAN (+bicubic skip) (below bicubic)"]
    assert [p.y for p, _ in data.baselines] == [27.0, 26.0]

    rows = compare_with_baselines(study, runs)
    rlfn_latency = next(r for r in rows if r.baseline.startswith("RLFN") and r.cost_key == "latency_ms")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    cheaper = [t for t in done if t.user_attrs["metrics"]["latency_ms"] <= 3.0]
    if cheaper:
        best = max(cheaper, key=lambda t: t.user_attrs["metrics"]["psnr"])
        assert rlfn_latency.best_trial == best.number
        assert rlfn_latency.psnr_difference == pytest.approx(best.user_attrs["metrics"]["psnr"] - 27.0)
        assert rlfn_latency.interval is None and "no per-image PSNR" in rlfn_latency.no_interval_reason
    better = [t for t in done if t.user_attrs["metrics"]["psnr"] >= 27.0]
    cheapest = min(better, key=lambda t: t.user_attrs["metrics"]["latency_ms"])
    assert rlfn_latency.cheapest_trial == cheapest.number
    report = write_report(study, tmp_path / "out", quiet=True).read_text()
    assert "## Baselines" in report and "### EHR-SR vs baselines" in report and "RLFN (+bicubic skip)" in report
    assert "charged to the budget" in report and "no CI: no per-image PSNR" in report


def _encoded(psnrs: list[float]) -> dict[str, list[float]]:
    """Per-image values as a run stores them ({image name: [psnr, ssim]}, names in order)."""
    return {f"img{i:02d}": [value, 0.8] for i, value in enumerate(psnrs)}


def test_paired_interval_uses_the_per_image_values(tmp_path: Path) -> None:
    source = _study(tmp_path)
    rng = random.Random(1)
    # a copy of the study whose trials store per-image PSNR (finished trials cannot be updated)
    study = optuna.create_study(study_name="pi", storage=source._storage, directions=source.directions)
    for key, value in source.user_attrs.items():
        study.set_user_attr(key, value)
    mine = {}
    for t in source.trials:
        mine[t.number] = [rng.gauss(28, 1) for _ in range(6)]
        study.add_trial(optuna.trial.create_trial(
            state=t.state, values=t.values, params=t.params, distributions=t.distributions,
            user_attrs={**t.user_attrs, PER_IMAGE_PSNR_KEY: _encoded(mine[t.number])},
            system_attrs=t.system_attrs))
    theirs = [rng.gauss(27, 1) for _ in range(6)]
    runner = SpyRunner([27.0], latency_ms=50.0)
    original = runner.__call__

    class WithPerImage(SpyRunner):
        def __call__(self, *args, **kwargs):
            result = original(*args, **kwargs)
            result.per_image = _encoded(theirs)  # what the runner stores for complete runs
            return result

    runner.__class__ = WithPerImage
    run_baselines(study, CTX, [BaselineSpec("RLFN")], progress=False, runner=runner)
    side = optuna.load_study(study_name="pi-baselines", storage=study._storage)
    assert per_image_psnr(side.trials[0]) == theirs
    row = next(r for r in compare_with_baselines(study) if r.cost_key == "latency_ms")
    assert row.best_trial is not None
    expected = paired_interval(np.array(mine[row.best_trial]) - np.array(theirs))
    assert row.interval == expected and row.no_interval_reason is None


def test_choose_configurations_spans_front_and_cloud(tmp_path: Path) -> None:
    study = _study(tmp_path)
    chosen = choose_configurations(study, 8)
    front = {t.number for t in study.best_trials}
    assert len(chosen) == 8 and len({t.number for t in chosen}) == 8
    assert 0 < len([t for t in chosen if t.number in front]) <= 4
    cloud = sorted((t for t in study.trials if t.state == TrialState.COMPLETE and t.number not in front),
                   key=lambda t: t.user_attrs["metrics"]["psnr"])
    picked = [t.number for t in chosen if t.number not in front]
    assert cloud[0].number in picked and cloud[-1].number in picked  # both ends of the brief range


def test_fidelity_runs_and_agreement_equals_scipy(tmp_path: Path) -> None:
    study = _study(tmp_path)
    long_psnr = [29.0, 28.1, 28.7, 27.5, 28.9, 27.9]
    runner = SpyRunner(long_psnr)
    result = run_fidelity(study, CTX, configs=6, factor=3, progress=False, runner=runner)
    assert result.runs_run == 6
    for call, source in zip(runner.calls, result.sources):
        trial = study.trials[source]
        assert call["train"].steps == 3 * trial.user_attrs["train"]["steps"]
        assert call["train"].lr == trial.user_attrs["train"]["lr"]
        assert call["seed"] == trial.user_attrs["train"]["seed"] + source
        assert call["what"].to_dict() == trial.user_attrs["config"]
    report = fidelity_report(study)
    side = optuna.load_study(study_name="demo-fidelity", storage=study._storage)
    brief = [t.user_attrs["brief_metrics"]["psnr"] for t in sorted(side.trials, key=lambda t: t.user_attrs["source_trial"])]
    long = [t.user_attrs["metrics"]["psnr"] for t in sorted(side.trials, key=lambda t: t.user_attrs["source_trial"])]
    assert report.agreement.spearman == pytest.approx(sps.spearmanr(brief, long).statistic)
    assert report.agreement.kendall == pytest.approx(sps.kendalltau(brief, long).statistic)
    assert report.agreement.kendall_low <= report.agreement.kendall <= report.agreement.kendall_high
    assert report.trusted == (report.agreement.kendall_low > 0.5)  # 6 points: a verdict is given
    text = write_report(study, tmp_path / "out", quiet=True).read_text()
    assert "## Proxy fidelity" in text and report.message in text
    assert (tmp_path / "out" / "figures" / "fidelity.png").exists()
    # resumable: nothing left to run
    assert run_fidelity(study, CTX, configs=6, factor=3, progress=False, runner=SpyRunner([])).runs_skipped == 6


def test_fidelity_with_too_few_trials_is_a_clear_message(tmp_path: Path, capsys) -> None:
    study = _study(tmp_path, n_trials=1)
    with pytest.raises(FidelityError, match="needs at least 4"):
        run_fidelity(study, CTX, progress=False, runner=SpyRunner([]))
    with pytest.raises(FidelityError, match="--configs must be an integer >= 4"):
        run_fidelity(study, CTX, configs=3, progress=False, runner=SpyRunner([]))
    # the CLI path: one line, exit 2
    code = main(["fidelity", "--study-name", "demo", "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                 "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")


def test_fidelity_report_with_fewer_than_four_long_runs(tmp_path: Path) -> None:
    study = _study(tmp_path)
    # each long run is estimated at 4x its trial's charge (about 16 s): 40 s starts none of them
    result = run_fidelity(study, CTX, configs=4, budget_seconds=40.0, progress=False, runner=SpyRunner([28.0] * 4))
    assert result.runs_run == 0 and "budget of 40 s" in result.stopped
    report = fidelity_report(study)
    assert report.agreement is None and report.trusted is None and report.points == []
    assert report.message.startswith("Only 0 long retrains finished; the rank agreement needs at least 4")
    text = write_report(study, tmp_path / "out", quiet=True).read_text()
    assert report.message in text
