"""One configuration, measured: build -> count -> profile -> train (with rung evaluations) -> evaluate.

``run_configuration`` is what a search trial, a controlled-ablation variant and a benchmark run
all do. It returns a ``RunResult`` instead of raising for the expected failures (refused by a
cheap limit, diverged, out of memory), so callers record the reason and carry on. The training
settings arrive as one typed ``TrainSettings`` and reach ``ehrsr.training.train`` whole.

Order of work, cheapest first: the MAC / parameter count of the deploy form (a second or two)
refuses configurations over ``--max-params`` / ``--max-macs`` before any budget is spent; the
latency / memory profile follows (cost does not depend on training, so it is measured once, on
the device the search runs on); then training, evaluating on the validation set at every rung so
multi-fidelity early stopping can rank the trial against others at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.model import build_model
from ehrsr.study_schema import CostLimits, Objective
from ehrsr.training import TrainSettings

__all__ = [
    "TRAIN_SETTINGS_VERSION",
    "CostLimits",
    "RunContext",
    "RunResult",
    "device_latency_step",
    "jsonable_metrics",
    "measure_cost_checked",
    "run_configuration",
    "run_model",
]

# on_rung(rung_index, step, values, metrics) -> True to continue training, False to stop here
RungCallback = Callable[[int, int, list[float], dict[str, Any]], bool]


@dataclass
class RunContext:
    """Everything that stays the same across the runs of one study."""

    train_set: Any  # ehrsr.data.TrainSet (already on ``device``)
    val_set: Any  # ehrsr.data.ValSet
    objectives: list[Objective]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    crop_border: int = 4
    profile_shape: tuple[int, int, int, int] = (1, 3, 256, 256)
    profile_dtype: str = "float32"
    threads: int | None = None
    profile_warmup: int | None = None
    profile_repeats: int | None = None
    profile_seconds: float | None = None  # timed-pass budget of the latency plan (None: 1 s)
    lpips: Any = None  # ehrsr.metrics.LPIPS or None when unavailable
    limits: CostLimits = field(default_factory=CostLimits)
    progress: bool = False
    # per-device latency (docs/latency_models.md): (DeviceLatency, LatencyModel, LatencyTarget) each
    device_latencies: list[tuple[Any, Any, Any]] = field(default_factory=list)
    time_locally: bool = True  # False: only predicted latencies are wanted, so nothing is timed here
    canary_checked: bool = False  # time this machine's latency next to a canary reading (the search)
    canary: Any = None  # ehrsr.profiling.canary.Canary, made on first use (its quiet reference is kept)

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def values(self, metrics: dict[str, Any]) -> list[float]:
        return [float(metrics[o.metric_key]) for o in self.objectives]


@dataclass
class RunResult:
    status: str  # complete | pruned | refused | diverged | oom | error | cut_short (pruned: stopped at a rung)
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0
    rungs: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    # final evaluation per image, {name: [psnr, ssim]} (``ehrsr.metrics.encode_per_image``), stored
    # by ``ehrsr.search.record.record_outcome`` as the trial's ``PER_IMAGE_ATTR``
    per_image: dict[str, list[float | None]] | None = None
    # the training loss, [[step, mean loss since the previous entry], ...] about 36 entries a run
    # (``ehrsr.search.ranking.loss_sum`` reads it)
    loss_history: list[list[float]] | None = None
    latency_sources: dict[str, Any] | None = None  # study_schema.LATENCY_SOURCES_ATTR
    canary: dict[str, Any] | None = None  # study_schema.CANARY_ATTR


_UNIT_COUNTER: Any = None


def unit_mac_counter() -> Any:
    """This process's ``UnitMacCounter``: a trial's MACs summed from unit counts cached across
    trials and, on disk, across the processes of this machine (exactly ``count_macs``'s fvcore
    figures; docs/profiling.md, "Counting in a search")."""
    global _UNIT_COUNTER
    if _UNIT_COUNTER is None:
        from ehrsr.profiling.unit_counts import UnitCountStore, UnitMacCounter, default_store_dir

        _UNIT_COUNTER = UnitMacCounter(UnitCountStore(default_store_dir()))
    return _UNIT_COUNTER


def measure_cost(model: nn.Module, ctx: RunContext, mac_count: Any = None) -> dict[str, Any]:
    """Latency, memory and counts of the deploy form on the search device (``profile_model``);
    ``mac_count`` (from ``count_macs`` at the same shape) saves counting twice."""
    from ehrsr.profiling import profile_model

    profile = profile_model(
        model,
        input_shape=ctx.profile_shape,
        device=ctx.device,
        dtype=ctx.profile_dtype,
        warmup=ctx.profile_warmup,
        repeats=ctx.profile_repeats,
        threads=ctx.threads,
        mac_count=mac_count,
        latency_budget_s=ctx.profile_seconds,
    )
    return {
        "latency_ms": profile.latency_ms,
        "latency_ms_p10": profile.latency_ms_p10,
        "latency_ms_p90": profile.latency_ms_p90,
        "macs": profile.macs,
        "macs_ptflops": profile.macs_ptflops,
        "params": profile.params,
        "params_deploy": profile.params_deploy,
        "peak_memory_mb": profile.peak_memory_mb,
        "profile_device": profile.device,
        "latency_repeats": profile.repeats,
    }


def measure_cost_checked(
    model: nn.Module, ctx: RunContext, mac_count: Any,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``measure_cost`` as the search runs it: untimed when only predicted device latencies are
    wanted (``ctx.time_locally`` False), and with ``ctx.canary_checked`` timed right after a canary
    reading, measuring once more while the machine is busy (``measure_with_canary``). Returns the
    cost metrics and the canary reading (``CANARY_ATTR``) or None."""
    if not ctx.time_locally:
        return _untimed_cost(model, ctx, mac_count), None
    if not ctx.canary_checked:
        return measure_cost(model, ctx, mac_count=mac_count), None
    from ehrsr.profiling.canary import Canary, measure_with_canary

    if ctx.canary is None:
        ctx.canary = Canary(threads=ctx.threads or 1)
    cost, reading, attempts = measure_with_canary(lambda: measure_cost(model, ctx, mac_count=mac_count), ctx.canary,
                                                  retries=1)
    return cost, {"ratio": reading.ratio, "quiet_ms": reading.quiet_ms, "latency_ms": reading.latency_ms,
                  "contended": reading.contended, "attempts": attempts}


