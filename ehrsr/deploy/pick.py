"""Deployment picks: the best-quality Pareto configuration that meets a device's limits, measured
on that device.

Latency and memory are properties of the device, so the candidates (the study's front, ``search.pareto.front_trials``) are
re-profiled on the machine ``pick_deployment`` runs on, with ``ehrsr.profiling.profile_model``, at
the device profile's input size, dtype and thread count; nothing is copied from the search.
Quality (PSNR, SSIM, LPIPS) is the study's measurement of the brief-trained weights (float32, the
search's validation data); it does not depend on the device.

The device profiles are ``ehrsr.deploy.profiles`` (``docs/reports.md`` documents the format).
The pick writes ``deploy/<profile>.json`` (configuration, measured cost, quality, where and when
it was measured, every candidate's measurements) and ``deploy/<profile>.safetensors``: the fused
weights (``ehrsr.reparameterize`` of the brief-trained model). ``load_deployed_model`` rebuilds
the fused network from the two. Optionally an ONNX export, checked against PyTorch on one input.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import torch
from safetensors.torch import save_file
from torch import nn

import ehrsr
from ehrsr.deploy.export import export_onnx_dynamic, fused_state, load_trained_model
from ehrsr.deploy.predicted import LatencyPlan, plan_latency
from ehrsr.deploy.profiles import LIMIT_METRICS, DeviceProfile, check_device_available, resolve_profile
from ehrsr.errors import UserError
from ehrsr.files import PathOutsideFolder, path_inside
from ehrsr.reparam import reparameterize
from ehrsr.search.pareto import front_trials
from ehrsr.study_schema import PICK_MEASURED_KEYS, QUALITY_METRICS, TRIAL, Objective, StudyInfo, train_command

__all__ = [
    "DeploymentError",
    "DeploymentPick",
    "MeasuredCandidate",
    "choose_candidate",
    "cpu_threads_for",
    "pick_deployment",
]


class DeploymentError(UserError):
    """No candidate meets the profile's limits. ``limit`` names the limit that excludes the
    closest candidate (``trial``); the CLI turns this into exit status 2."""

    def __init__(self, message: str, *, profile: str, limit: str | None = None, trial: int | None = None):
        super().__init__(message)
        self.profile = profile
        self.limit = limit
        self.trial = trial



# ---------------------------------------------------------------------------------------------
# choosing


@dataclass(frozen=True)
class MeasuredCandidate:
    """One Pareto trial re-profiled on this machine."""

    trial: int
    config: dict[str, Any]
    quality: dict[str, float | None]  # psnr / ssim / lpips from the study
    measured: dict[str, Any]  # latency_ms, latency_ms_p10/p90, peak_memory_mb, params_deploy, macs, ...
    violations: dict[str, tuple[float | None, float]]  # limit -> (measured, limit)

    @property
    def feasible(self) -> bool:
        return not self.violations

    def excess(self) -> float:
        """Sum over violated limits of measured / limit - 1 (how far outside the limits it is)."""
        total = 0.0
        for value, limit in self.violations.values():
            total += math.inf if value is None else value / limit - 1.0
        return total


def _violations(measured: Mapping[str, Any], limits: Mapping[str, float]) -> dict[str, tuple[float | None, float]]:
    out = {}
    for name, limit in limits.items():
        value = measured.get(LIMIT_METRICS[name])
        if value is None or not value <= limit:  # unmeasured cannot be shown to fit
            out[name] = (None if value is None else float(value), float(limit))
    return out


def _quality_text(candidate: MeasuredCandidate, quality: Objective) -> str:
    value = candidate.quality.get(quality.metric_key)
    if value is None:
        return f"{quality.label} not measured"
    return f"{quality.label} {value:.4g}{' dB' if quality.metric_key == 'psnr' else ''}"


def _limit_text(name: str, measured: float | None, limit: float) -> str:
    unit = {"max_latency_ms": " ms", "max_memory_mb": " MiB", "max_params": ""}[name]
    shown = "not measured" if measured is None else f"{measured:.4g}{unit} measured"
    return f"{name} ({shown} > {limit:.4g}{unit} limit)"


def choose_candidate(
    candidates: Sequence[MeasuredCandidate], profile: DeviceProfile, quality: Objective
) -> MeasuredCandidate:
    """The feasible candidate of best quality (ties: lower latency, then lower trial number).

    When none is feasible, raise ``DeploymentError`` naming the closest candidate (smallest total
    relative excess over its limits) and the limit it exceeds most.
    """
    if not candidates:
        raise DeploymentError(f"no candidates to choose from for profile {profile.name!r}", profile=profile.name)
    feasible = [c for c in candidates if c.feasible]
    if feasible:
        worst = -math.inf if quality.maximize else math.inf

        def key(c: MeasuredCandidate) -> tuple[float, float, int]:
            value = c.quality.get(quality.metric_key)
            score = worst if value is None else float(value)
            latency = c.measured.get("latency_ms")
            return (-score if quality.maximize else score, math.inf if latency is None else latency, c.trial)

        return min(feasible, key=key)
    closest = min(candidates, key=lambda c: (c.excess(), c.trial))
    ratios = {
        name: (math.inf if value is None else value / limit) for name, (value, limit) in closest.violations.items()
    }
    worst_limit = max(ratios, key=lambda n: ratios[n])
    exceeded = " and ".join(_limit_text(n, *closest.violations[n]) for n in sorted(ratios, key=lambda n: -ratios[n]))
    raise DeploymentError(
        f"no Pareto candidate meets device profile {profile.name!r} ({len(candidates)} measured on "
        f"{closest.measured.get('device', 'this machine')}): the closest, trial {closest.trial} "
        f"({_quality_text(closest, quality)}), exceeds {exceeded}",
        profile=profile.name,
        limit=worst_limit,
        trial=closest.trial,
    )


# ---------------------------------------------------------------------------------------------
# the pick


@dataclass
class DeploymentPick:
    """What ``pick_deployment`` chose and wrote."""

    profile: DeviceProfile
    trial: int
    config: dict[str, Any]
    quality: dict[str, float | None]
    measured: dict[str, Any]
    json_path: Path
    weights_path: Path
    onnx: dict[str, Any] | None
    candidates: list[MeasuredCandidate] = field(repr=False)
    skipped: dict[int, str] = field(default_factory=dict)  # Pareto trials not measured, and why


def _measure(model: nn.Module, profile: DeviceProfile, input_hw: tuple[int, int], in_channels: int) -> dict[str, Any]:
    from ehrsr.profiling import profile_model  # fvcore / ptflops, imported only when measuring

    threads, note = cpu_threads_for(profile)
    result = profile_model(
        model,
        (1, in_channels, *input_hw),
        device=profile.kind,
        dtype=profile.dtype,
        warmup=profile.warmup,
        repeats=profile.repeats,
        threads=threads,
    )
    data = result.to_dict()
    measured = {k: data[k] for k in PICK_MEASURED_KEYS if k in data}
    if profile.runtime == "onnxruntime":
        measured.update(_onnxruntime_latency(model, (1, in_channels, *input_hw), threads))
    if note:
        measured["note"] = note
    return measured


def _onnxruntime_latency(model: nn.Module, shape: tuple[int, ...], threads: int | None) -> dict[str, Any]:
    """The exported ONNX model timed through onnxruntime's CPU execution provider (a profile with
    ``runtime: onnxruntime``), with the protocol of ``profile_model`` (docs/latency_models.md)."""
    from ehrsr.profiling.onnx_runtime import time_model

    stats = time_model(reparameterize(model), "onnxruntime", shape, threads)
    return {"latency_ms": stats.latency_ms, "latency_ms_p10": stats.latency_ms_p10,
            "latency_ms_p90": stats.latency_ms_p90, "warmup": stats.warmup, "repeats": stats.repeats,
            "runtime": "onnxruntime"}


def cpu_threads_for(profile: DeviceProfile, cores: int | None = None) -> tuple[int | None, str | None]:
    """Threads to time a CPU profile with, and a note when this machine cannot honour it.

    More threads than cores makes every pass wait on descheduled threads (timings several times
    too slow), so a profile asking for more threads than this machine has is timed with one thread
    per core and the pick says so; run ``deploy`` on the target device for the real figure."""
    if profile.kind != "cpu" or profile.threads is None:
        return None, None
    cores = cores or os.cpu_count() or 1
    if profile.threads <= cores:
        return profile.threads, None
    return cores, (
        f"profile {profile.name!r} asks for {profile.threads} threads but this machine has {cores} cores: "
        f"timed with {cores} threads"
    )


def _export_pick_onnx(deploy: nn.Module, input_hw: tuple[int, int], path: Path, name: str | None) -> dict[str, Any]:
    """The pick's ONNX file with dynamic batch, height and width (``export_onnx_dynamic``), checked
    with onnxruntime against PyTorch at the profile's size and at odd sizes; when the network cannot
    be exported dynamically, a fixed-size file with the modules to blame and the tiling helper."""
    result = export_onnx_dynamic(deploy, path, example_hw=input_hw)
    if name is not None:
        if result.dynamic:
            state = f"dynamic sizes, checked at {', '.join(result.checks)} (max abs diff {result.max_abs_diff:.2g})"
        else:
            state = (f"fixed size {input_hw[0]}x{input_hw[1]} ({result.problem}); run other sizes with "
                     f"tiled_onnx_inference")
        print(f"[deploy {name}] ONNX: {'passed' if result.passed else 'FAILED'}: {state}", file=sys.stderr)
    return result.to_dict()


def pick_deployment(
    study: optuna.Study,
    profile: DeviceProfile | str,
    out_dir: str | Path,
    *,
    weights_root: str | Path,
    onnx: bool = False,
    devices_path: str | Path | None = None,
    progress: bool = True,
) -> DeploymentPick:
    """Re-profile the study's Pareto trials on this machine for ``profile`` and write the pick.

    ``out_dir`` is the study's report folder: the pick goes to ``out_dir/deploy/<profile>.json``
    and ``.safetensors`` (and ``.onnx`` with ``onnx=True``). ``weights_root`` is the folder the
    trials' ``weights`` paths are relative to (``reports/<study>/``). Quality is the study's first
    quality objective (PSNR unless the study optimises SSIM or LPIPS first).

    Raises ``DeviceProfileError`` (unknown or invalid profile, a cuda profile without CUDA) and
    ``DeploymentError`` (no trial meets the limits: names the limit excluding the closest one).
    """
    profile = resolve_profile(profile, devices_path)
    plan = plan_latency(profile, dict(study.user_attrs))
    if plan.mode == "measured":
        check_device_available(profile)
    elif progress:
        print(f"[deploy {profile.name}] {plan.why}", file=sys.stderr)
    info = StudyInfo.from_study(study)
    quality = info.quality_objective
    input_hw = profile.lr_input_size(info.scale)
    front = sorted(front_trials(study), key=lambda t: t.number)
    if not front:
        raise DeploymentError(
            f"study {study.study_name!r} has no finished feasible trial, so no deployment candidate",
            profile=profile.name,
        )
    weights_root = Path(weights_root)
    limits = profile.limits()
    if plan.mode == "predicted":  # nothing runs here: memory is not known, latency is predicted
        limits.pop("max_memory_mb", None)
    candidates: list[MeasuredCandidate] = []
    skipped: dict[int, str] = {}
    for trial in front:
        config = trial.user_attrs.get(TRIAL.config)
        weights = trial.user_attrs.get(TRIAL.weights)
        if not config or not weights:
            skipped[trial.number] = "the trial records no configuration or weights file"
            continue
        try:  # a stored path leading out of the study folder is refused before anything is opened
            path = path_inside(weights_root, weights, f"trial {trial.number}'s weights")
        except PathOutsideFolder as exc:
            skipped[trial.number] = str(exc)
            continue
        if not path.is_file():
            skipped[trial.number] = f"weights file {path} is missing"
            continue
        try:
            model = load_trained_model(config, path)
        except ValueError as exc:  # a damaged file must not hide the other candidates
            skipped[trial.number] = str(exc)
            continue
        predicted_ms = plan.predict(config, input_hw)
        if plan.mode == "predicted":
            if predicted_ms is None:
                skipped[trial.number] = "its latency model lacks some of its units (cannot predict; deploy on the device)"
                continue
            measured = _predicted_measure(trial, profile, predicted_ms)
            candidates.append(MeasuredCandidate(trial.number, dict(config), _trial_quality(trial), measured,
                                                _violations(measured, limits)))
            continue
        if progress:
            print(f"[deploy {profile.name}] profiling trial {trial.number} at {input_hw[0]}x{input_hw[1]} "
                  f"on {profile.kind} ({profile.dtype})", file=sys.stderr)
        try:
            measured = _measure(model, profile, input_hw, model.config.in_channels)
            if predicted_ms is not None:
                measured["latency_ms_predicted"] = predicted_ms
        except torch.cuda.OutOfMemoryError:
            # too big for this device at this size: it cannot be deployed here, the others may be
            del model
            torch.cuda.empty_cache()
            skipped[trial.number] = f"out of GPU memory at {input_hw[0]}x{input_hw[1]} ({profile.dtype})"
            continue
        metrics = trial.user_attrs.get(TRIAL.metrics) or {}
        candidates.append(
            MeasuredCandidate(
                trial=trial.number,
                config=dict(config),
                quality={k: metrics.get(k) for k in QUALITY_METRICS},
                measured=measured,
                violations=_violations(measured, limits),
            )
        )
    if not candidates:
        reasons = "; ".join(f"trial {n}: {why}" for n, why in skipped.items())
        raise DeploymentError(
            f"none of the {len(front)} Pareto trials of {study.study_name!r} can be deployed: {reasons}",
            profile=profile.name,
        )
    try:
        chosen = choose_candidate(candidates, profile, quality)
    except DeploymentError as exc:
        if exc.trial is None:
            raise
        raise DeploymentError(
            f"{exc}; to train that closest trial anyway: "
            f"{train_command(study.study_name, exc.trial, Path(out_dir).parent)}",
            profile=exc.profile, limit=exc.limit, trial=exc.trial,
        ) from None
    latency_record = _latency_record(plan, candidates, chosen, profile, quality, limits)

    deploy_dir = Path(out_dir) / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    model = load_trained_model(chosen.config, path_inside(weights_root, front_weights(front, chosen.trial),
                                                          f"trial {chosen.trial}'s weights"))
    deploy = reparameterize(model)
    weights_path = deploy_dir / f"{profile.name}.safetensors"
    save_file(
        fused_state(deploy),
        str(weights_path),
        metadata={"format": "pt", "form": "deploy (ehrsr.reparameterize)", "trial": str(chosen.trial),
                  "config": json.dumps(chosen.config)},
    )
    onnx_result = None
    if onnx:
        onnx_result = _export_pick_onnx(deploy, tuple(input_hw), deploy_dir / f"{profile.name}.onnx",
                                        profile.name if progress else None)

    json_path = deploy_dir / f"{profile.name}.json"
    record = {
        "profile": profile.to_dict(),
        "study": study.study_name,
        "trial": chosen.trial,
        "config": chosen.config,
        "train": next(t for t in front if t.number == chosen.trial).user_attrs.get(TRIAL.train),
        "quality": {
            **chosen.quality,
            "objective": quality.name,
            "conventions": {k: v for k, v in info.conventions.items() if k in QUALITY_METRICS},
            "measured_in": "the search (brief training, float32)",
        },
        "measured": chosen.measured,
        "limits": limits,
        "where": {
            "device": chosen.measured.get("device"),
            "device_kind": profile.kind,
            "host": platform.node(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ehrsr_version": ehrsr.__version__,
            "torch_version": torch.__version__,
        },
        "weights": weights_path.name,
        "weights_form": "deploy: fused by ehrsr.reparameterize; load with ehrsr.reports.load_deployed_model",
        "onnx": onnx_result,
        "latency": latency_record,
        "candidates": [
            {
                "trial": c.trial,
                "quality": c.quality,
                "measured": {k: c.measured.get(k) for k in ("latency_ms", "peak_memory_mb", "params_deploy", "macs")},
                **_latency_pair(c, plan),
                "violations": {k: {"measured": v, "limit": lim} for k, (v, lim) in c.violations.items()},
            }
            for c in candidates
        ],
        "skipped": {str(k): v for k, v in skipped.items()},
        "next_step": (
            "These weights come from the search's brief training: train this configuration fully "
            "(long schedule, full training set) before deploying it."
        ),
    }
    json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return DeploymentPick(
        profile=profile,
        trial=chosen.trial,
        config=chosen.config,
        quality=chosen.quality,
        measured=chosen.measured,
        json_path=json_path,
        weights_path=weights_path,
        onnx=onnx_result,
        candidates=candidates,
        skipped=skipped,
    )


def _trial_quality(trial: optuna.trial.FrozenTrial) -> dict[str, float | None]:
    metrics = trial.user_attrs.get(TRIAL.metrics) or {}
    return {k: metrics.get(k) for k in QUALITY_METRICS}


def _predicted_measure(trial: optuna.trial.FrozenTrial, profile: DeviceProfile, predicted_ms: float) -> dict[str, Any]:
    """A candidate's costs when nothing is measured here: the predicted latency and the counts the
    search stored (parameters do not depend on the input size; MACs are at the search's size)."""
    metrics = trial.user_attrs.get(TRIAL.metrics) or {}
    return {"latency_ms": predicted_ms, "latency_source": "predicted", "peak_memory_mb": None,
            "params_deploy": metrics.get("params_deploy"), "params": metrics.get("params"),
            "device": f"{profile.name} (predicted by its latency model)", "dtype": profile.dtype,
            "threads": profile.threads}


def _latency_pair(candidate: MeasuredCandidate, plan: LatencyPlan) -> dict[str, Any]:
    """A candidate's predicted and measured latency side by side (None: not available)."""
    if plan.model is None:
        return {}
    if plan.mode == "predicted":
        return {"latency_ms_predicted": candidate.measured.get("latency_ms"), "latency_ms_measured": None}
    return {"latency_ms_predicted": candidate.measured.get("latency_ms_predicted"),
            "latency_ms_measured": candidate.measured.get("latency_ms")}


def _latency_record(plan: LatencyPlan, candidates: Sequence[MeasuredCandidate], chosen: MeasuredCandidate,
                    profile: DeviceProfile, quality: Objective, limits: Mapping[str, float]) -> dict[str, Any]:
    """How the pick got its latencies; on the device with a model, whether predictions would have
    picked the same trial."""
    record = plan.to_dict()
    if plan.mode == "predicted":
        record["memory_limit"] = "not checked: nothing runs on this machine in predicted mode"
    if plan.model is None or plan.mode == "predicted":
        return record
    as_predicted = []
    for c in candidates:
        predicted = c.measured.get("latency_ms_predicted")
        if predicted is None:
            continue
        costs = {**c.measured, "latency_ms": predicted}
        as_predicted.append(MeasuredCandidate(c.trial, c.config, c.quality, costs, _violations(costs, limits)))
    try:
        by_prediction = choose_candidate(as_predicted, profile, quality).trial if as_predicted else None
    except DeploymentError:
        by_prediction = None
    record["pick_from_predictions"] = by_prediction
    record["pick_changed"] = by_prediction != chosen.trial
    return record


def front_weights(front: Sequence[optuna.trial.FrozenTrial], number: int) -> str:
    return next(t for t in front if t.number == number).user_attrs[TRIAL.weights]


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


