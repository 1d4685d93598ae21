"""write_report: every file, non-empty figures, the observational numbers against trials.csv, and
studies with no finished trial or one objective."""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.image import imread

from ehrsr import MODULE_TOGGLES
from ehrsr.ablation import run_controlled_ablation
from ehrsr.deploy import DeviceProfile, pick_deployment
from ehrsr.reports import write_report
from tests.reports_study import make_study, synthetic_metrics

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

QUALITIES = ("psnr", "ssim", "lpips")
COSTS = ("latency", "macs", "params", "memory")


@dataclass
class Result:
    status: str
    reason: str | None
    metrics: dict[str, Any]
    values: list[float]
    seconds: dict[str, float]
    steps_done: int
    model: Any = None


def synthetic_runner(config, train, ctx, *, seed, on_rung=None):
    """``run_configuration``'s contract, with the test study's known metric model."""
    metrics = synthetic_metrics(config, random.Random(seed), lpips=True)
    return Result("complete", None, metrics, [metrics["psnr"], metrics["latency_ms"]], {"total": 1.0}, train.steps)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A constrained psnr/latency study with LPIPS, a controlled ablation and a deployment pick."""
    root = tmp_path_factory.mktemp("full")
    study = make_study(root, max_latency_ms=8.0, lpips=True, weights=True, n_trials=18)
    out = root / "report"
    ctx = SimpleNamespace(device="cpu")
    run_controlled_ablation(study, ctx, seeds=2, progress=False, runner=synthetic_runner)
    profile = DeviceProfile(name="test-cpu", kind="cpu", threads=1, input_size=(24, 24), warmup=1, repeats=3)
    pick_deployment(study, profile, out, weights_root=root, progress=False)
    report = write_report(study, out, quiet=True)
    return study, out, report


def test_every_file_exists_and_figures_are_real_images(full_report):
    _, out, report = full_report
    assert report == out / "report.md"
    expected = [
        "report.md", "trials.csv", "pareto.csv", "importance.csv",
        "ablation_observational.csv", "ablation_observational.md", "ablation_observational.tex",
        "ablation_controlled.csv", "ablation_controlled.md", "ablation_controlled.tex",
        "deploy/test-cpu.json", "deploy/test-cpu.safetensors",
        "figures/importance.png", "figures/importance.svg",
    ]
    expected += [f"figures/pareto_{q}_vs_{c}.{ext}" for q in QUALITIES for c in COSTS for ext in ("png", "svg")]
    for name in expected:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in out.glob("figures/*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        pixels = imread(png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05, f"{png} looks blank"
    for svg in out.glob("figures/*.svg"):
        text = svg.read_text()
        assert "<svg" in text and "</svg>" in text and len(text) > 10_000, svg


def test_observational_ablation_equals_pandas_on_trials_csv(full_report):
    study, out, _ = full_report
    trials = pd.read_csv(out / "trials.csv")
    table = pd.read_csv(out / "ablation_observational.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(table) == len(MODULE_TOGGLES) * 2  # every module x (psnr, latency)
    for _, row in table.iterrows():
        flags = done[f"config.{row['module']}.enabled"].astype(bool)
        column = {"psnr": "psnr", "latency": "latency_ms"}[row["objective"]]
        on, off = done.loc[flags, column], done.loc[~flags, column]
        best = (lambda s: s.max()) if row["objective"] == "psnr" else (lambda s: s.min())
        assert row["n_on"] == len(on) and row["n_off"] == len(off)
        assert row["n_on"] + row["n_off"] == len(done)
        for got, want in (
            (row["best_on"], best(on)), (row["best_off"], best(off)),
            (row["median_on"], on.median()), (row["median_off"], off.median()),
        ):
            assert got == pytest.approx(want, rel=1e-12, nan_ok=True)
    # finished trials of every kind are counted, the infeasible ones included (it is about modules)
    assert len(done) == len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_report_md_ties_everything_together(full_report):
    _, out, report = full_report
    text = report.read_text()
    for heading in (
        "## Summary", "## Pareto front", "## Ablation from the study (observational)", "## Parameter importance",
        "## Controlled ablation (what papers call an ablation)", "## Deployment picks", "## What to do next",
    ):
        assert heading in text
    assert "PSNR on Y channel (ITU-R BT.601, MATLAB rgb2ycbcr), crop_border=4" in text and "fvcore MACs" in text
    assert "`tiny`" in text and "trials=40" in text and "Test CPU" in text
    assert "max_latency_ms=8.0" in text
    # every figure it links exists
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == len(QUALITIES) * len(COSTS) + 1
    assert all((out / link).is_file() for link in links)
    # the Pareto table has one row per pareto.csv row, and marks the knee
    pareto = pd.read_csv(out / "pareto.csv")
    section = text[text.index("## Pareto front") : text.index("## Ablation from the study")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert len(rows) == len(pareto) + 1  # + the separator line
    knee = int(pareto.loc[pareto["knee"], "number"].iloc[0])
    assert any(line.startswith(f"| {knee} |") and "knee" in line for line in rows)
    # the deployment pick and the next step
    assert "[test-cpu](deploy/test-cpu.json)" in text
    assert "train it fully" in text
    # controlled ablation: the reference row and a leave-one-out row
    controlled = text[text.index("## Controlled ablation") : text.index("## Deployment picks")]
    assert "| reference | —" in controlled and "| baseline | reference |" in controlled
    # the verdict sentence and the minimum detectable effect (no per-image values here: per seed)
    assert "Modules that help PSNR:" in controlled and "Minimum detectable PSNR effect" in controlled


def test_latex_tables_are_booktabs(full_report):
    _, out, _ = full_report
    for name in ("ablation_controlled.tex", "ablation_observational.tex"):
        tex = (out / name).read_text()
        assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
        assert r"\begin{tabular}" in tex and r"\caption{" in tex
        body = tex[tex.index(r"\midrule") : tex.index(r"\bottomrule")]
        rows = [line for line in body.splitlines()[1:] if line.strip()]
        assert all(line.endswith(r"\\") for line in rows)
        columns = {line.count(" & ") for line in rows}
        assert len(columns) == 1  # every row has the header's columns
    controlled = (out / "ablation_controlled.tex").read_text()
    assert r"$\pm$" in controlled and r"$\Delta$ PSNR (dB) [95\% CI] & " in controlled
    assert r"$\Delta$ LPIPS [95\% CI] & verdict & " in controlled
    csv = pd.read_csv(out / "ablation_controlled.csv")
    assert {"variant", "vs", "delta_psnr_mean", "delta_psnr_std", "delta_psnr_low", "delta_psnr_high", "verdict",
            "mde_psnr", "delta_latency_ms_mean"} <= set(csv.columns)


def test_report_of_a_study_with_no_finished_trial(tmp_path):
    study = make_study(tmp_path, n_trials=6, finished=False)
    report = write_report(study, tmp_path / "out", quiet=True)
    text = report.read_text()
    assert "No trial has finished yet" in text and "Let the search run" in text
    assert not list((tmp_path / "out").glob("figures/pareto_*"))
    pareto = pd.read_csv(tmp_path / "out" / "pareto.csv")
    assert pareto.empty and "number" in pareto.columns
    observational = pd.read_csv(tmp_path / "out" / "ablation_observational.csv")
    assert (observational["n_on"] + observational["n_off"] == 0).all()
    assert "Not run yet" in text  # no controlled ablation


def test_report_of_a_single_objective_study(tmp_path):
    study = make_study(tmp_path, objectives=("psnr",), n_trials=10)
    report = write_report(study, tmp_path / "out", quiet=True)
    text = report.read_text()
    assert "maximize PSNR;" in text
    importance = pd.read_csv(tmp_path / "out" / "importance.csv", index_col=0)
    assert list(importance.columns) == ["psnr"]
    assert np.isclose(importance["psnr"].sum(), 1.0)
    # the costs are still plotted against PSNR although only PSNR was optimised
    assert (tmp_path / "out" / "figures" / "pareto_psnr_vs_latency.png").is_file()
