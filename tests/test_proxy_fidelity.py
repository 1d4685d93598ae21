"""Ranking proxies and proxy fidelity: learning-curve fits, scoring, the space's measured agreement,
the study's checks and what they do (docs/proxy_fidelity.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import ehrsr.ablation.fidelity as fidelity_module
import ehrsr.pipeline as pipeline
from ehrsr.ablation.fidelity import CheckPlan, ablation_fidelity, plan_check
from ehrsr.cli import main
from ehrsr.search.ranking import (
    LearningCurve,
    RetrainPoint,
    extrapolated_psnr,
    final_psnr,
    fit_learning_curve,
    loss_sum,
    retrain_check,
    start_check,
)
from ehrsr.search.runner import RunResult
from ehrsr.search.space import SearchSpaceError, space_from_text
from ehrsr.stats import ranking_quality
from ehrsr.study_schema import TRIAL, FidelityCheck, fidelity_checks, steps_scale
from tests.reports_study import make_study, study_record

MICRO = Path(__file__).parent / "fixtures" / "micro.yaml"
BENCHMARK_DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "proxy_fidelity"


# ---------------------------------------------------------------------------------------------
# scores of a run


@pytest.mark.parametrize(("model", "a", "b", "c"), [("pow3", 29.8, 3.0, 0.6), ("exp3", 29.6, 0.7, 0.004)])
def test_learning_curve_fits_return_the_parameters_of_synthetic_curves(model, a, b, c) -> None:
    steps = np.arange(12, 1000, 12, dtype=float)
    values = a - b * (steps ** -c if model == "pow3" else np.exp(-c * steps))
    fit = fit_learning_curve(steps, values, model)
    assert fit.a == pytest.approx(a, rel=1e-4) and fit.b == pytest.approx(b, rel=1e-3)
    assert fit.c == pytest.approx(c, rel=1e-3) and fit.rmse < 1e-6
    assert fit(5000) == pytest.approx(a - b * (5000.0 ** -c if model == "pow3" else math.exp(-c * 5000)), abs=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        fit_learning_curve([1, 2], [1.0, 2.0], model)


def test_scores_of_a_recorded_curve() -> None:
    curve = LearningCurve.from_lists([(12, 28.0), (24, 28.5), (36, 28.8)], [(10, 0.08), (20, 0.06), (30, 0.05), (36, 0.04)], 36)
    assert final_psnr(curve) == 28.8
    # the last half (steps 18..36): 2 steps at 0.06, 10 at 0.05, 6 at 0.04
    assert loss_sum(curve, 0.5) == pytest.approx(-(2 * 0.06 + 10 * 0.05 + 6 * 0.04) / 18)
    assert extrapolated_psnr(curve, 72) > 28.8  # a rising curve keeps rising
    with pytest.raises(KeyError, match="no validation PSNR recorded at step 30"):
        curve.psnr_at(30)


def test_ranking_quality_regret_and_top_k_recall() -> None:
    reference = [30.0, 29.0, 31.0, 28.0, 30.5]
    same = ranking_quality(reference, reference, k=3)
    assert same.agreement.kendall == pytest.approx(1.0) and same.regret == 0.0 and same.top_k_recall == 1.0
    reverse = ranking_quality([-v for v in reference], reference, k=3)
    assert reverse.agreement.kendall == pytest.approx(-1.0)
    assert reverse.regret == pytest.approx(31.0 - 28.0) and reverse.top_k_recall == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# the space's measured agreement

PROXY = """
proxy:
  kendall: [0.82, 0.61, 0.95]
  spearman: [0.93, 0.78, 0.99]
  configurations: 18
  regret_db: 0.0
  top3_recall: 0.67
  measured_on: {task: sr, scale: 4, data: builtin}
  trial: {max_steps: 8, batch_size: 4, patch_size: 16, lr: 2.0e-3}
  reference: "2400 steps as train --pick trains"
