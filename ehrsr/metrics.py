"""Image quality: PSNR and SSIM by BasicSR's conventions, LPIPS through pyiqa, and a validation pass.

PSNR / SSIM follow BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel=True``,
which is what SR papers report:

- images on uint8 levels (float model outputs are clamped to [0, 1], scaled by 255 and rounded,
  as BasicSR's ``tensor2img`` does before its metrics);
- ``crop_border`` pixels removed on every side (``crop_border = scale`` in SR papers);
- on the Y channel of ITU-R BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` defines it for RGB in [0, 1]:
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (range 16-235), not rounded;
- PSNR in float64 with peak 255: ``10 log10(255^2 / MSE)``;
- SSIM of Wang et al. (IEEE TIP 2004) as in their MATLAB reference ``ssim_index.m``: 11x11
  Gaussian window with sigma 1.5, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, statistics
  only where the window fits inside the image ("valid"), mean of the SSIM map; for RGB the mean
  over channels.

The arithmetic here runs in float64 throughout; BasicSR rounds its Y channel to float32 once,
which changes PSNR by about 1e-6 dB, far inside the 0.001 dB tolerance we test.

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
CVPR 2018; AlexNet, v0.1) comes from pyiqa, which needs two weight files: its linear-layer
weights and torchvision's ImageNet AlexNet. See :class:`LPIPS` for where they are looked for.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.data.imresize import imresize
from ehrsr.errors import UserError

__all__ = [
    "ALEXNET_WEIGHTS_FILE",
    "LPIPS",
    "LPIPS_WEIGHTS_FILE",
    "PER_IMAGE_DECIMALS",
    "SSIM_WINDOW",
    "BicubicUpsampler",
    "EvalResult",
    "ImageTooSmall",
    "LPIPSUnavailable",
    "bicubic_baseline",
    "check_measurable",
    "decode_per_image",
    "encode_per_image",
    "evaluate",
    "psnr",
    "rgb_to_y",
    "smallest_measurable_side",
    "ssim",
    "to_uint8_image",
]

# ---------------------------------------------------------------------------------------------
# PSNR / SSIM


def to_uint8_image(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """One image as a uint8 ``(H, W, C)`` numpy array on 0-255 levels.

    Accepts uint8 numpy ``(H, W[, C])``, or a tensor ``(C, H, W)`` / ``(1, C, H, W)``: float in
    [0, 1] (clamped, scaled by 255, rounded half to even like ``numpy.round``) or uint8.
    """
    if isinstance(img, torch.Tensor):
        tensor = img.detach()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.ndim != 3:
            raise ValueError(f"expected an image tensor (C, H, W) or (1, C, H, W), got shape {tuple(img.shape)}")
        if tensor.is_floating_point():
            tensor = (tensor.float().clamp(0, 1) * 255.0).round()
        elif tensor.dtype != torch.uint8:
            raise ValueError(f"image tensors must be float in [0, 1] or uint8, got {tensor.dtype}")
        return tensor.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(img)
    if array.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 (0-255), got {array.dtype}; pass float images as tensors in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an image array (H, W) or (H, W, C), got shape {array.shape}")
    return array


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y of ITU-R BT.601 YCbCr (MATLAB ``rgb2ycbcr``), float64 on 0-255 levels, ``(H, W)``.

    ``img`` is RGB on 0-255 levels ``(H, W, 3)``; the result is ``16 + (65.481 R + 128.553 G +
    24.966 B) / 255`` and is not rounded (BasicSR's ``to_y_channel``).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"Y conversion needs an RGB image (H, W, 3), got shape {img.shape}")
    rgb = img.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _prepare_pair(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, crop_border: int, y_channel: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred, gt) float64 planes per image of a batch, after crop and optional Y conversion."""
    preds, gts = _split_batch(pred), _split_batch(gt)
    if len(preds) != len(gts):
        raise ValueError(f"batch sizes differ: {len(preds)} predictions, {len(gts)} references")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    pairs = []
    for p, g in zip(preds, gts):
        p, g = to_uint8_image(p), to_uint8_image(g)
        if p.shape != g.shape:
            raise ValueError(f"image sizes differ: prediction {p.shape}, reference {g.shape} (HWC)")
        if crop_border:
            if min(p.shape[:2]) <= 2 * crop_border:
                raise ValueError(f"crop_border {crop_border} removes the whole {p.shape[1]}x{p.shape[0]} image")
            p = p[crop_border:-crop_border, crop_border:-crop_border]
            g = g[crop_border:-crop_border, crop_border:-crop_border]
        if y_channel:
            p, g = rgb_to_y(p)[:, :, None], rgb_to_y(g)[:, :, None]
        pairs.append((p.astype(np.float64), g.astype(np.float64)))
    return pairs


