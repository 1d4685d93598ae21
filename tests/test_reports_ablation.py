"""Ablation tables: variant construction, the controlled table's maths, resume and budget (with a
fake runner whose results are a known function of configuration and seed), and importance."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from ehrsr import EHRSRConfig
from ehrsr.ablation import AblationError, build_variants, load_controlled_ablation, run_controlled_ablation
from ehrsr.ablation import runner as ablation_module
from ehrsr.reports import param_importances
from ehrsr.search.space import space_from_text
from ehrsr.training import TrainSettings
from tests.reports_study import make_study, study_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# A small space: three switchable modules (wab, fsb, moe); ssm, repmix and noise stay off.
SPACE_YAML = """\
description: controlled-ablation test space
model:
  width: {choices: [8, 16]}
  msg.levels: 1
  trunk_blocks: 1
  wab.enabled: {choices: [false, true]}
  wab.window_size: 4
  wab.heads: {choices: [1, 2]}
  fsb.enabled: {choices: [false, true]}
  fsb.cutoff: {low: 0.1, high: 0.5, step: 0.05}
  moe.enabled: {choices: [false, true]}
  moe.n_experts: {low: 2, high: 4}
  moe.top_k: {choices: [1, 2]}
training:
  patch_size: 16
  batch_size: 2
  lr: {low: 2.0e-4, high: 2.0e-3, log: true}
  loss: l1
  min_steps: 2
  eta: 3
  max_steps: 6
  seconds_per_trial_estimate: 5
"""

REFERENCE = EHRSRConfig.from_dict(
    {"width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1,
     "wab": {"enabled": True, "window_size": 4, "heads": 2}, "fsb": {"enabled": True, "cutoff": 0.3}}
)
GAIN = {"wab": 0.30, "fsb": 0.10, "moe": 0.15}
LATENCY = {"wab": 2.0, "fsb": 1.0, "moe": 1.5}


def fake_psnr(config: EHRSRConfig, seed: int) -> float:
    """Known PSNR: module gains plus noise fixed by (configuration, seed)."""
    noise = random.Random(f"{config.to_json()}|{seed}").gauss(0.0, 0.05)
    return 27.0 + sum(GAIN.get(m, 0.0) for m in config.enabled_modules()) + noise


def fake_metrics(config: EHRSRConfig, seed: int) -> dict[str, Any]:
    psnr = fake_psnr(config, seed)
    on = config.enabled_modules()
    latency = 3.0 + sum(LATENCY.get(m, 0.0) for m in on) + 0.01 * seed  # a little timing noise
    return {
        "psnr": psnr, "ssim": 0.7 + (psnr - 27) / 40, "lpips": None, "latency_ms": latency,
        "latency_ms_p10": latency, "latency_ms_p90": latency, "macs": 1_000_000 * (1 + len(on)),
        "macs_ptflops": 1_000_000 * (1 + len(on)), "params": 10_000 + 3000 * len(on),
        "params_deploy": 10_000 + 2500 * len(on), "peak_memory_mb": 4.0 + len(on),
    }


@dataclass
class FakeResult:
    status: str
    reason: str | None
    metrics: dict[str, Any]
    values: list[float]
    seconds: dict[str, float]
    steps_done: int
    model: Any = None
    per_image: dict[str, list[float]] | None = None


@dataclass
class FakeRunner:
    """``run_configuration``'s contract; records its calls; optionally diverges or raises."""

    diverge: set[tuple[str, int]] = field(default_factory=set)  # (module set key, seed)
    raise_once: set[tuple[str, int]] = field(default_factory=set)
    clock: list[float] | None = None  # advanced by seconds_per_run per call (drives the budget)
    seconds_per_run: float = 10.0
    calls: list[tuple[EHRSRConfig, int, TrainSettings, int]] = field(default_factory=list)

    def __call__(self, config, train, ctx, *, seed, on_rung=None, train_seconds=None):
        assert isinstance(train, TrainSettings)
        steps = train.steps
        self.calls.append((config, seed, train, steps))
        if self.clock is not None:
            self.clock[0] += self.seconds_per_run
        key = ("+".join(config.enabled_modules()) or "conv-only", seed)
        if key in self.raise_once:
            self.raise_once.discard(key)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        metrics = fake_metrics(config, seed)
        if key in self.diverge:
            return FakeResult("diverged", "loss became NaN at step 3", {}, [], {"train": 1.0}, 3)
        values = [metrics["psnr"], metrics["latency_ms"]]
        return FakeResult("complete", None, metrics, values, {"train": 1.0, "eval": 0.5, "total": 1.5}, steps)