"""
# micro.yaml searches lr; the measured protocol fixes it
MICRO_FIXED_LR = MICRO.read_text().replace("lr: {low: 1.0e-3, high: 3.0e-3, log: true}", "lr: 2.0e-3")


def test_a_space_carries_its_measured_proxy_agreement_and_a_study_starts_with_it() -> None:
    space = space_from_text(MICRO_FIXED_LR + PROXY, name="micro")
    assert space.proxy is not None and space.proxy.trusted and space.proxy.configurations == 18
    record = study_record(("psnr", "latency"))
    check, scale = start_check(space, record)
    assert check is not None and check.trusted and check.source == "space" and scale == 1
    assert check.trial_steps == space.fidelity.max_steps and check.kendall_low == 0.61
    # other data, another task: the measurement does not apply
    other = study_record(("psnr", "latency"), scale=2)
    assert start_check(space, other) == (None, 1)
    # a measured agreement that is not trusted raises the steps before the first trial
    weak = space_from_text(MICRO_FIXED_LR + PROXY.replace("[0.82, 0.61, 0.95]", "[0.30, -0.10, 0.62]"))
    check, scale = start_check(weak, record)
    assert check.trusted is False and scale == weak.fidelity.eta and "raised from 8 to 16" in check.action


@pytest.mark.parametrize(("section", "message"), [
    ("proxy: {kendall: [0.9, 0.95, 0.99]}", "missing 'spearman'"),
    (PROXY.replace("[0.82, 0.61, 0.95]", "[0.82, 0.9, 0.95]"), "low <= value <= high"),
    (PROXY.replace("configurations: 18", "configurations: 3"), "integer >= 4"),
    (PROXY + "  extra: 1\n", "unknown key"),
    (PROXY.replace("batch_size: 4,", "batch_size: 0,"), r"proxy\.trial\.batch_size: must be a positive integer"),
])
def test_a_malformed_proxy_section_names_the_key(section: str, message: str) -> None:
    with pytest.raises(SearchSpaceError, match=message):
        space_from_text(MICRO_FIXED_LR + "\n" + section, name="micro")


@pytest.mark.parametrize(("text", "difference"), [
    (MICRO.read_text(), "lr searched (measured fixed at 0.002)"),
    (MICRO_FIXED_LR.replace("max_steps: 8", "max_steps: 16"), "max_steps 16 (measured at 8)"),
    (MICRO_FIXED_LR.replace("lr: 2.0e-3", "lr: 1.0e-3"), "lr 0.001 (measured at 0.002)"),
])
def test_an_agreement_measured_on_another_trial_protocol_is_refused(text: str, difference: str) -> None:
    with pytest.raises(SearchSpaceError, match="measured on another trial protocol") as info:
        space_from_text(text + PROXY, name="micro")
    assert difference in str(info.value)


def test_the_shipped_tiny_space_states_its_measured_agreement() -> None:
    from ehrsr.search.space import load_space

    proxy = load_space("tiny").proxy
    assert proxy is not None and proxy.data == "builtin" and proxy.scale == 4 and proxy.configurations >= 16
    table = json.loads((BENCHMARK_DATA / "table.json").read_text())
    default = next(row for row in table["rows"] if row["proxy"] == table["default"])
    assert (proxy.kendall, proxy.kendall_low, proxy.kendall_high) == pytest.approx(
        (default["kendall"], default["kendall_low"], default["kendall_high"]), abs=0.005)


# ---------------------------------------------------------------------------------------------
# the study's own checks


def _points(brief: list[float], long: list[float]) -> list[RetrainPoint]:
    return [RetrainPoint(i, b, lo, 36, 4.0) for i, (b, lo) in enumerate(zip(brief, long))]


def test_retrain_verdicts() -> None:
    brief = [28.0, 28.1, 28.2, 28.3, 28.4, 28.5, 28.6, 28.7]
    agreeing = retrain_check(_points(brief, [b + 1 for b in brief]), when="early", trial_steps=36)
    assert agreeing.trusted is True and agreeing.kendall == pytest.approx(1.0) and agreeing.factor == 4.0
    reverse = retrain_check(_points(brief, [40 - b for b in brief]), when="early", trial_steps=36)
    assert reverse.trusted is False and reverse.kendall == pytest.approx(-1.0)
    few = retrain_check(_points(brief[:5], brief[:5]), when="end", trial_steps=36)
    assert few.trusted is None and "too few" in few.note


def test_a_check_is_sized_to_the_seconds_it_is_given(tmp_path) -> None:
    study = make_study(tmp_path, n_trials=24)  # complete trials charged about 15 s each
    charges = sorted(float(t.user_attrs[TRIAL.charged_seconds]) for t in study.trials
                     if t.state == TrialState.COMPLETE and t.user_attrs.get(TRIAL.charged_seconds))
    trial = float(np.median(charges))
    assert plan_check(study, None, 8, 4.0) == CheckPlan(8, 4.0, "as asked")
    assert plan_check(study, 8 * 4.0 * trial + 1, 8, 4.0).configs == 8
    fewer = plan_check(study, 6 * 4.0 * trial + 1, 8, 4.0)
    assert (fewer.configs, fewer.factor) == (6, 4.0)
    shorter = plan_check(study, 6 * 2.0 * trial + 1, 8, 4.0)
    assert shorter.factor == 2.0 and shorter.configs >= 6


def _planted_reverse_runner(config, train, ctx, seed=0):
    """A long retrain that ranks configurations in reverse of their brief PSNR: the study's own
    brief PSNR of the configuration, negated, as the 'long' PSNR."""
    brief = _BRIEF[json.dumps(config.to_dict(), sort_keys=True)]
    metrics = {"psnr": 100.0 - brief, "latency_ms": 1.0, "ssim": 0.5}
    return RunResult("complete", None, metrics, [metrics[o.metric_key] for o in ctx.objectives],
                     {"total": 0.01}, train.steps)


_BRIEF: dict[str, float] = {}


@pytest.mark.slow
def test_a_study_whose_early_check_fails_raises_its_steps(tmp_path: Path, monkeypatch, capsys) -> None:
    """A planted proxy: the long retrains rank the configurations in reverse. The part-way check
    finds a negative tau, says so in one line, stores it, and the trials after it train eta times longer."""
    real_run_fidelity = fidelity_module.run_fidelity

    def planted(study, ctx, **kwargs):
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            _BRIEF[json.dumps(t.user_attrs[TRIAL.config], sort_keys=True)] = t.user_attrs[TRIAL.metrics]["psnr"]
        return real_run_fidelity(study, ctx, **{**kwargs, "runner": _planted_reverse_runner})

    monkeypatch.setattr(fidelity_module, "run_fidelity", planted)
    monkeypatch.setattr(fidelity_module, "plan_check", lambda study, seconds, configs, factor: CheckPlan(8, 2.0, "test"))
    # the share's seconds on a loaded machine would decide how many retrains fit: this test is
    # about the verdict and the action (plan_check is tested above)
    monkeypatch.setattr(pipeline, "share_seconds", lambda *a: 1e6)
    out = tmp_path / "reports"
    code = main(["--space", str(MICRO), "--budget", "trials=18", "--out-dir", str(out), "--study-name", "planted",
                 "--no-early-stopping", "--allow-repeats", "--ablation-share", "0", "--baselines", "none",
                 "--fidelity-share", "0.5", "--fidelity-configs", "8", "--no-report", "--profile-size", "32",
                 "--cache-dir", str(tmp_path / "cache")])
    text = capsys.readouterr().out
    assert code == 0
    study = optuna.load_study(study_name="planted", storage=f"sqlite:///{out / 'planted' / 'study.db'}")
    checks = fidelity_checks(study)
    early = [c for c in checks if c.when == "early"]
    # reversed (a configuration trained twice shares one planted long value, so not exactly -1)
    assert len(early) == 1 and early[0].trusted is False and early[0].kendall < -0.5
    assert early[0].action is not None and "raised from 8 to 16" in early[0].action
    assert "proxy fidelity (early): not trusted" in text and "raised from 8 to 16" in text
    assert steps_scale(study) == 2  # micro.yaml's eta
    steps = [t.user_attrs[TRIAL.train]["steps"] for t in sorted(study.trials, key=lambda t: t.number)
             if TRIAL.train in t.user_attrs]
    assert steps[0] == 8 and steps[-1] == 16 and sorted(steps) == steps  # raised once, for the later trials
    # fronts compare trials of one length only: the trials after the check
    from ehrsr.search.pareto import comparable_trials, front_trials

    assert {t.user_attrs[TRIAL.train]["steps"] for t in comparable_trials(study)} == {16}
    assert all(t.user_attrs[TRIAL.train]["steps"] == 16 for t in front_trials(study))


def test_the_ablation_trains_at_the_checked_fidelity(tmp_path: Path, monkeypatch) -> None:
    """Not trusted: the ablation's variants train factor x the trials' steps, one seed each; the
    steps reach ``ehrsr.training.train`` (a spy there)."""
    import ehrsr.training

    study = make_study(tmp_path, n_trials=12)
    study.set_user_attr("fidelity_checks", [FidelityCheck(
        "end", "retrains", 180, 0.2, -0.3, 0.6, 0.3, 8, 4.0, False).to_dict()])
    plan = ablation_fidelity(study, 4.0, "auto")
    assert plan.steps == 720 and plan.seeds == 1 and "not shown to hold" in plan.note
    trusted = FidelityCheck("end", "retrains", 180, 0.9, 0.7, 1.0, 0.95, 8, 4.0, True).to_dict()
    study.set_user_attr("fidelity_checks", [trusted])
    assert ablation_fidelity(study, 4.0, "auto").steps is None  # the trials' own steps
    study.set_user_attr("fidelity_checks", [])

    seen: list[int] = []

    class Stop(Exception):
        pass

    def spy(model, train_set, settings, **kwargs):
        seen.append(settings.steps)
        raise Stop  # the steps are what this test is about: no need to train them

    monkeypatch.setattr(ehrsr.training, "train", spy)
    monkeypatch.setattr(pipeline, "_context_of", lambda *a: _tiny_context())
    monkeypatch.setattr(pipeline, "refresh_report", lambda *a: None)
    pipeline.run_ablation("demo", f"sqlite:///{tmp_path / 'study.db'}", tmp_path, device="cpu", reference=None,
                          budget_seconds=None, lpips_weights=None, verbosity=0)
    assert seen and set(seen) == {720}
    ablation = optuna.load_study(study_name="demo-ablation", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert "not shown to hold" in ablation.user_attrs["plan"]["fidelity"]
    assert ablation.user_attrs["plan"]["seeds"] == [0]


def test_a_check_without_a_verdict_does_not_undo_an_earlier_one(tmp_path: Path) -> None:
    from ehrsr.search.ranking import study_verdict

    study = make_study(tmp_path, n_trials=12)
    trusted = FidelityCheck("start", "space", 180, 0.87, 0.69, 0.97, 0.96, 18, None, True)
    undecided = FidelityCheck("end", "retrains", 180, None, None, None, None, 2, 4.0, None, note="2 of 8 retrains")
    assert study_verdict([trusted, undecided]) == trusted and study_verdict([undecided]) == undecided
    assert study_verdict([]) is None
    study.set_user_attr("fidelity_checks", [trusted.to_dict(), undecided.to_dict()])
    assert ablation_fidelity(study, 4.0, "auto").steps is None  # the trials' own steps: the start verdict holds


def test_where_the_spaces_measurement_stands_the_share_goes_to_the_ablation(tmp_path: Path, monkeypatch) -> None:
    """A study on the benchmark's task, data and trial protocol: no retrains at the end (a spy
    would see them), the verdict at the end is the space's, and its share is handed on."""
    study = make_study(tmp_path, n_trials=12)
    start = FidelityCheck("start", "space", 180, 0.87, 0.69, 0.97, 0.96, 18, None, True)
    study.set_user_attr("fidelity_checks", [start.to_dict()])
    monkeypatch.setattr(pipeline, "check_now", lambda *a, **k: pytest.fail("retrained"))
    lines: list[str] = []
    settings = SimpleNamespace(fidelity_share=0.1)
    spare = pipeline._fidelity_step(study, SimpleNamespace(), settings, lines.append, lambda: None)
    assert spare == 0.1
    checks = fidelity_checks(study)
    assert [c.when for c in checks] == ["start", "end"] and checks[-1].source == "space" and checks[-1].trusted
    assert "no retrains" in lines[0] and "+0.87 [+0.69, +0.97]" in lines[0]
    # raised steps: the trials no longer train the measured protocol, so the study checks its own
    study.set_user_attr("steps_scale", 3)
    study.set_user_attr("fidelity_checks", [start.to_dict()])
    seen: list[str] = []
    monkeypatch.setattr(pipeline, "check_now", lambda *a, **k: seen.append(k["when"]) or FidelityCheck(
        "end", "retrains", 540, None, None, None, None, 0, 4.0, None))
    monkeypatch.setattr(pipeline, "fidelity_sources", lambda *a: [])
    prepared = SimpleNamespace(budget=SimpleNamespace(limits=[SimpleNamespace(seconds=600.0)]),
                               space=SimpleNamespace(fidelity=SimpleNamespace(eta=3)))
    settings = SimpleNamespace(fidelity_share=0.1, reserved_share=0.35, fidelity_configs=8, fidelity_factor=4.0,
                               verbosity=0)
    assert pipeline._fidelity_step(study, prepared, settings, lines.append, lambda: None) == 0.0 and seen == ["end"]