def _split_batch(img: np.ndarray | torch.Tensor) -> list[np.ndarray | torch.Tensor]:
    if isinstance(img, torch.Tensor) and img.ndim == 4:
        return list(img.unbind(0))
    return [img]


def psnr(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, crop_border: int, y_channel: bool = True
) -> float:
    """PSNR in dB as BasicSR's ``calculate_psnr(..., test_y_channel=True)`` (module docstring).

    Inputs: uint8 ``(H, W, 3)`` RGB numpy arrays, or float [0, 1] tensors ``(C, H, W)`` /
    ``(N, C, H, W)`` (for a batch, the mean of the per-image PSNRs). ``inf`` for identical images.
    """
    values = []
    for p, g in _prepare_pair(pred, gt, crop_border, y_channel):
        mse = float(np.mean((p - g) ** 2))
        values.append(math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse))
    return float(np.mean(values))


SSIM_WINDOW = 11  # side of SSIM's Gaussian window (sigma 1.5), as in BasicSR and the SSIM paper


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> np.ndarray:
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(t**2) / (2.0 * sigma**2))
    g /= g.sum()
    return g  # separable: the 2-D window is the outer product


def _filter_valid(plane: np.ndarray, g: np.ndarray) -> np.ndarray:
    """2-D correlation with ``outer(g, g)`` where the window fits entirely (MATLAB filter2 'valid')."""
    rows = np.lib.stride_tricks.sliding_window_view(plane, len(g), axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, len(g), axis=1) @ g


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, crop_border: int, y_channel: bool = True
) -> float:
    """SSIM as BasicSR's ``calculate_ssim(..., test_y_channel=True)`` (module docstring); same inputs
    as :func:`psnr`. Images must be at least 11x11 after the crop."""
    values = []
    for p, g in _prepare_pair(pred, gt, crop_border, y_channel):
        if min(p.shape[:2]) < SSIM_WINDOW:
            raise ValueError(f"SSIM needs images of at least 11x11 after cropping, got {p.shape[1]}x{p.shape[0]}")
        values.append(float(np.mean([_ssim_plane(p[:, :, c], g[:, :, c]) for c in range(p.shape[2])])))
    return float(np.mean(values))


class ImageTooSmall(UserError, ValueError):
    """A validation image too small to measure at its scale; the message names it and its size."""