def reference_study(tmp_path, *, charged_seconds: float = 15.0) -> optuna.Study:
    """A psnr/latency study holding one finished trial (number 0) with the REFERENCE config."""
    storage = f"sqlite:///{tmp_path / 'ablation.db'}"
    study = optuna.create_study(study_name="abl", storage=storage, directions=["maximize", "minimize"])
    attrs = study_attrs(("psnr", "latency"))
    attrs["space"] = {"name": "ablate-test", "path": None, "yaml": SPACE_YAML}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    metrics = fake_metrics(REFERENCE, 0)
    user_attrs = {
        "config": REFERENCE.to_dict(), "metrics": metrics, "status": "complete", "charged_seconds": charged_seconds,
        "train": {"lr": 1e-3, "steps": 6, "batch_size": 2, "patch_size": 16, "loss": "l1", "seed": 0},
    }
    study.add_trial(optuna.trial.create_trial(values=[metrics["psnr"], metrics["latency_ms"]], user_attrs=user_attrs))
    pruned = {"status": "pruned", "config": REFERENCE.to_dict()}
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=pruned))
    return study


def subdir(root, name):
    path = root / name
    path.mkdir()
    return path


CTX = SimpleNamespace(device="cpu", objectives=("psnr", "latency"))


# ---------------------------------------------------------------------------------------------
# variants


def test_build_variants_leave_one_out_and_add_one_in():
    space = space_from_text(SPACE_YAML, name="ablate-test")
    middle = space.config_from_params(space.reference_params()["all-modules"], scale=4).config
    settings = {m: middle.to_dict()[m] for m in ("wab", "fsb", "moe")}
    variants = build_variants(REFERENCE, ["wab", "fsb", "moe"], settings)
    names = [v.name for v in variants]
    assert names == ["reference", "baseline", "-wab", "-fsb", "+wab", "+fsb", "+moe"]
    by_name = {v.name: v for v in variants}
    baseline = by_name["baseline"].config
    assert baseline.enabled_modules() == ()
    # the baseline is the reference with every module off, nothing else changed
    assert baseline.replace(wab={"enabled": True}, fsb={"enabled": True}) == REFERENCE
    assert by_name["-wab"].config.enabled_modules() == ("fsb",)
    assert by_name["-fsb"].config.enabled_modules() == ("wab",)
    # add-one-in uses the reference's own settings for modules it has ...
    assert by_name["+wab"].config.wab == REFERENCE.wab
    assert by_name["+fsb"].config.fsb.cutoff == 0.3
    # ... and the space's middle values for the others
    assert by_name["+moe"].config.moe == middle.moe
    assert by_name["+moe"].config.enabled_modules() == ("moe",)
    assert [v.compare_to for v in variants] == [None, "reference", "reference", "reference", "baseline", "baseline", "baseline"]
    # with two modules, leaving one out is adding the other one in: those runs are shared
    assert by_name["+fsb"].same_as == "-wab" and by_name["+wab"].same_as == "-fsb"
    assert [v.name for v in variants if v.runnable] == ["reference", "baseline", "-wab", "-fsb", "+moe"]


def test_build_variants_shares_identical_configurations_and_reports_invalid_ones():
    one = REFERENCE.replace(fsb={"enabled": False})  # only wab on
    variants = {v.name: v for v in build_variants(one, ["wab", "moe"], {})}
    # -wab is the baseline, +wab is the reference: their runs are shared, never repeated
    assert variants["-wab"].same_as == "baseline" and not variants["-wab"].runnable
    assert variants["+wab"].same_as == "reference"
    # no settings from the space: the reference's own (switched-off) moe section, here the defaults
    assert variants["+moe"].config.moe == EHRSRConfig().moe.__class__(enabled=True)
    # a conv-only reference: the baseline is the reference itself
    conv = REFERENCE.replace(wab={"enabled": False}, fsb={"enabled": False})
    variants = {v.name: v for v in build_variants(conv, ["wab"], {})}
    assert variants["baseline"].same_as == "reference"
    assert not [v for v in variants.values() if v.kind == "leave-one-out"]
    # the space's settings do not fit this width (4 heads, 6 channels): the reference's own wab
    # section (3 heads) is used instead
    narrow = EHRSRConfig.from_dict({"width": 6, "msg": {"levels": 0, "depths": []}, "wab": {"heads": 3}})
    variants = {v.name: v for v in build_variants(narrow, ["wab"], {"wab": {"heads": 4}})}
    assert variants["+wab"].config.wab.heads == 3 and variants["+wab"].config.wab.enabled
    with pytest.raises(ValueError, match="unknown modules"):
        build_variants(REFERENCE, ["attention"], {})