def _tiny_context():
    from ehrsr.search.runner import RunContext
    from ehrsr.study_schema import resolve_objective

    return RunContext(train_set=SimpleNamespace(), val_set=[], objectives=[resolve_objective("psnr"),
                                                                           resolve_objective("latency")],
                      profile_shape=(1, 3, 16, 16), profile_seconds=0.001)


def test_the_scoring_code_reproduces_the_stored_table() -> None:
    """Re-scoring the stored curves gives the stored table (the default proxy, the 108-step trial and a
    zero-cost count), to the last digit: the table in docs/proxy_fidelity.md is what the code computes."""
    from benchmarks import proxy_fidelity

    table = json.loads((BENCHMARK_DATA / "table.json").read_text())
    names = [table["default"], "s108-drawn-lr: final PSNR", "MACs (no training)"]
    rows = {row["proxy"]: row for row in proxy_fidelity.score(BENCHMARK_DATA, only=names,
                                                                resamples=table["resamples"])}
    stored = {row["proxy"]: row for row in table["rows"]}
    for name in names:
        for key in ("kendall", "kendall_low", "kendall_high", "spearman", "spearman_low", "spearman_high",
                    "regret_db", "top_k_recall", "multiple", "n"):
            assert rows[name][key] == pytest.approx(stored[name][key], abs=1e-9), (name, key)
    assert rows[table["default"]]["n"] == table["configurations"] >= 16
    assert proxy_fidelity.choose_default(table["rows"])["proxy"] == table["default"]


def test_the_report_says_why_a_study_retrained_nothing() -> None:
    from ehrsr.reports.fidelity import fidelity_markdown
    from ehrsr.reports.render import markdown_table

    space = FidelityCheck("end", "space", 972, 0.87, 0.69, 0.97, 0.96, 18, None, True)
    assert "No retrains in this study" in fidelity_markdown(None, "s", None, markdown_table, checks=[space])
    assert fidelity_markdown(None, "s", None, markdown_table, checks=[]).startswith("Not run.")
