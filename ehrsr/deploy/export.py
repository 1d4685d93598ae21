"""The deploy form of a trained configuration: loading weights, the fused (reparameterized)
network and its safetensors state, and an ONNX export checked against PyTorch on one input."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.model import build_model
from ehrsr.reparam import reparameterize

__all__ = ["ONNX_TOLERANCE", "export_onnx", "fused_state", "load_deployed_model", "load_trained_model"]

ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on one float32 input for the export to pass


# ---------------------------------------------------------------------------------------------
# models


def load_trained_model(config: EHRSRConfig | Mapping[str, Any], weights_path: str | Path) -> nn.Module:
    """The training-form network of a trial: ``build_model(config)`` with its safetensors weights
    (strict: every tensor must match)."""
    config = config if isinstance(config, EHRSRConfig) else EHRSRConfig.from_dict(dict(config))
    model = build_model(config)
    path = Path(weights_path)
    try:
        state = load_file(str(path))
    except (OSError, ValueError) as exc:  # safetensors raises its own error types (SafetensorError)
        raise ValueError(f"cannot read weights {path}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {path} do not fit the trial's configuration: {exc}") from None
    return model.eval()


def load_deployed_model(pick_json: str | Path) -> nn.Module:
    """The fused network of a deployment pick: ``reparameterize(build_model(config))`` with the
    pick's safetensors weights loaded (strict), in eval mode."""
    pick_json = Path(pick_json)
    data = json.loads(pick_json.read_text())
    deploy = reparameterize(build_model(EHRSRConfig.from_dict(data["config"])))
    state = load_file(str(pick_json.parent / data["weights"]))
    deploy.load_state_dict(state, strict=True)
    return deploy.eval()


def fused_state(deploy: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store an independent copy of each
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in deploy.state_dict().items()}



# ---------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    model: nn.Module, input_shape: Sequence[int], path: str | Path, *, exporter: str | None = None
) -> dict[str, Any]:
    """Export ``model`` (deploy form, float32, CPU) at a fixed ``input_shape`` and check it.

    ``exporter``: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``),
    ``"torchscript"`` (the tracing exporter), or None: dynamo when ``onnxscript`` is installed,
    else TorchScript. The shape is fixed because the network pads its input to size multiples
    computed in Python, which tracing records as constants. The file
    is validated with ``onnx.checker``; with ``onnxruntime`` installed it is also run on one
    seeded random input and compared with PyTorch (pass: max abs difference <= 1e-4). Returns a
    dict for the pick's JSON; a failed export is reported there (``error``), not raised, since
    the PyTorch pick stays valid.
    """
    import onnx  # the 'onnx' extra

    path = Path(path)
    result: dict[str, Any] = {"path": path.name, "input_shape": list(input_shape), "opset": None}
    model = model.to("cpu").float().eval()
    example = torch.rand(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    if exporter is None:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)

            # the dynamo exporter first; the tracing one when dynamo cannot convert an operator
            candidates = ["dynamo", "torchscript"]
        except ImportError:
            candidates = ["torchscript"]
    elif exporter in ("dynamo", "torchscript"):
        candidates = [exporter]
    else:
        raise ValueError(f"exporter must be 'dynamo', 'torchscript' or None (automatic), got {exporter!r}")
    errors = []
    for exporter in candidates:
        dynamo = exporter == "dynamo"
        result["exporter"] = exporter
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17)
            break
        except Exception as exc:
            # the exporters put whole graphs in their messages: keep the line that names the operator
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            named = [line for line in lines if "not supported" in line or "translating node" in line
                     or "unrecognized namespace" in line or "Failed to export" in line]
            message = (named or lines or [type(exc).__name__])[0]
            errors.append(f"{exporter}: export failed ({type(exc).__name__}): {message[:400]}")
            path.unlink(missing_ok=True)
    else:
        result["error"] = "; ".join(errors)
        return result
    if errors:
        result["fallback"] = errors[0]
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        result["checker"] = "passed"
        result["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    except Exception as exc:
        result["checker"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    try:
        import onnxruntime
    except ImportError:
        result["numeric_check"] = "skipped: needs onnxruntime (pip install onnxruntime)"
        return result
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})[:1]
    with torch.inference_mode():
        torch_out = model(example).numpy()
    diff = float(abs(onnx_out - torch_out).max())
    result["max_abs_diff"] = diff
    result["numeric_check"] = "passed" if diff <= ONNX_TOLERANCE else f"failed (max abs diff {diff:.3g} > {ONNX_TOLERANCE})"
    return result