def _untimed_cost(model: nn.Module, ctx: RunContext, mac_count: Any) -> dict[str, Any]:
    """Counts (and peak memory when an objective or limit needs it) without timing: a search whose
    latencies are all predicted for other devices spends nothing on this machine's latency."""
    from ehrsr.profiling import device_name
    from ehrsr.profiling.counting import deploy_form
    from ehrsr.profiling.memory import measure_peak_memory

    count = mac_count if mac_count is not None else unit_mac_counter().count(model, ctx.profile_shape)
    memory_mb = None
    if "memory" in [o.name for o in ctx.objectives] or ctx.limits.max_memory_mb is not None:
        deploy, _ = deploy_form(model)
        x = torch.rand(ctx.profile_shape, generator=torch.Generator().manual_seed(0)).to(ctx.device)
        memory_mb = measure_peak_memory(deploy.to(ctx.device).eval(), x, dtype=ctx.profile_dtype).peak_memory_mb
    return {
        "latency_ms": None, "latency_ms_p10": None, "latency_ms_p90": None, "macs": count.macs,
        "macs_ptflops": count.macs_ptflops, "params": count.params, "params_deploy": count.params_deploy,
        "peak_memory_mb": memory_mb, "profile_device": device_name(ctx.device, ctx.threads), "latency_repeats": None,
    }


def device_latency_step(config: EHRSRConfig, ctx: RunContext) -> Any:
    """Each device profile's latency of ``config`` (predicted; measured here when the model lacks a
    unit), or None in a study without device latencies (``DeviceLatencyResult``)."""
    if not ctx.device_latencies:
        return None
    from ehrsr.search.device_latency import predict_device_latencies

    return predict_device_latencies(config, ctx.device_latencies)


def _latency_sources(device: Any, cost: dict[str, Any] | None, canary: dict[str, Any] | None) -> dict[str, Any] | None:
    """``LATENCY_SOURCES_ATTR``: where each latency of the trial came from."""
    if device is None:
        return None
    from ehrsr.search.device_latency import LOCAL

    sources = dict(device.sources)
    if cost is not None and cost.get("latency_ms") is not None:
        sources[LOCAL] = {"source": "measured", "latency_ms": cost["latency_ms"],
                          "canary_ratio": canary["ratio"] if canary else None,
                          "contended": bool(canary and canary["contended"])}
    return sources


