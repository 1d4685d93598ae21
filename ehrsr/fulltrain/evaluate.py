"""Evaluate saved SR weights on benchmark folders, printed as SR papers print it.

EHR-SR weights are rebuilt from the safetensors file (its metadata holds the configuration and
the form, ``train`` or ``deploy``), a configuration file beside it (``config.json``) or given, or
a deployment pick JSON. Any other checkpoint goes through spandrel, which recognises the common
SR architectures (EDSR, RCAN, SwinIR, SRVGGNet, SPAN, ...) from their state dicts. Everything is
measured by ``ehrsr.metrics.evaluate``: PSNR/SSIM on Y, crop = scale, MATLAB bicubic LR, large
images tiled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.files import path_inside
from ehrsr.fulltrain.recipe import FullTrainError

__all__ = ["EvalTable", "LoadedModel", "evaluate_model", "format_table", "load_model"]


@dataclass
class LoadedModel:
    model: nn.Module
    scale: int
    description: str  # "EHR-SR (deploy form) from ..." or "spandrel SPAN from ..."


@dataclass
class EvalTable:
    """Rows of the paper table: per method, per set, (PSNR, SSIM)."""

    scale: int
    sets: list[str]
    rows: dict[str, dict[str, tuple[float, float]]]  # method -> set -> (psnr, ssim)
    convention: str


class _SpandrelModel(nn.Module):
    """A spandrel model with the attributes ``ehrsr.metrics.evaluate`` reads (scale, size multiple)."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.net = descriptor.model
        self.scale = int(descriptor.scale)
        self.size_multiple = int(getattr(descriptor.size_requirements, "multiple_of", 1) or 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _ehrsr_from_state(state: dict[str, torch.Tensor], config: EHRSRConfig, form: str | None, where: str) -> nn.Module:
    from ehrsr.model import build_model, state_mismatch
    from ehrsr.reparam import reparameterize

    forms = [form] if form in ("train", "deploy") else ["train", "deploy"]
    errors = []
    for candidate in forms:
        model = build_model(config)
        if candidate == "deploy":
            model = reparameterize(model)
        mismatch = state_mismatch(model, state)
        if mismatch is None:
            model.load_state_dict(state, strict=True)
            return model.eval()
        errors.append(f"{candidate} form: {mismatch}")
    raise FullTrainError(f"{where}: the weights do not fit the configuration ({'; '.join(errors)})")


def _config_near(weights: Path, config_path: Path | None, metadata: dict[str, str]) -> EHRSRConfig | None:
    from ehrsr.fulltrain.source import load_config_file

    if config_path is not None:
        return load_config_file(config_path).config
    if "config" in metadata:
        try:
            return EHRSRConfig.from_json(metadata["config"])
        except ValueError as exc:
            raise FullTrainError(f"{weights}: the configuration in its metadata is invalid: {exc}") from None
    beside = weights.parent / "config.json"
    return load_config_file(beside).config if beside.is_file() else None


def load_model(weights: Path, config: Path | None = None) -> LoadedModel:
    """EHR-SR (safetensors + configuration, or a pick JSON) or, failing that, spandrel."""
    if not weights.is_file():
        raise FullTrainError(f"weights file not found: {weights}")
    if weights.suffix == ".json":
        from ehrsr.fulltrain.source import config_from_pick

        pick = config_from_pick(weights)
        data = json.loads(weights.read_text())
        if "weights" not in data:
            raise FullTrainError(f"{weights} names no weights file")
        # a pick's weights are the fused deploy form, a file beside it: a path leading elsewhere is refused
        path = path_inside(weights.parent, data["weights"], f"{weights}: weights")
        return _load_ehrsr(path, pick.config, f"EHR-SR from {weights}", "deploy")
    if weights.suffix == ".safetensors":
        try:
            with safe_open(str(weights), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as exc:
            raise FullTrainError(f"cannot read weights {weights}: {type(exc).__name__}: {str(exc)[:200]}") from None
        ehrsr_config = _config_near(weights, config, metadata)
        if ehrsr_config is not None:
            form = metadata.get("form", "")
            form = "deploy" if form.startswith("deploy") else "train" if form == "train" else None
            return _load_ehrsr(weights, ehrsr_config, f"EHR-SR from {weights}", form)
    elif config is not None:
        raise FullTrainError(f"--config is for EHR-SR safetensors weights; {weights} is read by spandrel")
    return _load_spandrel(weights)


def _load_ehrsr(path: Path, config: EHRSRConfig, description: str, form: str | None = None) -> LoadedModel:
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise FullTrainError(f"cannot read weights {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return LoadedModel(_ehrsr_from_state(state, config, form, str(path)), config.scale, description)


def _load_spandrel(path: Path) -> LoadedModel:
    try:
        import spandrel
    except ImportError:
        raise FullTrainError(f"{path} is not EHR-SR weights (no configuration found); reading other "
                             "architectures needs spandrel: pip install 'ehrsr[baselines]'") from None
    try:
        descriptor = spandrel.ModelLoader().load_from_file(str(path))
    except Exception as exc:
        raise FullTrainError(f"{path}: spandrel cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise FullTrainError(f"{path}: spandrel reads it as {type(descriptor).__name__}, not an image-to-image model")
    descriptor.model.eval()
    return LoadedModel(_SpandrelModel(descriptor).eval(), int(descriptor.scale),
                       f"{descriptor.architecture.name} (spandrel) from {path}")


def evaluate_model(
    loaded: LoadedModel,
    val_sets: list[tuple[str, Any]],
    *,
    device: str = "cpu",
    method: str | None = None,
    bicubic: bool = True,
) -> EvalTable:
    """PSNR/SSIM of ``loaded`` (and of bicubic) on every set, with ``ehrsr.metrics.evaluate``."""
    from ehrsr.metrics import bicubic_baseline, evaluate

    method = method or loaded.description.split(" from ")[0]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    convention = ""
    model = loaded.model.to(device)
    for name, val_set in val_sets:
        crop = val_set.scale if val_set.scale > 1 else 0
        if bicubic:
            base = bicubic_baseline(val_set, crop_border=crop)
            rows.setdefault("Bicubic", {})[name] = (base.psnr, base.ssim)
        result = evaluate(model, val_set, crop_border=crop, device=device)
        rows.setdefault(method, {})[name] = (result.psnr, result.ssim)
        convention = result.convention
    return EvalTable(loaded.scale, [n for n, _ in val_sets], rows, convention)


def format_table(table: EvalTable) -> str:
    """``| Method | Scale | Set5 | ... |`` with ``PSNR/SSIM`` cells, as SR papers print them."""
    head = f"| Method | Scale | {' | '.join(table.sets)} |"
    lines = [head, "|" + "---|" * (2 + len(table.sets))]
    for method, cells in table.rows.items():
        values = " | ".join(f"{cells[s][0]:.2f}/{cells[s][1]:.4f}" if s in cells else "-" for s in table.sets)
        lines.append(f"| {method} | x{table.scale} | {values} |")
    lines.append(f"PSNR (dB)/SSIM: {table.convention}; LR by MATLAB-compatible bicubic")
    return "\n".join(lines)
