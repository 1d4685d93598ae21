"""Full training of one EHR-SR configuration: EMA, checkpoints, exact resume, validation, export.

The loop is the brief-training loop of ``ehrsr.training`` grown into a long run: the same patch
sampler, losses and divergence checks, plus an exponential moving average of the weights (which
is what gets validated and exported, as in BasicSR / neosr), atomic checkpoints holding every
random state (a run killed at any moment resumes bit for bit on the CPU), validation on every
named set with a CSV and a curve, TensorBoard curves (``ehrsr.fulltrain.curves``), the best
weights kept, and at the end the fused deploy form, an optional ONNX file and a model card
(``docs/full_training.md``). Ctrl-C or SIGTERM stops the run after the step in progress and writes a
checkpoint there (``ehrsr.interrupts.deferred_stop``).

Run folder (``--out``)::

    recipe.yaml  config.json              what is trained, how
    checkpoints/last.pt                   the latest checkpoint (torch.load(weights_only=True))
    validation.csv  validation.png        PSNR/SSIM of the EMA weights per set, every val_every steps
    events.out.tfevents.*                 TensorBoard curves (loss, learning rate, validation, speed)
    best.safetensors  best.json           EMA weights with the best PSNR on the first set
    model.safetensors                     final EMA weights (training form; build_model(config))
    model_deploy.safetensors              the same fused by ehrsr.reparameterize (what to deploy)
    model.onnx                            with --onnx (dynamic sizes where the modules allow)
    evaluation.json  MODEL.md             final numbers and the model card
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.data import TaskConfig, ValSet
from ehrsr.files import check_writable, hold_lock, write_text_atomically
from ehrsr.fulltrain.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomically,
    save_weights,
)
from ehrsr.fulltrain.curves import TrainingCurves
from ehrsr.fulltrain.data import ValData, prepare_sets
from ehrsr.fulltrain.ema import ModelEMA
from ehrsr.fulltrain.recipe import FullTrainError, Recipe
from ehrsr.interrupts import deferred_stop
from ehrsr.model import build_model
from ehrsr.training import TrainingOutOfMemory, finite_step, is_out_of_memory, loss_function

__all__ = ["FullTrainResult", "FullTrainSettings", "full_train"]

CHECKPOINT_NAME = "checkpoints/last.pt"
LOCK_NAME = ".lock"  # held by the process training into the folder (ehrsr.files.hold_lock)


@dataclass(frozen=True)
class FullTrainSettings:
    """Everything ``full_train`` needs; the CLI builds it from its flags."""

    config: EHRSRConfig
    recipe: Recipe
    out_dir: Path
    train_data: Path | None = None  # HR folder; None = the built-in sample images
    val_data: tuple[ValData, ...] = ()  # empty = the built-in validation images
    task: TaskConfig | None = None  # None = x{config.scale} SR (MATLAB bicubic)
    device: str = "cpu"
    resume: bool = False  # True: a checkpoint must exist; False: one is used if it exists
    onnx: bool = False
    source: str = ""  # where the configuration came from (pick, file, study trial), for the card
    cache_dir: Path | None = None
    lpips_weights: Path | None = None
    latency_budget_s: float | None = None  # seconds of timed passes for the card's latency (None: 1 s)
    progress: bool = True
    log_every: int = 100  # steps between TensorBoard points (BasicSR's print_freq); checkpoints close one too
    stop_after: int | None = None  # stop (as if killed) after this many steps of this call; tests use it
    finish: bool = True  # False: end at the last checkpoint, without exports and card (benchmarks, tests)


@dataclass
class FullTrainResult:
    out_dir: Path
    steps_done: int
    finished: bool
    resumed_from: int | None
    best_step: int | None
    best_psnr: float | None
    evaluation: dict[str, Any] = field(default_factory=dict)  # evaluation.json's content once finished
    steps_per_second: float = math.nan
    card_path: Path | None = None
    interrupted_by: str | None = None  # "Ctrl-C" or "SIGTERM": stopped there, checkpoint written at steps_done


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # no weight decay on biases, norms and learned scalars (the usual practice)
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=recipe.lr, betas=tuple(recipe.betas), foreach=True)


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(stored) | set(current))
            if stored.get(k) != current.get(k)]


def _validate(model: nn.Module, sets: list[tuple[str, ValSet]], device: torch.device, lpips: Any = None) -> dict[str, Any]:
    from ehrsr.metrics import evaluate

    results = {}
    for name, val_set in sets:
        crop = val_set.scale if val_set.scale > 1 else 0
        result = evaluate(model, val_set, crop_border=crop, device=device, lpips=lpips)
        results[name] = result
    return results


def _write_curve(out_dir: Path, rows: list[dict[str, Any]], set_names: list[str]) -> None:
    with io.StringIO() as buffer:
        writer = csv.DictWriter(buffer, fieldnames=["step", "set", "psnr", "ssim", "lr", "loss"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in writer.fieldnames})
        write_text_atomically(out_dir / "validation.csv", buffer.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name in set_names:
        points = [(r["step"], r["psnr"]) for r in rows if r["set"] == name]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("PSNR (dB, Y, EMA weights)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_atomically(figure, out_dir / "validation.png", save=lambda f, p: f.savefig(p, format="png", dpi=100))
    plt.close(figure)


def full_train(settings: FullTrainSettings) -> FullTrainResult:
    """Train ``settings.config`` with ``settings.recipe`` into ``settings.out_dir`` (resuming the
    run already there), then export and write the model card. Bad input raises ``FullTrainError``
    (or another ``UserError``); nothing already in the folder is overwritten before the run is
    known to be the same one. The run holds the folder's lock (``LOCK_NAME``) throughout: a second
    run into the same folder stops at once with one line."""
    out_dir = Path(settings.out_dir)
    check_writable(out_dir)
    with hold_lock(out_dir / LOCK_NAME, hint="; wait for that run to end or choose another --out"):
        return _train_locked(settings)


def _train_locked(settings: FullTrainSettings) -> FullTrainResult:
    recipe, config, out_dir = settings.recipe, settings.config, Path(settings.out_dir)
    task = settings.task or TaskConfig(task="sr" if config.scale > 1 else "denoise", scale=config.scale)
    if task.scale != config.scale:
        raise FullTrainError(f"the configuration is x{config.scale} but the data task is x{task.scale}")
    if settings.log_every < 1:
        raise FullTrainError(f"log_every must be at least 1 step, got {settings.log_every}")
    checkpoint_path = out_dir / CHECKPOINT_NAME
    checkpoint = None
    if checkpoint_path.exists() or settings.resume:
        checkpoint = load_checkpoint(checkpoint_path)
        changed = _differences(checkpoint["recipe"], recipe.to_dict()) + _differences(checkpoint["config"], config.to_dict())
        if changed:
            raise FullTrainError(
                f"{out_dir} holds a run with other settings ({'; '.join(changed[:3])}); "
                "resume with the same configuration and recipe, or choose another --out"
            )
    device = torch.device(settings.device)
    train_set, val_sets = prepare_sets(task, settings.train_data, settings.val_data, cache_dir=settings.cache_dir,
                                       progress=settings.progress)
    if train_set.scale != config.scale:
        raise FullTrainError(f"the configuration is x{config.scale} but the training data is x{train_set.scale}")
    if recipe.patch_size > train_set.max_patch_size:
        raise FullTrainError(f"patch_size {recipe.patch_size} exceeds the largest LR patch the training images "
                             f"allow ({train_set.max_patch_size}); set a smaller patch_size")
    if checkpoint is None:
        write_text_atomically(out_dir / "recipe.yaml", recipe.to_yaml())
        write_text_atomically(out_dir / "config.json", config.to_json(indent=2) + "\n")

    is_cuda = device.type == "cuda"
    amp = recipe.amp == "bf16" or (recipe.amp == "auto" and is_cuda)
    channels_last = recipe.channels_last == "on" or (recipe.channels_last == "auto" and is_cuda)
    torch.manual_seed(recipe.seed)  # the initial weights
    model = build_model(config).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model, recipe.ema_decay, warmup=recipe.ema_warmup) if recipe.ema_decay > 0 else None
    optimizer = _optimizer(model, recipe)
    if is_cuda:
        train_set.to(device)  # patches are cut on the GPU
    sampler = torch.Generator(device=train_set.device).manual_seed(recipe.seed)
    step, rows, best = 0, [], {"step": None, "psnr": None}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
            ema.updates = int(checkpoint["ema_updates"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng(checkpoint["rng"], sampler)
        step = int(checkpoint["step"])
        rows, best = list(checkpoint["history"]), dict(checkpoint["best"])
    resumed_from = step if checkpoint is not None else None
    evaluated = ema.module if ema is not None else model
    criterion = loss_function(recipe.loss)
    has_aux = callable(getattr(model, "aux_loss", None))
    set_names = [name for name, _ in val_sets]

    def save_checkpoint() -> None:
        payload = {
            "format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else {}, "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": optimizer.state_dict(),
            # the schedule is a pure function of the step; its state is the step and its definition
            "scheduler": {"schedule": recipe.schedule, "step": step, "lr": recipe.learning_rate(max(0, step - 1))},
            "rng": capture_rng(sampler), "recipe": recipe.to_dict(), "config": config.to_dict(),
            "history": rows, "best": best,
        }
        save_atomically(payload, checkpoint_path)

    bar = None
    if settings.progress and step < recipe.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, initial=step, desc="full training", unit="step", file=sys.stderr)
    curves = TrainingCurves(out_dir, start_step=step, cuda_device=device if is_cuda else None)
    model.train()
    interval_loss, interval_count = 0.0, 0
    steps_this_call, start = 0, time.perf_counter()
    checkpointed, current_lr = step, recipe.learning_rate(max(0, step - 1))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(curves.close)
        # Ctrl-C / SIGTERM only set `stop`: the checkpoint written below holds whole steps
        stop = cleanup.enter_context(deferred_stop())
        while step < recipe.steps:
            if stop.requested:
                curves.close_point(step, current_lr)
                if checkpointed != step:
                    curves.flush()
                    save_checkpoint()
                break
            if settings.stop_after is not None and steps_this_call >= settings.stop_after:
                break
            step_start = time.perf_counter()
            current_lr = recipe.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            try:
                lr_patch, hr_patch = train_set.sample(recipe.batch_size, recipe.patch_size, sampler, device)
                if channels_last:
                    lr_patch = lr_patch.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    total = criterion(model(lr_patch).float(), hr_patch)
                    if has_aux:
                        total = total + model.aux_loss().float()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if recipe.grad_clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise TrainingOutOfMemory(recipe.batch_size, recipe.patch_size, device, step + 1) from None
                raise
            loss_value, norm_value = finite_step(step, total, grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            steps_this_call += 1
            curves.add_step(loss_value, norm_value, time.perf_counter() - step_start)
            interval_loss += loss_value
            interval_count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{current_lr:.2e}", refresh=False)
            if step % recipe.val_every == 0 or step == recipe.steps:
                results = _validate(evaluated, val_sets, device)
                mean_loss = interval_loss / max(1, interval_count)
                interval_loss, interval_count = 0.0, 0
                for name, result in results.items():
                    rows.append({"step": step, "set": name, "psnr": result.psnr, "ssim": result.ssim,
                                 "lr": current_lr, "loss": mean_loss})
                _write_curve(out_dir, rows, set_names)
                curves.validation(step, results)
                first = results[set_names[0]].psnr
                if best["psnr"] is None or first > best["psnr"]:
                    best = {"step": step, "psnr": first, "set": set_names[0]}
                    save_weights(evaluated, out_dir / "best.safetensors", config, "train")
                    write_text_atomically(out_dir / "best.json", json.dumps(best, indent=2) + "\n")
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{n} {r.psnr:.3f} dB" for n, r in results.items()))
                model.train()
            checkpoint_due = step % recipe.checkpoint_every == 0 or step == recipe.steps
            if checkpoint_due or step % settings.log_every == 0:
                curves.close_point(step, current_lr)
            if checkpoint_due:
                curves.flush()  # the curves up to the checkpoint are on disk before it is
                save_checkpoint()
                checkpointed = step
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    steps_per_second = steps_this_call / elapsed if elapsed > 0 and steps_this_call else math.nan
    result = FullTrainResult(out_dir, step, step >= recipe.steps, resumed_from, best["step"], best["psnr"],
                             steps_per_second=steps_per_second, interrupted_by=stop.name)
    if step < recipe.steps or not settings.finish or stop.requested:
        # stopped before the end (signal, stop_after), or a signal during the last step: the
        # checkpoint written last resumes it (a finished run's rerun writes the exports and card)
        return result
    from ehrsr.fulltrain.card import finish_run

    result.evaluation, result.card_path = finish_run(settings, task, evaluated, val_sets, best, steps_per_second)
    return result