# ---------------------------------------------------------------------------------------------
# running, the table, resume, budget


def expected_delta(variant: EHRSRConfig, other: EHRSRConfig, seeds: list[int]) -> tuple[float, float]:
    diffs = [fake_psnr(variant, s) - fake_psnr(other, s) for s in seeds]
    return float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan


def test_controlled_ablation_table_and_storage(tmp_path):
    study = reference_study(tmp_path)
    runner = FakeRunner()
    result = run_controlled_ablation(study, CTX, seeds=2, progress=False, runner=runner)
    assert result.reference_trial == 0  # the only finished trial is the knee
    # 7 variants, 5 distinct configurations (+fsb is -wab, +wab is -fsb), 2 seeds each
    assert result.runs_planned == 10 and result.runs_run == 10 and result.runs_skipped == 0
    assert result.stopped is None
    # seed-major order: every variant's seed 0 before any seed 1; full fidelity steps; seed in train
    assert [seed for _, seed, _, _ in runner.calls] == [0] * 5 + [1] * 5
    reference_train = TrainSettings(steps=6, lr=1e-3, batch_size=2, patch_size=16, loss="l1")
    assert all(train == reference_train for _, _, train, _ in runner.calls)  # the reference's settings
    stored = optuna.load_study(study_name=result.study_name, storage=study._storage).get_trials()
    assert all(t.user_attrs["train"] == {**dataclasses.asdict(reference_train), "seed": t.user_attrs["seed"]}
               for t in stored)

    table = result.table.set_index("variant")
    variants = {v.name: v.config for v in result.variants}
    for name, other in (("-wab", "reference"), ("-fsb", "reference"), ("baseline", "reference"),
                        ("+wab", "baseline"), ("+fsb", "baseline"), ("+moe", "baseline")):
        mean, std = expected_delta(variants[name], variants[other], [0, 1])
        assert table.at[name, "vs"] == other
        assert table.at[name, "delta_psnr_mean"] == pytest.approx(mean, abs=1e-12)
        assert table.at[name, "delta_psnr_std"] == pytest.approx(std, abs=1e-12)
        assert table.at[name, "n_paired"] == 2
        # costs: differences of means
        mine = [fake_metrics(variants[name], s) for s in (0, 1)]
        theirs = [fake_metrics(variants[other], s) for s in (0, 1)]
        for key in ("latency_ms", "macs", "params_deploy", "peak_memory_mb"):
            want = np.mean([m[key] for m in mine]) - np.mean([m[key] for m in theirs])
            assert table.at[name, f"delta_{key}_mean"] == pytest.approx(want)
    # the reference row: absolute mean and sample std over its seeds
    ref = [fake_psnr(REFERENCE, s) for s in (0, 1)]
    assert table.at["reference", "psnr_mean"] == pytest.approx(np.mean(ref))
    assert table.at["reference", "psnr_std"] == pytest.approx(np.std(ref, ddof=1))
    assert math.isnan(table.at["reference", "delta_psnr_mean"])
    # switching wab off loses about its 0.3 dB gain
    assert table.at["-wab", "delta_psnr_mean"] == pytest.approx(-GAIN["wab"], abs=0.2)

    # each run is a trial of <study>-ablation with the schema's attributes
    ablation = optuna.load_study(study_name="abl-ablation", storage=study._storage)
    trials = ablation.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 10
    assert table.at["+fsb", "same_as"] == "-wab" and table.at["+fsb", "n_complete"] == 2
    one = next(t for t in trials if t.user_attrs["variant"] == "+moe" and t.user_attrs["seed"] == 1)
    assert one.user_attrs["kind"] == "add-one-in" and one.user_attrs["module"] == "moe"
    assert one.user_attrs["reference_trial"] == 0
    assert EHRSRConfig.from_dict(one.user_attrs["config"]) == variants["+moe"]
    assert one.values == pytest.approx([one.user_attrs["metrics"]["psnr"], one.user_attrs["metrics"]["latency_ms"]])
    assert one.user_attrs["status"] == "complete" and "charged_seconds" in one.user_attrs
    # the report rebuilds the same table from storage alone
    loaded, plan = load_controlled_ablation(study)
    assert plan["reference_trial"] == 0 and plan["seeds"] == [0, 1]
    pd.testing.assert_frame_equal(loaded, result.table)


