"""FSB: frequency-separation block. The high-frequency part of the spectrum is isolated with
``rfft2``, re-weighted by a learned per-channel gain that depends on the radial frequency, brought
back with ``irfft2``, gated by a conv of the input and added through a learned scalar that starts
at 0, so the block starts as the identity (invariant 4 in ``docs/architecture.md``).

Idea from frequency-aware restoration networks (AdaIR, Cui et al. 2024; SFHformer, Jiang et al.
2024): texture and edges live in high frequencies that plain convs under-fit. The gain is stored
on ``n_bins`` radial bins between ``cutoff`` and the Nyquist radius and linearly interpolated, so
the same parameters serve any input size. FFTs run in float32 (float64 stays float64) with
autocast disabled; the result is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FrequencySeparationBlock", "radial_frequency"]


def radial_frequency(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W//2+1) normalised radius of every ``rfft2`` bin: 0 at DC, 1 at the Nyquist radius."""
    # torch.fft.fftfreq / rfftfreq, written with arange and where so that exporters (ONNX) can trace
    # it with symbolic sizes (their remainder-by-a-size translation needs a constant)
    fy = torch.arange(height, device=device)
    fy = torch.where(fy >= (height + 1) // 2, fy - height, fy)
    fy = fy / height  # cycles per pixel, in [-0.5, 0.5)
    fx = torch.arange(width // 2 + 1, device=device) / width  # [0, 0.5]
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    return radius.clamp(max=1.0)  # the corners (beyond Nyquist along the diagonal) share the last bin


def _dft_basis(n: int, m: int, period: int, device: torch.device, dtype: torch.dtype):
    """cos and sin of ``2 pi k t / period`` for k < n, t < m. The angle (up to ``2 pi n m /
    period``) is computed in float64, so cos and sin stay exact to ~1e-12 before the cast (a
    float32 angle of 1e5 rad is off by ~0.01); no remainder by ``period``, which exporters cannot
    translate for a symbolic size."""
    k = torch.arange(n, device=device)[:, None]
    t = torch.arange(m, device=device)[None, :]
    angle = (k * t).to(torch.float64) * (2 * math.pi) / period
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def filter_by_dft(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``irfft2(rfft2(x, ortho) * gain, s=x's size, ortho)`` written as real matrix products.

    The exporters' FFT translations need the inverse transform's output width as a constant, so a
    dynamic-size export (``docs/deployment.md``) takes this path instead: the same linear map, with
    DFT matrices built from the (symbolic) input size. It costs O(H W (H + W)) per channel instead
    of O(H W log(H W)), which only matters for exported models on large images.
    """
    height, width = x.shape[-2:]
    bins = width // 2 + 1
    cos_w, sin_w = _dft_basis(bins, width, width, x.device, x.dtype)  # (K, W)
    cos_h, sin_h = _dft_basis(height, height, height, x.device, x.dtype)  # (H, H), symmetric
    # forward: real DFT along W, then the full DFT along H (e^{-i theta})
    re, im = x @ cos_w.T, -(x @ sin_w.T)  # (B, C, H, K)
    re, im = cos_h @ re + sin_h @ im, cos_h @ im - sin_h @ re
    re, im = re * gain, im * gain
    # inverse along H (e^{+i theta}), then the Hermitian inverse along W: bins other than DC and
    # (for even widths) Nyquist stand for two conjugate frequencies
    re, im = cos_h @ re - sin_h @ im, cos_h @ im + sin_h @ re
    k = torch.arange(bins, device=x.device)
    twice = torch.where((k == 0) | (2 * k == width), 1.0, 2.0).to(x.dtype)
    y = (re * twice) @ cos_w - (im * twice) @ sin_w
    return y / (height * width)  # "ortho" both ways: 1/sqrt(HW) twice


class FrequencySeparationBlock(nn.Module):
    def __init__(self, channels: int, cutoff: float = 0.25, n_bins: int = 8) -> None:
        super().__init__()
        if not 0 <= cutoff < 1:
            raise ValueError(f"cutoff must be in [0, 1), got {cutoff}")
        self.cutoff = cutoff
        self.n_bins = n_bins
        self.gain = nn.Parameter(torch.ones(channels, n_bins))  # per channel, per radial bin
        self.gate = nn.Conv2d(channels, channels, 1)  # spatial gate computed from the input
        self.project = nn.Conv2d(channels, channels, 1)
        self.alpha = nn.Parameter(torch.zeros(1))  # learned merge scale, 0 = identity at start
        self._weight_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _interpolation(self, height: int, width: int, device: torch.device):
        """Bin indices and weights that map the per-bin gains onto the rfft2 grid (cached per size)."""
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # a dynamic export's sizes are symbols (unhashable, and a cached tensor would freeze one
            # size into the graph): compute the weights in the graph instead
            return self._compute_interpolation(height, width, device)
        # inference-mode tensors cannot enter autograd later: cache them separately
        key = (height, width, device, torch.is_inference_mode_enabled())
        if key not in self._weight_cache:
            if len(self._weight_cache) > 16:
                self._weight_cache.clear()
            self._weight_cache[key] = self._compute_interpolation(height, width, device)
        return self._weight_cache[key]

    def _compute_interpolation(self, height: int, width: int, device: torch.device):
        radius = radial_frequency(height, width, device)
        high = (radius > self.cutoff).float()  # hard split: low frequencies pass untouched
        pos = ((radius - self.cutoff) / (1 - self.cutoff)).clamp(0, 1) * (self.n_bins - 1)
        lower = pos.floor().long().clamp(max=self.n_bins - 2)
        frac = (pos - lower) * high
        return lower, frac, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        lower, frac, high = self._interpolation(height, width, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            gain = self.gain.to(compute_dtype)
            gain_map = gain[:, lower] * (1 - frac) + gain[:, lower + 1] * frac  # (C, H, W//2+1)
            if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
                high_part = filter_by_dft(x.to(compute_dtype), gain_map * high.to(compute_dtype))
            else:
                spectrum = torch.fft.rfft2(x.to(compute_dtype), norm="ortho")  # (B, C, H, W//2+1)
                spectrum = spectrum * (gain_map * high.to(compute_dtype))
                high_part = torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")
        high_part = high_part.to(x.dtype)
        y = self.project(high_part * torch.sigmoid(self.gate(x)))
        return x + self.alpha.to(x.dtype) * y