def smallest_measurable_side(scale: int) -> int:
    """The smallest HR side (px) PSNR and SSIM can be measured on at ``scale``, with the
    conventions above: the image is cropped to a multiple of the scale, ``crop_border = scale``
    pixels go on each side (none at scale 1), and SSIM's 11x11 window must still fit."""
    crop = scale if scale > 1 else 0
    need = SSIM_WINDOW + 2 * crop
    return -(-need // scale) * scale  # the next multiple of the scale


def check_measurable(sizes: Sequence[tuple[Path, int, int]], scale: int) -> None:
    """Raise ``ImageTooSmall`` for the first ``(path, width, height)`` whose image cannot be
    measured at ``scale`` (``smallest_measurable_side``): one line naming the file and its size."""
    need = smallest_measurable_side(scale)
    crop = scale if scale > 1 else 0
    for path, width, height in sizes:
        if min(width, height) < need:
            raise ImageTooSmall(
                f"image {Path(path).name} ({width}x{height}) is too small for the crop border {crop} of x{scale} "
                f"and SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window: it needs at least {need}x{need} px"
            )


# ---------------------------------------------------------------------------------------------
# LPIPS through pyiqa

LPIPS_WEIGHTS_FILE = "LPIPS_v0.1_alex-df73285e.pth"
"""pyiqa's LPIPS linear-layer weights (alex, v0.1); downloaded into ``<torch hub>/pyiqa/``."""
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's ImageNet AlexNet, which pyiqa's LPIPS always loads; in ``<torch hub>/checkpoints/``."""

_LIN_CHANNELS = (64, 192, 384, 256, 256)  # AlexNet feature widths that LPIPS' five linear layers weigh


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be computed here (pyiqa missing, weights missing or unreadable). Treat LPIPS as
    missing and go on; the message says which files are needed and where they are looked for."""


def lpips_weight_folders() -> tuple[Path, Path]:
    """(folder of pyiqa's LPIPS weights, folder of torchvision's AlexNet weights) by default.

    Both follow ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``).
    """
    hub = Path(torch.hub.get_dir())
    return hub / "pyiqa", hub / "checkpoints"


def _unavailable_message(reason: str) -> str:
    pyiqa_dir, tv_dir = lpips_weight_folders()
    return (
        f"LPIPS unavailable: {reason}. LPIPS (alex, v0.1) through pyiqa needs two files: "
        f"{LPIPS_WEIGHTS_FILE} (looked for in {pyiqa_dir}) and {ALEXNET_WEIGHTS_FILE} (torchvision's "
        f"AlexNet, looked for in {tv_dir}). Without network access, copy them there, or put both in "
        f"one folder and pass it as weights_path (LPIPS(weights_path=...), run_search.py --lpips-weights)."
    )


def _check_lin_weights(path: Path) -> None:
    """pyiqa loads these with ``strict=False``; a wrong file would silently leave random weights."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is reported the same way
        raise LPIPSUnavailable(_unavailable_message(f"cannot read {path}: {exc}")) from None
    if isinstance(state, dict) and "params" in state and isinstance(state["params"], dict):
        state = state["params"]
    if not isinstance(state, dict):
        raise LPIPSUnavailable(_unavailable_message(f"{path} does not hold a state dict"))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for k, channels in enumerate(_LIN_CHANNELS):
        key = f"lin{k}.model.1.weight"
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, channels, 1, 1):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing"
            raise LPIPSUnavailable(
                _unavailable_message(f"{path} is not an LPIPS alex weight file ({key}: expected (1, {channels}, 1, 1), got {found})")
            )


def _resolve_weight_files(weights_path: str | Path | None) -> tuple[Path | None, Path | None]:
    """(LPIPS linear weights, AlexNet backbone) to use; None = pyiqa/torchvision defaults (may download)."""
    pyiqa_dir, tv_dir = lpips_weight_folders()
    if weights_path is None:
        lin = pyiqa_dir / LPIPS_WEIGHTS_FILE
        return (lin if lin.is_file() else None), None
    path = Path(weights_path).expanduser()
    if path.is_dir():
        lin = path / LPIPS_WEIGHTS_FILE
        if not lin.is_file():
            raise LPIPSUnavailable(_unavailable_message(f"{LPIPS_WEIGHTS_FILE} not found in {path}"))
        backbone = path / ALEXNET_WEIGHTS_FILE
    elif path.is_file():
        lin = path
        backbone = path.parent / ALEXNET_WEIGHTS_FILE
    else:
        raise LPIPSUnavailable(_unavailable_message(f"weights_path {path} does not exist"))
    if not backbone.is_file():
        if not (tv_dir / ALEXNET_WEIGHTS_FILE).is_file():
            raise LPIPSUnavailable(
                _unavailable_message(f"{ALEXNET_WEIGHTS_FILE} is neither beside {lin} nor in {tv_dir}")
            )
        backbone = None  # torchvision finds it in its own folder
    return lin, backbone


_HUB_LOCK = threading.Lock()
_METRICS: dict[tuple[str, str], Any] = {}


def _build_pyiqa_lpips(device: torch.device, lin: Path | None, backbone: Path | None, allow_download: bool) -> Any:
    try:
        import pyiqa
    except ImportError as exc:
        raise LPIPSUnavailable(_unavailable_message(f"pyiqa is not installed ({exc}); pip install 'ehrsr[iqa]'")) from None
    pyiqa_dir, tv_dir = lpips_weight_folders()
    if not allow_download:
        if lin is None:
            raise LPIPSUnavailable(_unavailable_message(f"{LPIPS_WEIGHTS_FILE} not in {pyiqa_dir} and downloads are off"))
        if backbone is None and not (tv_dir / ALEXNET_WEIGHTS_FILE).is_file():
            raise LPIPSUnavailable(_unavailable_message(f"{ALEXNET_WEIGHTS_FILE} not in {tv_dir} and downloads are off"))
    if lin is not None:
        _check_lin_weights(lin)
    kwargs = {"pretrained_model_path": str(lin)} if lin is not None else {}
    with _HUB_LOCK, tempfile.TemporaryDirectory(prefix="ehrsr-hub-") as temporary_hub:
        # torch.hub.set_dir has no "unset": remember the raw setting (None = follow $TORCH_HOME)
        # so that pointing the hub elsewhere for one construction leaves no trace.
        previous_hub = getattr(torch.hub, "_hub_dir", None)
        if backbone is not None:
            # torchvision loads AlexNet from <hub>/checkpoints/<file>; point the hub at a folder
            # holding a link to the caller's file for the duration of the construction.
            (Path(temporary_hub) / "checkpoints").mkdir()
            (Path(temporary_hub) / "checkpoints" / ALEXNET_WEIGHTS_FILE).symlink_to(backbone.resolve())
            torch.hub.set_dir(temporary_hub)
        try:
            metric = pyiqa.create_metric("lpips", device=device, as_loss=False, **kwargs)
        except Exception as exc:  # network errors, missing or corrupt files: all mean "no LPIPS"
            raise LPIPSUnavailable(_unavailable_message(f"pyiqa could not build LPIPS ({type(exc).__name__}: {exc})")) from None
        finally:
            if backbone is not None:
                torch.hub._hub_dir = previous_hub
    metric.eval()
    return metric


class LPIPS:
    """LPIPS (alex, v0.1) through pyiqa, built once per (device, weights) and shared.

    Weight files (names in :data:`LPIPS_WEIGHTS_FILE`, :data:`ALEXNET_WEIGHTS_FILE`):

    - ``weights_path=None``: pyiqa's and torchvision's own folders (:func:`lpips_weight_folders`),
      downloading what is missing when ``allow_download`` and the network allow;
    - ``weights_path`` a folder: both files in it (AlexNet may instead be in torchvision's folder);
    - ``weights_path`` a file: the LPIPS linear weights; AlexNet beside it or in torchvision's folder.

    Raises :class:`LPIPSUnavailable` when the metric cannot be built. Calling it with float
    ``(B, 3, H, W)`` images in [0, 1] (prediction, reference) returns a CPU float tensor ``(B,)``;
    lower is more similar, and identical images give exactly 0.
    """

    def __init__(
        self, device: str | torch.device = "cpu", weights_path: str | Path | None = None, *, allow_download: bool = True
    ) -> None:
        self.device = torch.device(device)
        lin, backbone = _resolve_weight_files(weights_path)
        key = (str(self.device), f"{lin}|{backbone}")
        metric = _METRICS.get(key)
        if metric is None:
            metric = _build_pyiqa_lpips(self.device, lin, backbone, allow_download)
            _METRICS[key] = metric
        self._metric = metric
        self.weights = (lin, backbone)

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) tensors of one shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
        with torch.inference_mode():
            pred = pred.detach().float().clamp(0, 1).to(self.device)
            gt = gt.detach().float().clamp(0, 1).to(self.device)
            score = self._metric(pred, gt)
        return score.reshape(pred.shape[0]).float().cpu()


# ---------------------------------------------------------------------------------------------
# validation pass


@dataclass
class EvalResult:
    """Mean quality over a validation set, with per-image values.

    ``per_image`` holds one dict per image: ``name``, ``psnr``, ``ssim``, ``lpips`` (None when
    LPIPS was not computed). ``seconds`` is the wall time of the whole pass.
    """

    psnr: float
    ssim: float
    lpips: float | None
    per_image: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    convention: str = ""

    @property
    def image_names(self) -> list[str]:
        """Names of the evaluated images (evaluation units), in evaluation order."""
        return [row["name"] for row in self.per_image]

    @property
    def psnr_per_image(self) -> list[float]:
        return [float(row["psnr"]) for row in self.per_image]

    @property
    def ssim_per_image(self) -> list[float]:
        return [float(row["ssim"]) for row in self.per_image]


PER_IMAGE_DECIMALS = 4  # 1e-4 dB / 1e-4 SSIM: far below any difference the statistics resolve


def encode_per_image(result: EvalResult) -> dict[str, list[float]]:
    """Per-image PSNR / SSIM as a compact JSON-able dict ``{name: [psnr, ssim]}`` rounded to
    :data:`PER_IMAGE_DECIMALS` decimals, for an Optuna user attribute (``decode_per_image`` reads it).
    An infinite PSNR (identical images) is stored as ``None`` (JSON has no infinity)."""
    encoded = {}
    for name, p, s in zip(result.image_names, result.psnr_per_image, result.ssim_per_image):
        encoded[name] = [round(p, PER_IMAGE_DECIMALS) if math.isfinite(p) else None, round(s, PER_IMAGE_DECIMALS)]
    return encoded


def decode_per_image(encoded: Any) -> dict[str, tuple[float, float]]:
    """``{name: (psnr, ssim)}`` from :func:`encode_per_image`'s output; ``ValueError`` if malformed."""
    if not isinstance(encoded, dict):
        raise ValueError(f"per-image quality must be a dict {{name: [psnr, ssim]}}, got {type(encoded).__name__}")
    decoded = {}
    for name, pair in encoded.items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"per-image quality of {name!r} must be [psnr, ssim], got {pair!r}")
        p, s = pair
        decoded[str(name)] = (math.inf if p is None else float(p), float(s))
    return decoded


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple (mirror, falling back to edge copies for tiny images)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _run_full(model: nn.Module, x: torch.Tensor, scale: int, multiple: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    padded = _pad_to_multiple(x, multiple) if multiple > 1 else x
    out = model(padded)
    expected = (padded.shape[-2] * scale, padded.shape[-1] * scale)
    if tuple(out.shape[-2:]) != expected:
        raise ValueError(
            f"model output is {out.shape[-1]}x{out.shape[-2]} for a {padded.shape[-1]}x{padded.shape[-2]} input, "
            f"expected {expected[1]}x{expected[0]} at the data's scale {scale}; does the model's scale match?"
        )
    return out[..., : height * scale, : width * scale]


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]  # last tile flush with the border


def _run_tiled(model: nn.Module, x: torch.Tensor, scale: int, multiple: int, tile: int, overlap: int) -> torch.Tensor:
    """Overlapping tiles, outputs averaged where they overlap (SwinIR's test-time tiling scheme)."""
    height, width = x.shape[-2:]
    stride = tile - min(overlap, tile // 2)  # overlap capped at half a tile
    out = torch.zeros(x.shape[0], x.shape[1], height * scale, width * scale, device=x.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, height * scale, width * scale, device=x.device, dtype=torch.float32)
    for top in _tile_starts(height, tile, stride):
        for left in _tile_starts(width, tile, stride):
            patch = x[..., top : top + tile, left : left + tile]
            result = _run_full(model, patch, scale, multiple).float()
            rows = slice(top * scale, top * scale + result.shape[-2])
            cols = slice(left * scale, left * scale + result.shape[-1])
            out[..., rows, cols] += result
            weight[..., rows, cols] += 1
    return out / weight


def _model_scale(model: nn.Module, fallback: int) -> int:
    config = getattr(model, "config", None)
    scale = getattr(config, "scale", None) or getattr(model, "scale", None)
    return int(scale) if scale else fallback


def evaluate(
    model: nn.Module,
    val_set: Sequence[Any],
    *,
    crop_border: int,
    device: str | torch.device = "cpu",
    lpips: LPIPS | None = None,
    tile_size: int | None = None,
    tile_overlap: int = 32,
    max_pixels: int = 512 * 512,
    y_channel: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Run ``model`` on every validation image and measure PSNR / SSIM (and LPIPS if given).

    Args:
        model: maps ``(1, 3, h, w)`` in [0, 1] to ``(1, 3, h*s, w*s)``. It runs in eval mode under
            ``torch.inference_mode()`` on whole images; its training mode is restored afterwards.
            With an attribute ``size_multiple`` the input is mirror-padded to that multiple and
            the output cropped back.
        val_set: items with ``name``, ``lr`` and ``hr`` (uint8 HWC), e.g. a :class:`ValSet`.
        crop_border: pixels removed on each side before PSNR/SSIM (the scale, for SR).
        lpips: an :class:`LPIPS` instance, or None to skip LPIPS.
        tile_size: LR tile side; when given, every image is tiled. By default images with more
            than ``max_pixels`` LR pixels are tiled with ``isqrt(max_pixels)`` tiles, smaller ones
            run whole.
        tile_overlap: LR pixels shared by neighbouring tiles (outputs are averaged there);
            at most half the tile.
        y_channel: PSNR/SSIM on Y (the SR convention) or on RGB.
    """
    device = torch.device(device)
    scale = getattr(val_set, "scale", None) or _model_scale(model, 1)
    multiple = int(getattr(model, "size_multiple", 1) or 1)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    per_image = []
    items = val_set
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(val_set, desc="validating", unit="img", leave=False)
    try:
        with torch.inference_mode():
            for item in items:
                x = torch.from_numpy(np.ascontiguousarray(item.lr.transpose(2, 0, 1))).to(device)
                x = x.unsqueeze(0).to(dtype).div_(255.0)
                height, width = x.shape[-2:]
                use_tiles = tile_size is not None or height * width > max_pixels
                if use_tiles:
                    tile = tile_size or math.isqrt(max_pixels)  # tiles stay within the pixel limit
                    out = _run_tiled(model, x, scale, multiple, tile, tile_overlap)
                else:
                    out = _run_full(model, x, scale, multiple)
                pred = to_uint8_image(out.float())
                if pred.shape != item.hr.shape:
                    raise ValueError(f"{item.name}: output {pred.shape} does not match HR {item.hr.shape} (HWC)")
                row = {
                    "name": item.name,
                    "psnr": psnr(pred, item.hr, crop_border, y_channel),
                    "ssim": ssim(pred, item.hr, crop_border, y_channel),
                    "lpips": None,
                }
                if lpips is not None:
                    # LPIPS sees the same uint8-rounded output as PSNR/SSIM, against the HR image.
                    pred_t = torch.from_numpy(pred.transpose(2, 0, 1).copy()).unsqueeze(0).float() / 255.0
                    hr_t = torch.from_numpy(item.hr.transpose(2, 0, 1).copy()).unsqueeze(0).float() / 255.0
                    row["lpips"] = float(lpips(pred_t, hr_t)[0])
                per_image.append(row)
    finally:
        model.train(was_training)
    if not per_image:
        raise ValueError("the validation set is empty")
    lpips_values = [r["lpips"] for r in per_image if r["lpips"] is not None]
    convention = (
        f"PSNR/SSIM on {'Y (BT.601)' if y_channel else 'RGB'}, crop_border={crop_border}, uint8-rounded"
        + (", LPIPS alex v0.1 (pyiqa) on RGB" if lpips_values else "")
    )
    return EvalResult(
        psnr=float(np.mean([r["psnr"] for r in per_image])),
        ssim=float(np.mean([r["ssim"] for r in per_image])),
        lpips=float(np.mean(lpips_values)) if lpips_values else None,
        per_image=per_image,
        seconds=time.perf_counter() - start,
        convention=convention,
    )


class BicubicUpsampler(nn.Module):
    """MATLAB bicubic upsampling as a model (identity at scale 1): the reference every SR table shows."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return x
        # float64 so the only rounding is the final one to uint8, as with MATLAB on uint8 images
        return imresize(x.double(), float(self.scale)).to(x.dtype)


def bicubic_baseline(
    val_set: Sequence[Any], *, crop_border: int | None = None, lpips: LPIPS | None = None, y_channel: bool = True
) -> EvalResult:
    """PSNR/SSIM of MATLAB-bicubic upsampling of each LR image against its HR (the "Bicubic" row of
    SR papers; for restoration at scale 1, the quality of the degraded input itself).

    ``crop_border`` defaults to the set's scale for SR and 0 for restoration (scale 1), the
    conventions of SR and of denoising / deblurring papers.
    """
    scale = int(getattr(val_set, "scale", 1))
    border = (scale if scale > 1 else 0) if crop_border is None else crop_border
    return evaluate(BicubicUpsampler(scale), val_set, crop_border=border, lpips=lpips, y_channel=y_channel)