def test_controlled_ablation_resumes_and_records_failures(tmp_path):
    study = reference_study(tmp_path)
    fsb_only = REFERENCE.replace(wab={"enabled": False})
    runner = FakeRunner(diverge={("fsb", 1)}, raise_once={("moe", 0)})
    first = run_controlled_ablation(study, CTX, seeds=2, progress=False, runner=runner)
    assert first.runs_run == 10
    table = first.table.set_index("variant")
    # "-wab" (fsb only) diverged with seed 1: one complete run, no pair for seed 1
    assert table.at["-wab", "n_complete"] == 1 and table.at["-wab", "n_paired"] == 1
    mean, _ = expected_delta(fsb_only, REFERENCE, [0])
    assert table.at["-wab", "delta_psnr_mean"] == pytest.approx(mean)
    assert math.isnan(table.at["-wab", "delta_psnr_std"])  # one pair: no spread
    # "+moe" crashed on seed 0: recorded as an error, its seed 1 ran
    assert table.at["+moe", "n_complete"] == 1
    ablation = optuna.load_study(study_name="abl-ablation", storage=study._storage)
    errors = [t for t in ablation.trials if t.user_attrs.get("status") == "error"]
    assert len(errors) == 1 and "illegal memory access" in errors[0].user_attrs["reason"]
    assert errors[0].state == TrialState.FAIL

    # resume: the crash is retried, the divergence (same seed, same result) is not, the rest is kept
    runner.calls.clear()
    second = run_controlled_ablation(study, CTX, seeds=2, progress=False, runner=runner)
    assert [(c.enabled_modules(), s) for c, s, _, _ in runner.calls] == [(("moe",), 0)]
    assert second.runs_run == 1 and second.runs_skipped == 9
    assert second.table.set_index("variant").at["+moe", "n_complete"] == 2
    # a third seed only runs seed 2
    runner.calls.clear()
    third = run_controlled_ablation(study, CTX, seeds=3, progress=False, runner=runner)
    assert sorted({s for _, s, _, _ in runner.calls}) == [2] and third.runs_run == 5
    assert third.table.set_index("variant").at["reference", "n_complete"] == 3
    # back to one seed: nothing runs, and the table (and the report's) counts seed 0 only
    again = run_controlled_ablation(study, CTX, seeds=1, progress=False, runner=runner)
    assert again.runs_run == 0 and (again.table["n_complete"] <= 1).all()
    assert (load_controlled_ablation(study)[0]["n_complete"] <= 1).all()
    # another training length is another experiment: every run is redone
    runner.calls.clear()
    longer = run_controlled_ablation(study, CTX, seeds=1, steps=12, progress=False, runner=runner)
    assert longer.runs_run == 5 and {steps for *_, steps in runner.calls} == {12}


def test_controlled_ablation_stops_when_its_budget_is_spent(tmp_path, monkeypatch):
    study = reference_study(tmp_path, charged_seconds=15.0)
    clock = [0.0]
    monkeypatch.setattr(ablation_module, "_clock", lambda: clock[0])
    runner = FakeRunner(clock=clock, seconds_per_run=10.0)
    # estimates: 15 s (the reference trial's charge) before any run, then the median run (10 s);
    # runs start at 0, 10 and 20 s spent; at 30 s the next would overrun 35 s
    result = run_controlled_ablation(study, CTX, seeds=2, budget_seconds=35.0, progress=False, runner=runner)
    assert result.runs_run == 3 and len(runner.calls) == 3
    assert result.seconds_spent == pytest.approx(30.0)
    assert "ablation budget of 35 s reached" in result.stopped and "7 runs left out" in result.stopped
    table = result.table.set_index("variant")
    assert table.at["-fsb", "note"].startswith("not run yet")
    # the budget counts stored runs too: resuming with the same budget runs nothing more
    again = run_controlled_ablation(study, CTX, seeds=2, budget_seconds=35.0, progress=False, runner=runner)
    assert again.runs_run == 0 and again.runs_skipped == 3
    # a budget below the first estimate runs nothing
    fresh = reference_study(subdir(tmp_path, "fresh"))
    none = run_controlled_ablation(fresh, CTX, seeds=1, budget_seconds=5.0, progress=False, runner=runner)
    assert none.runs_run == 0 and "needs about 15 s" in none.stopped


