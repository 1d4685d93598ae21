"""Ablation deltas with intervals and verdicts, ``--ablation-seeds auto`` and the budget share as
a promise, driven by runner stand-ins that return hand-made per-image values (no training)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ehrsr import EHRSRConfig
from ehrsr.ablation import load_controlled_ablation, run_controlled_ablation
from ehrsr.ablation import runner as ablation_module
from ehrsr.ablation.table import delta_table
from ehrsr.cli import build_parser, main
from ehrsr.reports.render import controlled_rows, controlled_summary
from ehrsr.search.record import TrialOutcome, record_outcome
from ehrsr.stats import NO_EFFECT, paired_interval
from ehrsr.study_schema import PER_IMAGE_ATTR
from tests.test_reports_ablation import CTX, FakeResult, fake_metrics, reference_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

N_IMAGES = 18
# per-image PSNR gains of the modules: wab clearly helps, fsb a little, moe clearly
GAIN = {"wab": 0.30, "fsb": 0.05, "moe": 0.20}


def seed_shift(config: EHRSRConfig, seed: int) -> float:
    """A training-seed effect on every image of one run: only the wab-only configuration has it,
    +0.2 dB on even seeds, -0.2 dB on odd ones, so its comparison with the reference (-fsb) is
    -0.05 +- 0.2 per seed and never decided, while the others are."""
    return (0.2 if seed % 2 == 0 else -0.2) if config.enabled_modules() == ("wab",) else 0.0


def image_psnr(config: EHRSRConfig, seed: int) -> dict[str, list[float]]:
    """Hand-made per-image values: image difficulty + module gains + seed effect + 0.01 dB noise."""
    noise = random.Random(f"{config.to_json()}|{seed}")
    gains = sum(GAIN.get(m, 0.0) for m in config.enabled_modules())
    return {
        f"tile{i:02d}": [round(25.0 + 0.5 * i + gains + seed_shift(config, seed) + noise.gauss(0.0, 0.01), 4),
                         round(0.7 + 0.001 * i + gains / 100, 4)]
        for i in range(N_IMAGES)
    }


@dataclass
class PerImageRunner:
    """``run_configuration``'s contract with per-image values; the clock advances per run:
    ``overhead`` plus the training time (``train_times`` in order, else ``seconds_per_run``),
    training stopped at ``train_seconds`` when given (then the run is ``cut_short``)."""

    clock: list[float] | None = None
    seconds_per_run: float = 10.0
    train_times: list[float] = field(default_factory=list)
    overhead: float = 0.0
    calls: list[tuple[str, int, float | None]] = field(default_factory=list)

    def __call__(self, config, train, ctx, *, seed, on_rung=None, train_seconds=None):
        name = "+".join(config.enabled_modules()) or "conv-only"
        self.calls.append((name, seed, train_seconds))
        wanted = self.train_times[len(self.calls) - 1] if len(self.calls) <= len(self.train_times) else self.seconds_per_run
        trained = wanted if train_seconds is None else min(wanted, train_seconds)
        if self.clock is not None:
            self.clock[0] += trained + self.overhead
        seconds = {"train": trained, "eval": self.overhead, "total": trained + self.overhead}
        if train_seconds is not None and wanted > train_seconds:
            return FakeResult("cut_short", f"cut short at its {train_seconds:.3g} s deadline", {}, [], seconds, 2)
        per_image = image_psnr(config, seed)
        metrics = fake_metrics(config, seed)
        metrics["psnr"] = float(np.mean([v[0] for v in per_image.values()]))
        metrics["ssim"] = float(np.mean([v[1] for v in per_image.values()]))
        values = [metrics["psnr"], metrics["latency_ms"]]
        return FakeResult("complete", None, metrics, values, seconds, train.steps, per_image=per_image)


def seeds_run(runner: PerImageRunner) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, seed, _ in runner.calls:
        out.setdefault(name, []).append(seed)
    return out


# ---------------------------------------------------------------------------------------------
# per-image values: stored by the one recording path, paired into intervals


def test_record_outcome_stores_per_image_quality(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", directions=["maximize"])
    trial = study.ask()
    per_image = {"a": [30.1, 0.9], "b": [28.0, 0.8]}
    record_outcome(study, trial, TrialOutcome("complete", values=[29.0], metrics={}, per_image=per_image))
    assert study.trials[0].user_attrs[PER_IMAGE_ATTR] == per_image
    failed = study.ask()
    record_outcome(study, failed, TrialOutcome.failed("error", "boom", started=True))
    assert PER_IMAGE_ATTR not in study.trials[1].user_attrs


def test_controlled_table_intervals_verdicts_and_mde(tmp_path):
    study = reference_study(tmp_path)
    runner = PerImageRunner()
    result = run_controlled_ablation(study, CTX, seeds=2, progress=False, runner=runner)
    table = result.table.set_index("variant")
    configs = {v.name: v.config for v in result.variants}
    # every run stores its per-image values as the schema's attribute
    ablation = optuna.load_study(study_name=result.study_name, storage=study._storage)
    for trial in ablation.get_trials(states=(TrialState.COMPLETE,)):
        config = EHRSRConfig.from_dict(trial.user_attrs["config"])
        assert trial.user_attrs[PER_IMAGE_ATTR] == image_psnr(config, trial.user_attrs["seed"])
    # the interval is stats.paired_interval (default: pigeonhole bootstrap) of the (seed, image) deltas
    for name in ("-wab", "-fsb", "baseline", "+moe"):
        other = configs[table.at[name, "vs"]]
        deltas = [[a[0] - b[0] for a, b in zip(image_psnr(configs[name], s).values(), image_psnr(other, s).values())]
                  for s in (0, 1)]
        want = paired_interval(deltas)
        assert want.method == "bootstrap"
        assert table.at[name, "delta_psnr_low"] == pytest.approx(want.low)
        assert table.at[name, "delta_psnr_high"] == pytest.approx(want.high)
        assert table.at[name, "units_psnr"] == f"{2 * N_IMAGES} x seed x image"
        assert table.at[name, "mde_psnr"] > 0
    # verdicts (higher PSNR is better): leaving wab out hurts, adding moe helps, -fsb is undecided
    assert table.at["-wab", "verdict"] == "hurts" and table.at["-wab", "delta_psnr_high"] < 0
    assert table.at["baseline", "verdict"] == "hurts"
    assert table.at["+moe", "verdict"] == "helps" and table.at["+moe", "delta_psnr_low"] > 0
    assert table.at["-fsb", "verdict"] == NO_EFFECT
    assert table.at["-fsb", "delta_psnr_low"] < 0 < table.at["-fsb", "delta_psnr_high"]
    assert table.at["reference", "verdict"] == "n/a"
    # SSIM has its own interval and verdict; LPIPS (not measured) none
    assert table.at["+moe", "verdict_ssim"] == "helps"
    assert table.at["+moe", "verdict_lpips"] == "n/a"
    # the rendered table and the report's sentence
    headers, rows = controlled_rows(result.table)
    assert "Δ PSNR (dB) [95% CI]" in headers and "verdict" in headers
    row = dict(zip(headers, rows[list(table.index).index("+moe")]))
    assert row["verdict"] == "helps"
    assert row["Δ PSNR (dB) [95% CI]"] == (
        f"+{table.at['+moe', 'delta_psnr_mean']:.2f} [+{table.at['+moe', 'delta_psnr_low']:.2f}, "
        f"+{table.at['+moe', 'delta_psnr_high']:.2f}]"
    )
    summary = controlled_summary(result.table)
    # wab: -wab hurts and +wab (the same runs as -fsb, vs the baseline) helps -> wab helps;
    # fsb: -fsb undecided but +fsb (+0.05 dB on every image) helps -> fsb helps
    assert "Modules that help PSNR: fsb, moe, wab; that hurt: none; no detectable effect at this fidelity: none." in summary
    mde = result.table["mde_psnr"].dropna()
    assert f"median {np.median(mde):.3f} dB" in summary
    # rebuilt from storage alone, identically
    loaded, _ = load_controlled_ablation(study)
    assert loaded.set_index("variant").at["+moe", "delta_psnr_low"] == table.at["+moe", "delta_psnr_low"]


def test_summary_groups_modules_by_their_rows():
    import pandas as pd

    rows = [("leave-one-out", "a", "hurts"), ("add-one-in", "a", NO_EFFECT), ("leave-one-out", "b", "helps"),
            ("leave-one-out", "c", NO_EFFECT), ("add-one-in", "c", "n/a"), ("leave-one-out", "d", "hurts"),
            ("add-one-in", "d", "hurts"), ("baseline", None, "hurts")]
    table = pd.DataFrame([{"kind": k, "module": m, "verdict": v, "mde_psnr": math.nan} for k, m, v in rows])
    assert controlled_summary(table).startswith(
        "Modules that help PSNR: a; that hurt: b; no detectable effect at this fidelity: c; "
        "leave-one-out and add-one-in disagree: d. No minimum detectable effect"
    )


def test_runs_without_per_image_values_fall_back_to_seeds(tmp_path):
    from tests.test_reports_ablation import FakeRunner

    study = reference_study(tmp_path)
    one = run_controlled_ablation(study, CTX, seeds=1, progress=False, runner=FakeRunner())
    table = one.table.set_index("variant")
    # one seed, no per-image values: one unit, no interval
    assert table.at["-wab", "verdict"] == "n/a" and math.isnan(table.at["-wab", "delta_psnr_low"])
    assert table.at["-wab", "units_psnr"] == "1 x seed"
    headers, rows = controlled_rows(one.table)
    cell = dict(zip(headers, rows[list(table.index).index("-wab")]))["Δ PSNR (dB) [95% CI]"]
    assert cell.endswith("[n/a]")
    three = run_controlled_ablation(study, CTX, seeds=3, progress=False, runner=FakeRunner()).table.set_index("variant")
    assert three.at["-wab", "units_psnr"] == "3 x seed"
    runs = optuna.load_study(study_name="abl-ablation", storage=study._storage).trials
    psnr = {(t.user_attrs["variant"], t.user_attrs["seed"]): t.user_attrs["metrics"]["psnr"] for t in runs}
    deltas = [psnr[("-wab", s)] - psnr[("reference", s)] for s in range(3)]
    assert three.at["-wab", "delta_psnr_low"] == pytest.approx(paired_interval(deltas).low)


def test_delta_table_uses_common_finite_images():
    import pandas as pd

    mine = pd.DataFrame({"psnr": [30.0], "lpips": [0.2], "per_image": [{"a": [30.0, 0.9], "b": [None, 1.0], "c": [29.0, 0.8]}]},
                        index=[0])
    other = pd.DataFrame({"psnr": [29.0], "lpips": [0.3], "per_image": [{"a": [29.5, 0.9], "b": [28.0, 0.9], "c": [28.0, 0.7]}]},
                         index=[0])
    table, unit = delta_table(mine, other, "psnr", [0])
    assert unit == "seed x image" and table.tolist() == [[0.5, 1.0]]  # b (infinite PSNR) dropped
    table, unit = delta_table(mine, other, "ssim", [0])
    assert table.tolist() == [[pytest.approx(0.0), pytest.approx(0.1), pytest.approx(0.1)]]
    table, unit = delta_table(mine, other, "lpips", [0])  # not stored per image: per seed
    assert unit == "seed" and table.tolist() == [[pytest.approx(-0.1)]]


# ---------------------------------------------------------------------------------------------
# --ablation-seeds auto


def test_auto_seeds_continue_only_for_undecided_variants_up_to_the_max(tmp_path):
    study = reference_study(tmp_path)
    runner = PerImageRunner()
    result = run_controlled_ablation(study, CTX, progress=False, runner=runner)  # seeds="auto" by default
    assert result.seed_mode == "auto"
    by_config = seeds_run(runner)
    # -fsb (wab only vs the reference) stays undecided: both sides go to 6 seeds
    assert by_config["wab"] == by_config["wab+fsb"] == [0, 1, 2, 3, 4, 5]
    # every other configuration is only needed by decided variants: 2 seeds
    assert by_config["fsb"] == by_config["conv-only"] == by_config["moe"] == [0, 1]
    table = result.table.set_index("variant")
    assert table.at["-fsb", "n_paired"] == 6 and table.at["-fsb", "verdict"] == NO_EFFECT
    assert table.at["-wab", "n_paired"] == 2 and table.at["+moe", "n_paired"] == 2
    assert result.seed_plan is not None and result.seed_plan.at_max == ("-fsb",)
    assert result.seeds == [0, 1, 2, 3, 4, 5] and result.stopped is None
    assert result.runs_run == result.runs_planned == 10 + 4 * 2 == len(runner.calls)
    loaded, plan = load_controlled_ablation(study)
    assert plan["seed_mode"] == "auto" and plan["seeds"] == [0, 1, 2, 3, 4, 5]
    assert loaded.set_index("variant").at["-fsb", "n_paired"] == 6
    # resuming does nothing more
    runner.calls.clear()
    again = run_controlled_ablation(study, CTX, progress=False, runner=runner)
    assert runner.calls == [] and again.runs_run == 0


def test_auto_seeds_stop_when_the_budget_ends(tmp_path, monkeypatch):
    study = reference_study(tmp_path)
    clock = [0.0]
    monkeypatch.setattr(ablation_module, "_clock", lambda: clock[0])
    runner = PerImageRunner(clock=clock, seconds_per_run=10.0)
    # 10 runs of 10 s for 2 seeds, then -fsb's extra seed costs 2 runs (20 s): two rounds fit in 140 s
    result = run_controlled_ablation(study, CTX, budget_seconds=140.0, progress=False, runner=runner)
    assert seeds_run(runner)["wab"] == [0, 1, 2, 3]
    assert result.seconds_spent == pytest.approx(140.0)
    assert result.seed_plan.unaffordable == ("-fsb",)
    assert result.table.set_index("variant").at["-fsb", "n_paired"] == 4


def test_cli_ablation_seeds_accepts_auto_or_an_integer(capsys):
    parser = build_parser()["search"]
    assert parser.parse_args(["--budget", "trials=1"]).ablation_seeds == "auto"
    assert parser.parse_args(["--budget", "trials=1", "--ablation-seeds", "4"]).ablation_seeds == 4
    assert build_parser()["ablate"].parse_args(["--ablation-seeds", "AUTO"]).ablation_seeds == "auto"
    for bad in ("many", "0", "2.5"):
        assert main(["ablate", "--study-name", "x", "--ablation-seeds", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--ablation-seeds" in err


def test_ablation_seeds_setting_reaches_the_ablation(tmp_path, monkeypatch):
    """``--ablation-seeds`` reaches ``run_ablation`` from ``ablate`` and ``SearchSettings`` from
    the search (spies), and ``run_ablation`` hands it to ``run_controlled_ablation``."""
    import ehrsr.pipeline as pipeline

    seen = {}
    done = SimpleNamespace(reference_trial=0, runs_run=0, runs_skipped=0, runs_planned=0, stopped=None)

    def spy(study_name, storage, out_dir, *, seeds, **kwargs):
        seen["seeds"] = seeds
        return done

    monkeypatch.setattr(pipeline, "run_ablation", spy)
    for text, want in (("auto", "auto"), ("3", 3)):
        assert main(["ablate", "--study-name", "x", "--out-dir", str(tmp_path), "--ablation-seeds", text]) == 0
        assert seen["seeds"] == want

    def settings_spy(settings):
        seen["settings"] = settings
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", settings_spy)
    main(["--budget", "trials=1", "--out-dir", str(tmp_path), "--ablation-seeds", "5"])
    assert seen["settings"].ablation_seeds == 5
    main(["--budget", "trials=1", "--out-dir", str(tmp_path)])
    assert seen["settings"].ablation_seeds == "auto"

    # run_ablation -> run_controlled_ablation
    monkeypatch.undo()
    study = SimpleNamespace(user_attrs={})
    monkeypatch.setattr(pipeline, "load_study", lambda *a: (study, None, tmp_path))
    monkeypatch.setattr(pipeline, "_context_of", lambda *a: "ctx")
    monkeypatch.setattr(pipeline, "write_report", lambda *a, **k: None)

    def ablation_spy(study_arg, ctx, **kwargs):
        seen["kwargs"] = kwargs
        return done

    monkeypatch.setattr(pipeline, "run_controlled_ablation", ablation_spy)
    pipeline.run_ablation("x", None, tmp_path, device="cpu", reference=None, seeds="auto", budget_seconds=60.0,
                          lpips_weights=None, verbosity=0, steps=12, fidelity_note="as the test says")
    assert seen["kwargs"]["seeds"] == "auto" and seen["kwargs"]["budget_seconds"] == 60.0
    assert (seen["kwargs"]["steps"], seen["kwargs"]["fidelity_note"]) == (12, "as the test says")


# ---------------------------------------------------------------------------------------------
# the budget share is a promise


MARGIN = 0.05  # ablation_module.OVERRUN_MARGIN_FRACTION, asserted separately below


def test_slow_runs_neither_start_nor_overrun_the_share(tmp_path, monkeypatch):
    study = reference_study(tmp_path, charged_seconds=15.0)
    clock = [0.0]
    monkeypatch.setattr(ablation_module, "_clock", lambda: clock[0])
    # the machine gets busy: training takes 8 s, then 18 s, then 80 s (2 s of evaluation each)
    runner = PerImageRunner(clock=clock, train_times=[8.0, 18.0, 80.0], overhead=2.0)
    result = run_controlled_ablation(study, CTX, seeds=2, budget_seconds=90.0, progress=False, runner=runner)
    assert ablation_module.OVERRUN_MARGIN_FRACTION == MARGIN
    assert result.seconds_spent <= 90.0 * (1 + MARGIN)
    # each run's training got the rest of the share minus the largest evaluation seen; the third
    # (90 - 30 - 2 s) hit that deadline
    # (no run yet: the reference trial records no evaluation time, so the first gets all 90 s)
    assert [deadline for *_, deadline in runner.calls] == [pytest.approx(90.0), pytest.approx(78.0),
                                                             pytest.approx(58.0)]
    assert len(runner.calls) == 3 and "cut short" in result.stopped
    ablation = optuna.load_study(study_name=result.study_name, storage=study._storage)
    cut = [t for t in ablation.trials if t.user_attrs["status"] == "cut_short"]
    assert len(cut) == 1 and cut[0].state == TrialState.FAIL
    # the cut-short run is left out of the deltas and said so
    table = result.table.set_index("variant")
    name = cut[0].user_attrs["variant"]
    assert table.at[name, "n_complete"] == 0 and table.at[name, "n_cut_short"] == 1
    assert "cut short by the budget, left out" in table.at[name, "note"]
    assert "cut short by the ablation budget" in controlled_summary(result.table)
    # with a larger share, a resume retries the cut-short run
    runner.calls.clear()
    more = run_controlled_ablation(study, CTX, seeds=2, budget_seconds=500.0, progress=False, runner=runner)
    assert name == "-wab" and more.table.set_index("variant").at[name, "n_complete"] == 2
    assert more.table.set_index("variant").at[name, "n_cut_short"] == 0


def test_next_run_is_not_started_when_the_slowest_run_so_far_would_overrun(tmp_path, monkeypatch):
    study = reference_study(tmp_path, charged_seconds=15.0)
    clock = [0.0]
    monkeypatch.setattr(ablation_module, "_clock", lambda: clock[0])
    # 10 s, then 40 s, then 10 s runs: after 50 s spent, a median estimate (25 s) would start a
    # run with 40 s left; the slowest run so far (40 s) says it may not fit in 85 s
    runner = PerImageRunner(clock=clock, train_times=[10.0, 40.0], seconds_per_run=10.0)
    result = run_controlled_ablation(study, CTX, seeds=2, budget_seconds=85.0, progress=False, runner=runner)
    assert len(runner.calls) == 2 and result.seconds_spent == pytest.approx(50.0)
    assert "needs about 40 s" in result.stopped
