"""Studies with known trial values, written exactly as docs/study_schema.md says the search writes
them, for the report tests (tests/test_reports_*.py).

Configurations are sampled from the shipped ``tiny`` space through Optuna (so params, configs and
conditional parameters look like a real search's); the metrics are a known function of the
configuration plus seeded noise, so every number in a report can be recomputed in the test.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from safetensors.torch import save_file

from ehrsr import MODULE_TOGGLES, EHRSRConfig, build_model
from ehrsr.search.space import load_space
from ehrsr.study_schema import (
    CostLimits,
    DataRecord,
    DeviceRecord,
    EarlyStoppingRecord,
    ProfileRecord,
    SharesRecord,
    SpaceRecord,
    StudyRecord,
)

OBJECTIVE_KEYS = {
    "psnr": "psnr",
    "ssim": "ssim",
    "lpips": "lpips",
    "latency": "latency_ms",
    "macs": "macs",
    "params": "params_deploy",
    "memory": "peak_memory_mb",
}
DIRECTIONS = {"psnr": "maximize", "ssim": "maximize"}  # everything else is minimised

# what each module adds to the synthetic PSNR (dB) and latency (ms)
MODULE_PSNR = {"wab": 0.30, "ssm": 0.20, "fsb": 0.10, "moe": 0.15, "repmix": 0.05, "noise": 0.0}
MODULE_LATENCY = {"wab": 2.0, "ssm": 3.0, "fsb": 1.0, "moe": 1.5, "repmix": 0.5, "noise": 0.1}


def synthetic_metrics(config: EHRSRConfig, rng: random.Random, lpips: bool = False) -> dict[str, Any]:
    """Known metrics of a configuration (quality rises with width and modules, so does cost)."""
    on = config.enabled_modules()
    psnr = 26.0 + 0.03 * config.width + 0.2 * config.msg.levels + sum(MODULE_PSNR[m] for m in on)
    psnr += rng.gauss(0.0, 0.05)
    latency = 1.0 + 0.08 * config.width * (1 + config.trunk_blocks) + sum(MODULE_LATENCY[m] for m in on)
    latency *= 1.0 + rng.uniform(-0.02, 0.02)
    params = 1000 * config.width + 5000 * len(on) + 700 * config.trunk_blocks
    macs = params * 256 * 256 // 16
    return {
        "psnr": psnr,
        "ssim": 0.70 + (psnr - 26.0) / 40.0,
        "lpips": (0.40 - (psnr - 26.0) / 20.0) if lpips else None,
        "latency_ms": latency,
        "latency_ms_p10": latency * 0.97,
        "latency_ms_p90": latency * 1.04,
        "macs": macs,
        "macs_ptflops": macs,
        "params": params + 300,
        "params_deploy": params,
        "peak_memory_mb": 5.0 + 0.4 * config.width,
    }


def study_record(objectives: tuple[str, ...], space_name: str = "tiny", max_latency_ms: float | None = None,
                 scale: int = 4) -> StudyRecord:
    """A study record like the search writes for a CPU study of ``space_name``."""
    space = load_space(space_name)
    return StudyRecord(
        ehrsr_version="0.1.0",
        objectives=tuple(objectives),
        space=SpaceRecord(space.name, str(space.path), space.source_text),
        task={"task": "sr", "scale": scale, "noise_sigma": 0.0, "blur_sigma": 0.0, "jpeg_quality": None},
        data=DataRecord(None, None),
        device=DeviceRecord("cpu", "Test CPU, 2 threads"),
        profile=ProfileRecord((1, 3, 256, 256), "float32", 2, 0.25),
        limits=CostLimits(max_latency_ms=max_latency_ms),
        device_latency=(),
        devices_file=None,
        early_stopping=EarlyStoppingRecord(True, (20, 60, 180), 3),
        shares=SharesRecord(ablation=0.15, ablation_seeds="auto", baselines=None, baselines_share=0.1, fidelity=0.1,
                            fidelity_configs=8, fidelity_factor=4.0),
        sampler="tpe",
        seed=0,
        allow_repeats=False,
        cache_dir=None,
        train_settings_version=2,
    )


def study_attrs(objectives: tuple[str, ...], space_name: str = "tiny", max_latency_ms: float | None = None) -> dict:
    """The user attributes of a study created by the search (its record, and the budget)."""
    return {**study_record(objectives, space_name, max_latency_ms).to_attrs(), "budget": "trials=40"}


def make_study(
    root: Path,
    *,
    objectives: tuple[str, ...] = ("psnr", "latency"),
    n_trials: int = 24,
    seed: int = 0,
    max_latency_ms: float | None = None,
    weights: bool = False,
    lpips: bool = False,
    name: str = "demo",
    finished: bool = True,
) -> optuna.Study:
    """A study like the search writes: two references first, then sampled trials; every 6th
    sampled trial pruned, one diverged, refused samples failed; with ``weights`` each finished
    trial gets a safetensors file of a (randomly initialised) model under ``root/weights``.
    ``finished=False`` leaves no trial finished (only failed, pruned and running ones)."""
    storage = f"sqlite:///{root / 'study.db'}"
    directions = [DIRECTIONS.get(o, "minimize") for o in objectives]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    study.set_metric_names(list(objectives))
    for key, value in study_attrs(objectives, max_latency_ms=max_latency_ms).items():
        study.set_user_attr(key, value)
    # sample in memory (as the search's sampler would), store each finished trial in one write
    space = load_space("tiny")
    sampler_study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=seed))
    references = space.reference_params()
    for params in references.values():
        sampler_study.enqueue_trial(params)
    rng = random.Random(seed)
    reference_names = list(references)
    for index in range(n_trials + len(reference_names)):
        number = index  # trials are added in order, so numbers match
        trial = sampler_study.ask()
        sampled = space.suggest(trial, scale=4)
        frozen = sampler_study.trials[trial.number]  # [-1] would be a WAITING enqueued trial
        attrs: dict[str, Any] = {"device_kind": "cpu", "n_devices": 1, "device_name": "Test CPU"}
        if index < len(reference_names):
            attrs["reference"] = reference_names[index]
        record = {"params": frozen.params, "distributions": frozen.distributions, "user_attrs": attrs}
        if sampled.config is None:
            attrs.update(status="refused", reason=sampled.refused, refused=sampled.refused)
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, **record))
            continue
        config = sampled.config
        attrs["config"] = config.to_dict()
        attrs["train"] = {
            "lr": sampled.train.lr, "steps": 180, "batch_size": 8, "patch_size": 32, "loss": "l1", "seed": 0,
        }
        metrics = synthetic_metrics(config, rng, lpips=lpips)
        seconds = {"train": 10.0 + config.width / 4, "eval": 1.0, "profile": 2.0}
        seconds["total"] = sum(seconds.values())
        attrs.update(seconds=seconds, charged_seconds=seconds["total"])
        sampled_index = index - len(reference_names)
        if not finished or (sampled_index >= 0 and sampled_index % 6 == 5):
            attrs.update(status="pruned", reason="MO-ASHA: not in the top 1/3 at rung 0 (20 steps)", steps_done=20)
            attrs["rung_0"] = {"step": 20, "values": [metrics[OBJECTIVE_KEYS[o]] for o in objectives]}
            study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, **record))
            continue
        if sampled_index == 3:
            attrs.update(status="diverged", reason="loss became NaN at step 57", steps_done=57)
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, **record))
            continue
        attrs.update(metrics=metrics, steps_done=180, status="complete")
        constraints = None
        if max_latency_ms is not None:
            constraints = {"latency_ms": metrics["latency_ms"] - max_latency_ms}
        if weights:
            relative = f"weights/trial_{number}.safetensors"
            (root / "weights").mkdir(parents=True, exist_ok=True)
            model = build_model(config)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / relative))
            attrs["weights"] = relative
        values = [metrics[OBJECTIVE_KEYS[o]] for o in objectives]
        study.add_trial(
            optuna.trial.create_trial(state=TrialState.COMPLETE, values=values, constraints=constraints, **record)
        )
    # a trial still running when the report is written
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"status": "running"}))
    return study


def module_flags(config: dict[str, Any]) -> dict[str, bool]:
    return {m: bool(config[m]["enabled"]) for m in MODULE_TOGGLES}


def is_close(a: float, b: float, tol: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(a), abs(b))
