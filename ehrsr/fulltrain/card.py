"""The end of a full-training run: exports, the final evaluation and the model card (MODEL.md).

The card's numbers are rendered from ``evaluation.json`` (written first), so the two never
disagree. Conventions: PSNR/SSIM on Y (BT.601) with ``crop_border = scale``, uint8-rounded,
LR by MATLAB-compatible bicubic (``ehrsr.metrics``); MACs by fvcore (one multiply-add = 1) of the
fused deploy form at the NTIRE efficient-SR size, a 1x3x256x256 LR input; latency is the median
of timed passes after warm-up, with the 10th / 90th percentiles, on the machine that trained.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import ehrsr
from ehrsr.data import TaskConfig, ValSet
from ehrsr.files import write_text_atomically
from ehrsr.fulltrain.checkpoint import save_weights

if TYPE_CHECKING:
    from ehrsr.fulltrain.loop import FullTrainSettings

__all__ = ["NTIRE_INPUT_SHAPE", "finish_run", "render_card"]

NTIRE_INPUT_SHAPE = (1, 3, 256, 256)  # the NTIRE efficient-SR challenges count MACs at this LR size


def _set_numbers(model: nn.Module, val_set: ValSet, device: torch.device, lpips: Any) -> dict[str, Any]:
    from ehrsr.metrics import bicubic_baseline, evaluate

    crop = val_set.scale if val_set.scale > 1 else 0
    result = evaluate(model, val_set, crop_border=crop, device=device, lpips=lpips)
    bicubic = bicubic_baseline(val_set, crop_border=crop, lpips=lpips)
    return {
        "images": len(val_set), "psnr": result.psnr, "ssim": result.ssim, "lpips": result.lpips,
        "bicubic": {"psnr": bicubic.psnr, "ssim": bicubic.ssim, "lpips": bicubic.lpips},
        "convention": result.convention, "description": getattr(val_set, "description", ""),
    }


def finish_run(
    settings: FullTrainSettings,
    task: TaskConfig,
    evaluated: nn.Module,
    val_sets: list[tuple[str, ValSet]],
    best: dict[str, Any],
    steps_per_second: float,
) -> tuple[dict[str, Any], Path]:
    """Write the final weights (training and deploy form), ONNX (``settings.onnx``), the final
    evaluation of the deploy form on every set next to bicubic, ``evaluation.json`` and MODEL.md."""
    from ehrsr.profiling import profile_model
    from ehrsr.reparam import reparameterize

    out_dir, config, recipe = Path(settings.out_dir), settings.config, settings.recipe
    device = torch.device(settings.device)
    save_weights(evaluated, out_dir / "model.safetensors", config, "train")
    deploy = reparameterize(evaluated).eval()
    save_weights(deploy, out_dir / "model_deploy.safetensors", config, "deploy")
    lpips = None
    lpips_note = "not measured (recipe lpips: false)"
    if recipe.lpips:
        from ehrsr.metrics import LPIPS, LPIPSUnavailable

        try:
            lpips = LPIPS(device, settings.lpips_weights, allow_download=False)
            lpips_note = "LPIPS alex v0.1 (pyiqa) on RGB"
        except LPIPSUnavailable as exc:
            lpips_note = f"not measured: {str(exc).splitlines()[0]}"
    sets = {name: _set_numbers(deploy, val_set, device, lpips) for name, val_set in val_sets}
    profile = profile_model(evaluated.to(device), NTIRE_INPUT_SHAPE, device=device, measure_memory=False,
                            latency_budget_s=settings.latency_budget_s)
    cost = {k: profile.to_dict()[k] for k in ("macs", "params", "params_deploy", "latency_ms", "latency_ms_p10",
                                              "latency_ms_p90", "device", "dtype", "threads", "repeats", "input_shape")}
    onnx = None
    if settings.onnx:
        from ehrsr.deploy.export import export_onnx_dynamic

        onnx = export_onnx_dynamic(deploy.to("cpu"), out_dir / "model.onnx").to_dict()
    evaluation = {
        "source": settings.source,
        "config": config.to_dict(),
        "recipe": recipe.to_dict(),
        "task": task.to_dict(),
        "steps": recipe.steps,
        "weights": "model.safetensors (EMA, training form); model_deploy.safetensors (fused)",
        "evaluated": "final EMA weights, deploy form" if recipe.ema_decay > 0 else "final weights, deploy form",
        "sets": sets,
        "lpips": lpips_note,
        "best": best,
        "cost": cost,
        "train_steps_per_second": steps_per_second,
        "onnx": onnx,
        "where": {"host": platform.node(), "device": cost["device"],
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "ehrsr_version": ehrsr.__version__, "torch_version": torch.__version__},
    }
    write_text_atomically(out_dir / "evaluation.json", json.dumps(evaluation, indent=2, default=str) + "\n")
    card = out_dir / "MODEL.md"
    write_text_atomically(card, render_card(evaluation))
    return evaluation, card


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_card(evaluation: dict[str, Any]) -> str:
    """MODEL.md from the content of ``evaluation.json``."""
    config, recipe, cost, task = evaluation["config"], evaluation["recipe"], evaluation["cost"], evaluation["task"]
    enabled = [m for m in ("wab", "ssm", "fsb", "moe", "repmix", "noise") if config[m]["enabled"]] or ["none"]
    scale = task["scale"]
    lines = [
        f"# EHR-SR x{scale}: {config['width']} channels, modules {', '.join(enabled)}",
        "",
        f"Source: {evaluation['source'] or 'a configuration file'}. Task: {TaskConfig.from_dict(task).describe()}.",
        f"Trained {evaluation['steps']} steps; evaluated: {evaluation['evaluated']}. "
        f"Best validation PSNR {_fmt(evaluation['best'].get('psnr'), 3)} dB at step {evaluation['best'].get('step')} "
        f"on {evaluation['best'].get('set')} (best.safetensors).",
        "",
        "## Quality",
        "",
        "PSNR (dB) / SSIM on Y (BT.601), crop_border = scale, uint8-rounded; LR by MATLAB-compatible bicubic. "
        f"LPIPS: {evaluation['lpips']}.",
        "",
        "| set | images | method | PSNR | SSIM | LPIPS |",
        "|---|---|---|---|---|---|",
    ]
    for name, numbers in evaluation["sets"].items():
        bicubic = numbers["bicubic"]
        lines.append(f"| {name} | {numbers['images']} | Bicubic | {_fmt(bicubic['psnr'], 2)} | {_fmt(bicubic['ssim'], 4)} "
                     f"| {_fmt(bicubic['lpips'], 4)} |")
        lines.append(f"| {name} | {numbers['images']} | EHR-SR | {_fmt(numbers['psnr'], 2)} | {_fmt(numbers['ssim'], 4)} "
                     f"| {_fmt(numbers['lpips'], 4)} |")
    shape = "x".join(map(str, cost["input_shape"]))
    lines += [
        "",
        "## Cost",
        "",
        f"- Parameters: {cost['params_deploy']:,} (deploy form; {cost['params']:,} while training)",
        f"- MACs: {cost['macs'] / 1e9:.3f} G at 1x3x256x256 LR (fvcore, one multiply-add = 1, deploy form)",
        f"- Latency: {cost['latency_ms']:.2f} ms median (p10 {cost['latency_ms_p10']:.2f}, p90 "
        f"{cost['latency_ms_p90']:.2f}; {cost['repeats']} timed passes after warm-up) at {shape}, {cost['dtype']}, "
        f"on {cost['device']} (the training machine; measure on the target with run_search.py deploy)",
    ]
    onnx = evaluation.get("onnx")
    if onnx:
        kind = "dynamic batch, height and width" if onnx["dynamic"] else f"fixed input {onnx['fixed_hw']}: use tiled_onnx_inference"
        lines.append(f"- ONNX: {onnx['path']} ({kind}; opset {onnx['opset']}; check vs PyTorch "
                     f"{'passed' if onnx['passed'] else 'FAILED'} at {', '.join(onnx['checks'])})")
        if onnx.get("blocking_modules"):
            lines.append(f"  - not dynamic because of: {'; '.join(f'{k}: {v}' for k, v in onnx['blocking_modules'].items())}")
    lines += [
        "",
        "## Recipe",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in recipe.items()],
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "## Files",
        "",
        "- `model_deploy.safetensors`: fused weights (`ehrsr.reparameterize(build_model(config))`), what to deploy",
        "- `model.safetensors`: EMA weights of the training form (`build_model(config)`), for fine-tuning",
        "- `config.json`, `recipe.yaml`, `validation.csv` / `validation.png`, `evaluation.json`",
        "",
        f"Measured {evaluation['where']['date']} on {evaluation['where']['host']} (ehrsr {evaluation['where']['ehrsr_version']}, "
        f"torch {evaluation['where']['torch_version']}).",
        "",
    ]
    return "\n".join(lines)
