"""The deploy form of a trained configuration: loading weights, the fused (reparameterized)
network and its safetensors state, and its ONNX exports.

``export_onnx`` exports at one fixed input shape and checks it against PyTorch on one input.
``export_onnx_dynamic`` exports with a dynamic batch, height and width: EHR-SR pads its input to a
multiple of ``2 ** msg.levels`` (and attention to its window) with sizes computed in Python; the
dynamo exporter (``torch.onnx.export(dynamo=True, dynamic_shapes=...)``) keeps that arithmetic
symbolic, so one file serves any image size. Each export is run with onnxruntime at sizes other
than the export size, odd ones included, and compared with PyTorch. When a network cannot be
exported dynamically, the result says so and names the modules responsible (each enabled module is
tried alone in a small network), the file is exported at the fixed size instead, and
``tiled_onnx_inference`` runs that fixed-size file over any image in overlapping tiles.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.files import path_inside
from ehrsr.model import build_model, state_mismatch
from ehrsr.reparam import reparameterize

__all__ = [
    "CHECK_SIZES",
    "ONNX_TOLERANCE",
    "OnnxExport",
    "export_onnx",
    "export_onnx_dynamic",
    "fused_state",
    "load_deployed_model",
    "load_trained_model",
    "tiled_onnx_inference",
]

ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| (float32, outputs in [0, 1]) for an export to pass


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
    mismatch = state_mismatch(model, state)
    if mismatch is not None:
        raise ValueError(f"weights {path} do not fit the trial's configuration: {mismatch}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_deployed_model(pick_json: str | Path) -> nn.Module:
    """The fused network of a deployment pick: ``reparameterize(build_model(config))`` with the
    pick's safetensors weights (a file in the pick's folder, else ``PathOutsideFolder``) loaded
    (strict), in eval mode."""
    pick_json = Path(pick_json)
    data = json.loads(pick_json.read_text())
    deploy = reparameterize(build_model(EHRSRConfig.from_dict(data["config"])))
    state = load_file(str(path_inside(pick_json.parent, data["weights"], f"{pick_json}: weights")))
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


# ---------------------------------------------------------------------------------------------
# ONNX with dynamic sizes

CHECK_SIZES: tuple[tuple[int, int], ...] = ((61, 47), (33, 65))  # odd, neither a multiple of 2, 4 or 8
# The size a dynamic export is traced at. torch.export follows the Python branches of the example:
# traced at an even size, "pad to a multiple of 2 ** levels" is skipped and the graph then fails
# on odd sizes (measured: 32x32 -> onnxruntime refuses 61x47). An odd size takes every padding
# branch; padding by 0 at other sizes is exact.
TRACE_HW: tuple[int, int] = (45, 37)


@dataclass
class OnnxExport:
    """What ``export_onnx_dynamic`` wrote and how it was checked."""

    path: Path
    dynamic: bool  # True: batch, height and width are free; False: only ``fixed_hw`` is accepted
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    fixed_hw: tuple[int, int] | None  # the only input size of a fixed export
    checks: dict[str, float] = field(default_factory=dict)  # "BxHxW" -> max abs difference vs PyTorch
    passed: bool = False
    problem: str | None = None  # why the export is not dynamic (exporter message, or a mismatch)
    blocking_modules: dict[str, str] = field(default_factory=dict)  # module -> why it blocks a dynamic export

    @property
    def max_abs_diff(self) -> float | None:
        """The largest onnxruntime-vs-PyTorch difference over the checked sizes."""
        return max(self.checks.values()) if self.checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path.name, "dynamic": self.dynamic, "exporter": self.exporter, "opset": self.opset,
            "fixed_hw": list(self.fixed_hw) if self.fixed_hw else None, "checks": self.checks,
            "sizes_checked": list(self.checks), "max_abs_diff": self.max_abs_diff,
            "passed": self.passed, "problem": self.problem, "blocking_modules": self.blocking_modules,
            # a fixed-size file runs on other sizes tile by tile
            "tiling": None if self.dynamic else f"{__name__}.tiled_onnx_inference",
            "tolerance": ONNX_TOLERANCE,
        }


def _first_line(exc: BaseException) -> str:
    """The line that says why: the exporters wrap the real error (often several levels deep) in a
    banner, so the innermost cause is read first."""
    causes = [exc]
    while causes[-1].__cause__ is not None and len(causes) < 10:
        causes.append(causes[-1].__cause__)
    for error in reversed(causes):
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and "step 1/3" not in line]
        named = [line for line in lines if "not supported" in line or "Unsupported" in line
                 or "Constraints violated" in line or "data-dependent" in line or "guard" in line.lower()]
        if named or lines:
            return f"{type(error).__name__}: {(named or lines)[0][:300]}"
    return type(exc).__name__


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> str:
    """Export and return the exporter used; raises what the exporter raised."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if dynamic:
            batch, height, width = (torch.export.Dim.DYNAMIC,) * 3
            # an example batch of 1 would make torch.export specialise the batch dimension to 1
            example = example.expand(2, *example.shape[1:]).contiguous()
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, opset_version=opset,
                input_names=["lr"], output_names=["sr"],
                dynamic_shapes=({0: batch, 2: height, 3: width},),
            )
            return "dynamo"
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=["lr"], output_names=["sr"])
            return "dynamo"
        except Exception:
            # the tracing exporter converts some operators the dynamo one cannot (deploy.export_onnx does the same)
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=min(opset, 17),
                              input_names=["lr"], output_names=["sr"])
            return "torchscript"


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _compare(model: nn.Module, session: Any, shapes: Sequence[tuple[int, ...]]) -> dict[str, float]:
    """Max abs difference onnxruntime vs PyTorch per input shape; a shape onnxruntime refuses is inf."""
    out: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.rand(shape, generator=generator)
        key = "x".join(map(str, shape))
        try:
            (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
        except Exception:
            out[key] = float("inf")
            continue
        with torch.inference_mode():
            reference = model(x).numpy()
        out[key] = float(np.abs(onnx_out - reference).max()) if onnx_out.shape == reference.shape else float("inf")
    return out


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _blocking_modules(model: nn.Module, example_hw: tuple[int, int], opset: int, folder: Path) -> dict[str, str]:
    """Export each enabled EHR-SR module alone (width 8, one level) dynamically; say which fail."""
    from ehrsr.config import EHRSRConfig
    from ehrsr.model import build_model
    from ehrsr.reparam import reparameterize

    config = getattr(model, "config", None)
    if not isinstance(config, EHRSRConfig):
        return {}
    blocking: dict[str, str] = {}
    # why the whole network failed is usually one module; the exporters' messages rarely say which
    for module in config.enabled_modules():
        section = getattr(config, module).__class__.__name__
        small = config.replace(width=8, msg={"levels": 1, "depths": [1]}, trunk_blocks=1, trunk_level=None,
                               **{m: {"enabled": m == module} for m in ("wab", "ssm", "fsb", "moe", "repmix", "noise")})
        probe = reparameterize(build_model(small)).eval()
        path = folder / f".probe-{module}.onnx"
        try:
            _export(probe, torch.rand(1, config.in_channels, *example_hw), path, opset, dynamic=True)
            diffs = _compare(probe, _session(path), [(1, config.in_channels, *hw) for hw in CHECK_SIZES])
            if max(diffs.values()) > ONNX_TOLERANCE:
                blocking[module] = f"{section}: exported, but wrong at other sizes (max abs diff {max(diffs.values()):.3g})"
        except Exception as exc:
            blocking[module] = f"{section}: {_first_line(exc)}"
        finally:
            path.unlink(missing_ok=True)
    return blocking


def export_onnx_dynamic(
    model: nn.Module,
    path: str | Path,
    *,
    example_hw: tuple[int, int] = (45, 37),
    opset: int = 18,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    trace_hw: tuple[int, int] = TRACE_HW,
) -> OnnxExport:
    """Export ``model`` (deploy form, run here in float32 on the CPU) with dynamic batch, height and
    width, and check it with onnxruntime at ``example_hw`` and every ``check_sizes`` (batch 1 and 2).
    The dynamic graph is traced at ``trace_hw`` (odd sizes, see ``TRACE_HW``).

    When the dynamic export fails or disagrees with PyTorch at another size, the model is exported
    at the fixed ``1 x C x example_hw`` instead (run it on larger images with
    ``tiled_onnx_inference``), and ``problem`` / ``blocking_modules`` say why. The result is
    returned, never raised: the PyTorch weights stay valid whatever the exporter does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float().eval()
    channels = int(getattr(getattr(model, "config", None), "in_channels", 3))
    example = torch.rand(1, channels, *example_hw, generator=torch.Generator().manual_seed(0))
    trace = torch.rand(1, channels, *trace_hw, generator=torch.Generator().manual_seed(0))
    shapes = [(1, channels, *example_hw), *[(1, channels, *hw) for hw in check_sizes], (2, channels, *check_sizes[0])]
    problem = None
    try:
        exporter = _export(model, trace, path, opset, dynamic=True)
        checks = _compare(model, _session(path), shapes)
        if max(checks.values()) <= ONNX_TOLERANCE:
            return OnnxExport(path, True, exporter, _opset_of(path), None, checks, passed=True)
        worst = max(checks, key=lambda k: checks[k])
        problem = f"the dynamic export disagrees with PyTorch at {worst} (max abs diff {checks[worst]:.3g})"
    except Exception as exc:
        problem = f"dynamic export failed: {_first_line(exc)}"
    blocking = _blocking_modules(model, trace_hw, opset, path.parent)
    path.unlink(missing_ok=True)
    try:
        exporter = _export(model, example, path, opset, dynamic=False)
    except Exception as exc:
        return OnnxExport(path, False, "none", opset, tuple(example_hw), {}, False,
                          f"{problem}; fixed-size export failed too: {_first_line(exc)}", blocking)
    checks = _compare(model, _session(path), shapes[:1])
    return OnnxExport(path, False, exporter, _opset_of(path), tuple(example_hw), checks,
                      passed=max(checks.values()) <= ONNX_TOLERANCE, problem=problem, blocking_modules=blocking)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]  # the last tile is flush with the border


def tiled_onnx_inference(session: Any, image: np.ndarray, tile_hw: tuple[int, int], overlap: int = 8) -> np.ndarray:
    """Run a fixed-size ONNX model (input ``1 x C x tile_hw``) over ``image`` (``1 x C x H x W``
    float32) in overlapping tiles, averaging outputs where tiles overlap (SwinIR's test-time
    tiling). An image smaller than a tile is padded by edge replication and the output cropped."""
    tile_h, tile_w = tile_hw
    _, _channels, height, width = image.shape
    pad_h, pad_w = max(0, tile_h - height), max(0, tile_w - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    full_h, full_w = image.shape[-2:]
    name = session.get_inputs()[0].name
    out = weight = None
    scale = 1
    for top in _starts(full_h, tile_h, max(1, tile_h - min(overlap, tile_h // 2))):
        for left in _starts(full_w, tile_w, max(1, tile_w - min(overlap, tile_w // 2))):
            patch = np.ascontiguousarray(image[..., top : top + tile_h, left : left + tile_w], dtype=np.float32)
            (result,) = session.run(None, {name: patch})[:1]
            if out is None:
                scale = result.shape[-1] // tile_w
                out = np.zeros((1, result.shape[1], full_h * scale, full_w * scale), dtype=np.float64)
                weight = np.zeros((1, 1, full_h * scale, full_w * scale), dtype=np.float64)
            rows = slice(top * scale, (top + tile_h) * scale)
            cols = slice(left * scale, (left + tile_w) * scale)
            out[..., rows, cols] += result
            weight[..., rows, cols] += 1
    assert out is not None and weight is not None
    return (out / weight)[..., : height * scale, : width * scale].astype(np.float32)