def _evaluate(model: nn.Module, ctx: RunContext, with_lpips: bool) -> dict[str, Any]:
    """Mean quality (and ``eval_seconds``) plus ``per_image``, the compact per-image values."""
    from ehrsr.metrics import encode_per_image, evaluate

    result = evaluate(
        model,
        ctx.val_set,
        crop_border=ctx.crop_border,
        device=ctx.device,
        lpips=ctx.lpips if with_lpips else None,
    )
    return {"psnr": result.psnr, "ssim": result.ssim, "lpips": result.lpips, "eval_seconds": result.seconds,
            "per_image": encode_per_image(result)}


def run_configuration(
    config: EHRSRConfig,
    train: TrainSettings,
    ctx: RunContext,
    *,
    seed: int = 0,
    rung_steps: Sequence[int] = (),
    on_rung: RungCallback | None = None,
    precomputed_cost: dict[str, Any] | None = None,
    train_seconds: float | None = None,
) -> RunResult:
    """Train the EHR-SR network of ``config`` with ``train`` and measure it (``run_model``)."""
    return run_model(lambda: build_model(config), train, ctx, seed=seed, rung_steps=rung_steps, on_rung=on_rung,
                     precomputed_cost=precomputed_cost, train_seconds=train_seconds, config=config)


def run_model(
    build: Callable[[], nn.Module],
    train: TrainSettings,
    ctx: RunContext,
    *,
    seed: int = 0,
    rung_steps: Sequence[int] = (),
    on_rung: RungCallback | None = None,
    precomputed_cost: dict[str, Any] | None = None,
    deploy: Callable[[nn.Module], nn.Module] | None = None,
    train_seconds: float | None = None,
    config: EHRSRConfig | None = None,
) -> RunResult:
    """Train the network ``build()`` returns with ``train`` (its ``steps``, evaluating at
    ``rung_steps``) and measure it: one protocol for search trials, ablation runs and the
    hand-designed baselines (``build`` runs after ``torch.manual_seed(seed)``).

    ``deploy`` gives the form to count and profile (e.g. ``ehrsr.baselines.deploy_baseline``);
    None profiles the module as built (an EHR-SR network is fused by the profiler itself).

    ``train`` reaches ``ehrsr.training.train`` as it is (learning rate, weight decay, loss, batch,
    patch, steps). ``on_rung`` is called after the evaluation at each rung step below
    ``train.steps`` and may stop the run (status ``pruned``; the metrics are then those of the
    last rung). The final evaluation
    (at ``steps``) includes LPIPS when it is available. ``precomputed_cost`` (the cost metrics of
    ``measure_cost`` for this configuration on this device) skips counting and profiling; the
    limits are still checked against it. ``train_seconds``: a deadline on the training itself
    (``ehrsr.training.train``'s ``seconds``); a run that hits it is not evaluated and ends
    ``cut_short`` (the controlled ablation keeps its budget share this way, docs/budget.md).
    ``config``: the EHR-SR configuration ``build`` makes, when it is one; device latency models
    (docs/latency_models.md) predict from it (a hand-designed baseline has none: each profile's
    latency is measured here with the profile's runtime, threads and input size).
    """
    from ehrsr.training import TrainingDiverged, TrainingOutOfMemory
    from ehrsr.training import train as train_model

    if not isinstance(train, TrainSettings):
        raise TypeError(f"train must be a TrainSettings, got {type(train).__name__}")
    steps = train.steps
    start = time.perf_counter()
    seconds = {"train": 0.0, "eval": 0.0, "profile": 0.0}
    torch.manual_seed(seed)
    model = build()
    measured = deploy(model) if deploy is not None else model

    # 1. cheap counting: refuse over-limit configurations before spending budget
    t0 = time.perf_counter()
    if precomputed_cost is None:
        count = unit_mac_counter().count(measured, ctx.profile_shape)
        params_deploy, macs = count.params_deploy, count.macs
        counted = {"macs": count.macs, "params": count.params, "params_deploy": count.params_deploy}
    else:
        params_deploy, macs = precomputed_cost["params_deploy"], precomputed_cost["macs"]
        counted = dict(precomputed_cost)
    refusal = ctx.limits.refusal(params_deploy, macs)
    device = None
    if refusal is None and config is not None:  # predicted latencies on other devices: a fraction of a second
        device = device_latency_step(config, ctx)
    elif refusal is None and ctx.device_latencies:  # no configuration (a baseline): measured per profile here
        from ehrsr.search.device_latency import measure_device_latencies

        device = measure_device_latencies(measured, ctx.profile_shape[1], ctx.device_latencies)
    if device is not None:
        refusal = device.refusal
        counted.update(device.metrics)
    if refusal is not None:
        seconds["profile"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - start
        return RunResult("refused", f"refused before training: {refusal}", counted, seconds=seconds,
                         latency_sources=_latency_sources(device, None, None))
    # 2. measured cost of the deploy form on this device (unless the caller measured it already)
    canary = None
    if precomputed_cost is None:
        cost, canary = measure_cost_checked(measured, ctx, count)
    else:
        cost = dict(precomputed_cost)
    cost.update(device.metrics if device is not None else {})
    latency_sources = _latency_sources(device, cost, canary)
    seconds["profile"] = time.perf_counter() - t0

    quality_needs_lpips = any(o.name == "lpips" for o in ctx.objectives)
    final: dict[str, Any] = {}
    per_image: dict[str, Any] = {}
    rungs: list[dict[str, Any]] = []
    rung_list = sorted({s for s in rung_steps if 0 < s < steps})

    def on_eval(step: int, trained: nn.Module) -> bool:
        is_final = step >= steps
        quality = _evaluate(trained, ctx, with_lpips=is_final or quality_needs_lpips)
        metrics = {**cost, **{k: v for k, v in quality.items() if k not in ("eval_seconds", "per_image")}}
        if not all(_finite(metrics.get(o.metric_key)) for o in ctx.objectives):
            missing = [o.name for o in ctx.objectives if not _finite(metrics.get(o.metric_key))]
            raise TrainingDiverged(step, f"objective {', '.join(missing)} is not a finite number")
        values = ctx.values(metrics)
        if is_final:
            final.update(metrics)
            per_image.update(quality["per_image"])
            return True
        rungs.append({"step": step, "values": values, "metrics": jsonable_metrics(metrics)})
        if on_rung is not None:
            return bool(on_rung(rung_list.index(step), step, values, metrics))
        return True

    # 3. brief training, evaluating at each rung and at the end
    try:
        result = train_model(
            model,
            ctx.train_set,
            train,
            device=ctx.device,
            seed=seed,
            eval_steps=[*rung_list, steps],
            on_eval=on_eval,
            progress=ctx.progress,
            seconds=train_seconds,
            log_every=max(1, steps // LOSS_HISTORY_POINTS),
        )
    except TrainingDiverged as exc:
        seconds["total"] = time.perf_counter() - start
        return RunResult("diverged", str(exc), jsonable_metrics(cost), seconds=seconds, rungs=rungs,
                         latency_sources=latency_sources, canary=canary)
    except TrainingOutOfMemory as exc:
        seconds["total"] = time.perf_counter() - start
        return RunResult("oom", str(exc), jsonable_metrics(cost), seconds=seconds, rungs=rungs,
                         latency_sources=latency_sources, canary=canary)
    seconds["train"] = result.train_seconds
    seconds["eval"] = result.eval_seconds
    seconds["total"] = time.perf_counter() - start
    if final:
        metrics = jsonable_metrics(final)
        return RunResult(
            "complete", None, metrics, ctx.values(metrics), seconds, result.steps_done, rungs, model,
            latency_sources=latency_sources, canary=canary, per_image=dict(per_image),
            loss_history=[[int(s), float(v)] for s, v in result.history],
        )
    if result.stop_reason == "seconds":
        reason = (f"cut short: training stopped at step {result.steps_done} of {steps} by its "
                  f"{train_seconds:.3g} s deadline (not evaluated)")
        return RunResult("cut_short", reason, jsonable_metrics(cost), None, seconds, result.steps_done, rungs, model,
                         latency_sources=latency_sources, canary=canary)
    last = rungs[-1] if rungs else {"metrics": jsonable_metrics(cost), "values": None, "step": result.steps_done}
    reason = f"stopped at step {result.steps_done} ({result.stop_reason})"
    return RunResult("pruned", reason, last["metrics"], last["values"], seconds, result.steps_done, rungs, model,
                     latency_sources=latency_sources, canary=canary)


LOSS_HISTORY_POINTS = 36  # entries of a run's recorded training-loss curve


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def jsonable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy (Optuna user attributes must be JSON serialisable)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


TRAIN_SETTINGS_VERSION = 2
"""Version of how a study's training settings reach training (the study record's
``train_settings_version``): 2 = the whole ``TrainSettings``, weight decay included, reaches the
optimizer."""
