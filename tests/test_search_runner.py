"""run_configuration: refusal before training, rung callbacks, divergence, and the metrics it returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ehrsr import EHRSRConfig
from ehrsr.search.objectives import parse_objectives
from ehrsr.search.runner import CostLimits, RunContext, run_configuration
from ehrsr.search.study import ContextSpec, build_context
from ehrsr.training import TrainSettings

TINY = EHRSRConfig.from_dict({"width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1})


def settings(steps: int, lr: float = 2e-3) -> TrainSettings:
    return TrainSettings(steps=steps, lr=lr, batch_size=4, patch_size=16)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    spec = ContextSpec(
        task={"task": "sr", "scale": 4}, train_data=None, val_data=None, objectives=["psnr", "latency"],
        profile_shape=[1, 3, 32, 32], profile_dtype="float32", threads=None, limits={}, crop_border=4, cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return build_context(spec, torch.device("cpu"))


def test_complete_run_measures_quality_and_cost(ctx: RunContext) -> None:
    result = run_configuration(TINY, settings(6, lr=2e-3), ctx, seed=0, rung_steps=[2, 4])
    assert result.status == "complete" and result.reason is None and result.steps_done == 6
    m = result.metrics
    assert 10 < m["psnr"] < 50 and 0 < m["ssim"] <= 1
    assert m["latency_ms_p10"] <= m["latency_ms"] <= m["latency_ms_p90"]
    assert m["macs"] > 0 and m["params_deploy"] <= m["params"] and m["peak_memory_mb"] > 0
    assert result.values == [m["psnr"], m["latency_ms"]]
    assert [r["step"] for r in result.rungs] == [2, 4]
    assert set(result.seconds) >= {"train", "eval", "profile", "total"}
    assert result.model is not None


def test_search_latency_plan_follows_the_context_budget(ctx: RunContext, monkeypatch) -> None:
    # a fake clock that advances 1 ms per reading: every pass "takes" 1 ms whatever the machine,
    # so the default 1 s plan times exactly its planned passes and a budget far below one pass
    # times the minimum of 5
    from ehrsr.profiling import latency as latency_module

    clock = {"now": 0.0}

    def fake_perf_counter() -> float:
        clock["now"] += 1e-3
        return clock["now"]

    monkeypatch.setattr(latency_module.time, "perf_counter", fake_perf_counter)
    default = run_configuration(TINY, settings(1), ctx, seed=0).metrics
    short = RunContext(**{**ctx.__dict__, "profile_seconds": 1e-6})
    assert run_configuration(TINY, settings(1), short, seed=0).metrics["latency_repeats"] == 5
    planned = latency_module.plan_passes(1.0, "cpu").repeats
    assert planned > 5 and default["latency_repeats"] == planned


def test_rung_callback_can_stop_the_run(ctx: RunContext) -> None:
    seen = []

    def stop_at_second(rung_index, step, values, metrics):
        seen.append((rung_index, step, len(values)))
        return rung_index == 0

    result = run_configuration(TINY, settings(8, lr=2e-3), ctx, rung_steps=[2, 4], on_rung=stop_at_second)
    assert seen == [(0, 2, 2), (1, 4, 2)]
    assert result.status == "pruned" and result.steps_done == 4
    assert result.values == result.rungs[-1]["values"]  # a pruned run carries its last rung's values


def test_cheap_limits_refuse_before_any_training(ctx: RunContext, monkeypatch) -> None:
    import ehrsr.training

    def no_training(*args, **kwargs):
        raise AssertionError("a refused configuration must not train")

    monkeypatch.setattr(ehrsr.training, "train", no_training)
    limited = RunContext(**{**ctx.__dict__, "limits": CostLimits(max_params=1000)})
    result = run_configuration(TINY, settings(4, lr=1e-3), limited)
    assert result.status == "refused" and "max-params" in result.reason
    assert result.metrics["params_deploy"] > 1000
    limited = RunContext(**{**ctx.__dict__, "limits": CostLimits(max_macs=1e3)})
    assert "max-macs" in run_configuration(TINY, settings(4, lr=1e-3), limited).reason


def test_divergence_is_a_result_not_a_crash(ctx: RunContext) -> None:
    result = run_configuration(TINY, settings(30, lr=1e6), ctx, rung_steps=[10])
    assert result.status == "diverged" and "step" in result.reason


def test_constraints_follow_the_measured_limits() -> None:
    limits = CostLimits(max_latency_ms=10.0, max_memory_mb=100.0)
    assert limits.constraints({"latency_ms": 12.5, "peak_memory_mb": 40.0}) == {
        "latency_ms": 2.5, "peak_memory_mb": -60.0,
    }
    assert CostLimits().constraints({"latency_ms": 1.0}) == {}
    assert CostLimits.from_dict(limits.to_dict()) == limits


def test_objectives_parse_and_directions() -> None:
    objectives = parse_objectives("psnr, lpips ,memory")
    assert [(o.name, o.metric_key, o.direction) for o in objectives] == [
        ("psnr", "psnr", "maximize"), ("lpips", "lpips", "minimize"), ("memory", "peak_memory_mb", "minimize"),
    ]
    for bad, message in [("psnr,psnr", "twice"), ("", "at least one"), ("flops", "unknown objective")]:
        with pytest.raises(ValueError, match=message):
            parse_objectives(bad)


@pytest.mark.parametrize(("module", "package"), [("psycopg", "psycopg[binary]"), ("pymysql", "PyMySQL")])
def test_a_missing_database_driver_is_named_with_its_pip_package(monkeypatch, module, package) -> None:
    import optuna

    from ehrsr.search.storage import StorageError, open_storage

    def without_driver(url, **kwargs):
        # what Optuna does: SQLAlchemy's ModuleNotFoundError re-raised as a bare ImportError
        try:
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)
        except ModuleNotFoundError as exc:
            raise ImportError("Failed to import DB access module for the specified storage URL.") from exc

    monkeypatch.setattr(optuna.storages, "RDBStorage", without_driver)
    with pytest.raises(StorageError) as info:
        open_storage("postgresql://me:pw@db/x")
    message = str(info.value)
    assert f"missing database driver {module}" in message and f"pip install '{package}'" in message
    assert "pw" not in message.replace("pip", "")


def test_storage_helpers(tmp_path: Path) -> None:
    from ehrsr.search.storage import StorageError, default_storage_url, mask_url, open_storage

    assert mask_url("postgresql://me:pw@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert mask_url("mysql+pymysql://u:p%40ss@h/x?a=b") == "mysql+pymysql://u:***@h/x?a=b"
    assert mask_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
    assert default_storage_url(tmp_path, workers=1) == f"sqlite:///{tmp_path / 'study.db'}"
    assert default_storage_url(tmp_path, workers=3) == f"journal:{tmp_path / 'study.journal'}"
    (tmp_path / "study.db").write_bytes(b"")
    assert default_storage_url(tmp_path, workers=3).startswith("sqlite:///")  # an existing study wins
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(StorageError, match="not a URL"):
        open_storage("my-study.db")


def test_cost_is_reused_for_a_configuration_already_profiled_on_this_device() -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from ehrsr.search.trial import COST_KEYS, cached_cost

    study = optuna.create_study(directions=["maximize", "minimize"])
    config = TINY.to_dict()
    metrics = {k: 1.0 for k in COST_KEYS[:-1]} | {"profile_device": "cpu X", "psnr": 30.0}
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}, values=[30.0, 1.0],
        user_attrs={"config": config, "metrics": metrics, "device_name": "cpu X"},
    ))
    number, cost = cached_cost(study, config, "cpu X")
    assert number == 0 and cost["latency_ms"] == 1.0 and "psnr" not in cost  # cost only, never quality
    assert cached_cost(study, config, "another device") is None  # latency belongs to its device
    assert cached_cost(study, TINY.replace(width=16).to_dict(), "cpu X") is None
    assert cached_cost(study, config, "cpu X", exclude=0) is None


def test_precomputed_cost_skips_profiling_but_not_the_limits(ctx: RunContext, monkeypatch) -> None:
    import ehrsr.profiling

    first = run_configuration(TINY, settings(2, lr=2e-3), ctx)
    cost = {k: first.metrics[k] for k in ("latency_ms", "latency_ms_p10", "latency_ms_p90", "macs",
                                            "macs_ptflops", "params", "params_deploy", "peak_memory_mb")}

    def no_profiling(*args, **kwargs):
        raise AssertionError("a precomputed cost must not be measured again")

    monkeypatch.setattr(ehrsr.profiling, "profile_model", no_profiling)
    monkeypatch.setattr(ehrsr.profiling, "count_macs", no_profiling)
    again = run_configuration(TINY, settings(2, lr=2e-3), ctx, precomputed_cost=cost)
    assert again.status == "complete" and again.metrics["latency_ms"] == cost["latency_ms"]
    limited = RunContext(**{**ctx.__dict__, "limits": CostLimits(max_params=10)})
    assert run_configuration(TINY, settings(2, lr=2e-3), limited, precomputed_cost=cost).status == "refused"
