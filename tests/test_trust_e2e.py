"""A real micro search with baselines, the proxy-fidelity check and the controlled ablation, end
to end through the command line (training, evaluation and profiling for real; tiny networks)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import scipy.stats as sps
from optuna.trial import TrialState

from ehrsr.cli import main
from ehrsr.reports import pareto_plot_data, trials_table
from ehrsr.reports.baselines import baseline_runs
from ehrsr.reports.fidelity import fidelity_report
from ehrsr.study_schema import StudyInfo

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.mark.slow
def test_micro_search_with_baselines_fidelity_and_ablation(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    code = main([
        "--space", MICRO, "--budget", "trials=4", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
        "--profile-size", "32", "--profile-seconds", "0.000001", "--study-name", "m", "--no-early-stopping",
        "--baselines", "RLFN", "--baselines-share", "0.3", "--fidelity-share", "0.3", "--fidelity-configs", "4",
        "--fidelity-factor", "2", "--ablation-share", "0.3", "--ablation-seeds", "1", "--threads", "1",
    ])
    assert code == 0
    storage = f"sqlite:///{out / 'm' / 'study.db'}"
    study = optuna.load_study(study_name="m", storage=storage)
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 4 and all(t.user_attrs["steps_done"] == 8 for t in trials)

    # the baseline got a trial's protocol: same steps (the top rung), batch and patch as the trials
    side = optuna.load_study(study_name="m-baselines", storage=storage)
    (run,) = side.trials
    assert run.state == TrialState.COMPLETE and run.user_attrs["label"] == "RLFN (+bicubic skip)"
    assert run.user_attrs["steps_done"] == 8
    reference = study.trials[run.user_attrs["reference_trial"]]
    assert {k: v for k, v in run.user_attrs["train"].items() if k != "seed"} == {
        k: v for k, v in reference.user_attrs["train"].items() if k != "seed"}
    assert run.user_attrs["train"]["batch_size"] == 4 and run.user_attrs["train"]["patch_size"] == 16
    assert run.user_attrs["charged_seconds"] > 0
    assert run.user_attrs["metrics"]["psnr"] > 20 and run.user_attrs["metrics"]["latency_ms"] > 0
    info = StudyInfo.from_study(study)
    data = pareto_plot_data(trials_table(study), info, "psnr", "latency_ms", [t.number for t in study.best_trials],
                            None, baseline_runs(study))
    assert [label.split(" (below")[0] for _, label in data.baselines] == ["RLFN (+bicubic skip)"]

    # the proxy-fidelity retrains: 2x the steps, the agreement equals scipy's on the stored values
    fidelity = optuna.load_study(study_name="m-fidelity", storage=storage)
    long_runs = sorted((t for t in fidelity.trials if t.state == TrialState.COMPLETE),
                       key=lambda t: t.user_attrs["source_trial"])
    assert len(long_runs) == 4 and all(t.user_attrs["steps_done"] == 16 for t in long_runs)
    report = fidelity_report(study)
    brief = [t.user_attrs["brief_metrics"]["psnr"] for t in long_runs]
    long = [t.user_attrs["metrics"]["psnr"] for t in long_runs]
    assert report.agreement.spearman == pytest.approx(sps.spearmanr(brief, long).statistic)
    assert report.agreement.kendall == pytest.approx(sps.kendalltau(brief, long).statistic)
    assert report.trusted is None and report.message.startswith("No verdict yet")  # 4 points: too few

    # the controlled ablation ran too, and the report has every section
    assert "m-ablation" in optuna.study.get_all_study_names(storage=storage)
    text = (out / "m" / "report.md").read_text()
    for heading in ("## Baselines", "### EHR-SR vs baselines", "## Proxy fidelity", "## Controlled ablation"):
        assert heading in text
    assert report.message in text and (out / "m" / "figures" / "fidelity.png").exists()
