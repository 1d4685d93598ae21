"""Checkpoints and weight files of a full-training run: written atomically (``ehrsr.files``),
checkpoints read with ``torch.load(weights_only=True)``.

A checkpoint holds everything the next step depends on, so a run resumed from it continues
bit for bit like one that was never stopped (on the CPU; CUDA kernels are not all deterministic):
the model, the EMA weights, the optimizer's moments, the schedule position, every random state
(torch CPU and CUDA, numpy, Python, the patch sampler's generator), the recipe, the configuration
and the validation history. Random states are stored as tensors and plain Python values because
``weights_only`` loading accepts nothing else, which is what makes loading an untrusted file safe.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.deploy.export import fused_state
from ehrsr.files import write_atomically
from ehrsr.fulltrain.recipe import FullTrainError

__all__ = ["CHECKPOINT_FORMAT", "capture_rng", "load_checkpoint", "restore_rng", "save_atomically", "save_weights"]

CHECKPOINT_FORMAT = 1  # bump when the layout changes; older files are refused with a clear message
_REQUIRED = ("format", "step", "model", "ema", "ema_updates", "optimizer", "scheduler", "rng", "recipe", "config")


def capture_rng(sampler: torch.Generator) -> dict[str, Any]:
    """Every random state the training step reads, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(v) for v in mt_state], "gauss_next": gauss_next},
        "sampler": sampler.get_state(),
        "sampler_device": str(sampler.device),
    }


def restore_rng(state: dict[str, Any], sampler: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    sampler.set_state(state["sampler"])


def save_atomically(payload: Any, path: Path, *, save=torch.save) -> None:
    """``save(payload, file)`` through ``ehrsr.files.write_atomically``: a kill at any moment
    leaves either the previous file or the new one, never half of one."""
    write_atomically(path, lambda temporary: save(payload, temporary))


def save_weights(model: nn.Module, path: Path, config: EHRSRConfig, form: str) -> None:
    """Safetensors with the configuration and the form (``train`` or ``deploy``) in the metadata,
    so ``run_search.py evaluate --weights`` can rebuild the network from the file alone."""
    metadata = {"format": "pt", "form": form, "config": config.to_json()}
    save_atomically(fused_state(model), path, save=lambda state, p: save_file(state, str(p), metadata=metadata))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely; a missing, damaged or foreign file raises ``FullTrainError``."""
    if not path.is_file():
        raise FullTrainError(f"no checkpoint to resume from: {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FullTrainError(f"checkpoint {path} is damaged or not a checkpoint ({type(exc).__name__}: {detail[:200]})") from None
    if not isinstance(data, dict) or any(key not in data for key in _REQUIRED):
        raise FullTrainError(f"checkpoint {path} is not a full-training checkpoint (keys missing)")
    if data["format"] != CHECKPOINT_FORMAT:
        raise FullTrainError(f"checkpoint {path} has format {data['format']}, this version reads {CHECKPOINT_FORMAT}")
    return data