def test_reference_must_be_a_finished_trial(tmp_path):
    study = reference_study(tmp_path)
    with pytest.raises(AblationError, match="no trial 7"):
        run_controlled_ablation(study, CTX, reference=7, progress=False, runner=FakeRunner())
    with pytest.raises(AblationError, match="trial 1 is PRUNED"):
        run_controlled_ablation(study, CTX, reference=1, progress=False, runner=FakeRunner())
    with pytest.raises(AblationError, match="seeds must be a positive integer"):
        run_controlled_ablation(study, CTX, seeds=0, progress=False, runner=FakeRunner())
    empty = optuna.create_study(study_name="empty", storage=study._storage, directions=["maximize", "minimize"])
    for key, value in study.user_attrs.items():
        empty.set_user_attr(key, value)
    with pytest.raises(AblationError, match="no finished feasible trial"):
        run_controlled_ablation(empty, CTX, progress=False, runner=FakeRunner())


# ---------------------------------------------------------------------------------------------
# importance


def _with_searched_lr(study: optuna.Study, tmp_path) -> optuna.Study:
    """A copy of ``study`` whose trials also searched ``lr`` (log-uniform 2e-4..2e-3), the value
    recorded in each trial's training settings, as a space with a searched rate would store them."""
    copy = optuna.create_study(study_name="with-lr", storage=f"sqlite:///{tmp_path / 'lr.db'}",
                               directions=study.directions)
    copy.set_metric_names(study.metric_names)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    rng = np.random.default_rng(0)
    lr_dist = optuna.distributions.FloatDistribution(2e-4, 2e-3, log=True)
    for t in study.trials:
        lr = float(np.exp(rng.uniform(np.log(2e-4), np.log(2e-3))))
        attrs = dict(t.user_attrs)
        if "train" in attrs:
            attrs["train"] = {**attrs["train"], "lr": lr}
        copy.add_trial(optuna.trial.create_trial(
            state=t.state, values=t.values, params={**t.params, "lr": lr},
            distributions={**t.distributions, "lr": lr_dist}, user_attrs=attrs))
    return copy


def test_param_importances_per_objective_and_for_the_front(tmp_path):
    study = make_study(tmp_path, n_trials=24)
    table = param_importances(study)
    assert list(table.columns) == ["psnr", "latency", "pareto"]
    searched = {name for t in study.trials if t.state == TrialState.COMPLETE for name in t.params}
    assert set(table.index) == searched
    for column in table.columns:
        assert table[column].sum() == pytest.approx(1.0)
        assert (table[column] >= 0).all()
    # the psnr column is Optuna's PED-ANOVA with PSNR negated (PED-ANOVA treats low as better)
    with pytest.warns(UserWarning):
        direct = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=lambda t: -t.values[0]
        )
    for name, value in direct.items():
        assert table.at[name, "psnr"] == pytest.approx(value)
    # latency is a cost: only architecture parameters compete for it, a searched learning rate
    # (a space of one's own may search it; the shipped ones fix it) cannot
    study = _with_searched_lr(study, tmp_path)
    table = param_importances(study)
    searched = {name for t in study.trials if t.state == TrialState.COMPLETE for name in t.params}
    assert "lr" in searched and table.at["lr", "latency"] == 0.0
    architecture = [n for n in searched if n != "lr"]
    with pytest.warns(UserWarning):
        direct = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=architecture,
            target=lambda t: t.values[1],
        )
    for name, value in direct.items():
        assert table.at[name, "latency"] == pytest.approx(value)
    # one objective: no pareto column; no finished trial: empty
    single = make_study(subdir(tmp_path, "single"), objectives=("psnr",), n_trials=8)
    assert list(param_importances(single).columns) == ["psnr"]
    none = make_study(subdir(tmp_path, "none"), n_trials=4, finished=False)
    assert param_importances(none).empty

