"""WAB: shifted-window multi-head self-attention with relative position bias, followed by a gated
depthwise feed-forward network.

* Window attention with a learned relative position bias table and cyclic shifts between
  successive blocks: Swin Transformer (Liu et al., ICCV 2021), as used for SR by SwinIR and HAT.
* GDFN, the gated depthwise FFN of Restormer (Zamir et al., CVPR 2022).

The fast path is ``F.scaled_dot_product_attention`` with the bias (plus the shift / padding mask)
passed as a float ``attn_mask``; ``use_sdpa = False`` switches to the plain matmul-softmax-matmul
reference that tests compare it against. Any H, W works: the feature map is padded to a window
multiple and the padded keys are masked out, so results do not depend on the padding content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks.layers import DropPath, LayerNorm2d

__all__ = ["GDFN", "WindowAttention", "WindowAttentionBlock"]

_MASKED = -1e4  # large enough to vanish after softmax in every float dtype, finite in fp16/bf16


def _relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), in [0, 2w-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, N, C) with N = window_size^2; H and W must be window multiples."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_merge(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B, nW, N, C) -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def attention_mask(
    height: int, width: int, pad_h: int, pad_w: int, window_size: int, shift: int, device: torch.device
) -> torch.Tensor | None:
    """(nW, N, N) additive mask: keys from another shift region or from padding get ``_MASKED``.

    ``height``/``width`` are the padded sizes. Returns None when nothing needs masking.
    """
    if shift == 0 and pad_h == 0 and pad_w == 0:
        return None
    region = torch.zeros(height, width, device=device)
    if shift:
        cuts = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
        label = 0
        for hs in cuts:
            for ws in cuts:
                region[hs, ws] = label
                label += 1
    valid = torch.zeros(height, width, device=device)
    valid[: height - pad_h, : width - pad_w] = 1
    if shift:
        valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
    region = window_partition(region[None, :, :, None], window_size)[0, :, :, 0]  # (nW, N)
    valid = window_partition(valid[None, :, :, None], window_size)[0, :, :, 0]
    same_region = region[:, :, None] == region[:, None, :]  # (nW, N, N)
    allowed = same_region & (valid[:, None, :] > 0)
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, channels: int, window_size: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads ({heads}) must divide channels ({channels})")
        self.heads = heads
        self.window_size = window_size
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", _relative_position_index(window_size), persistent=False)
        self.use_sdpa = True

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """windows: (B, nW, N, C); mask: (nW, N, N) or None -> (B, nW, N, C)."""
        b, n_windows, n, c = windows.shape
        qkv = self.qkv(windows).view(b, n_windows, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, hd)
        bias = self.bias_table[self.bias_index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        attn_mask = bias if mask is None else bias[None] + mask[:, None]  # (heads|nW x heads, N, N)
        attn_mask = attn_mask.to(q.dtype)
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        if self.use_sdpa and not exporting:  # ONNX exporters get the plain matmul path (same result)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1) + attn_mask  # (B, nW, heads, N, N)
            out = scores.softmax(dim=-1) @ v
        out = out.transpose(2, 3).reshape(b, n_windows, n, c)  # (B, nW, N, C)
        return self.proj(out)


class GDFN(nn.Module):
    """Gated depthwise FFN (Restormer): 1x1 expand -> 3x3 depthwise -> GELU(a) * b -> 1x1."""

    def __init__(self, channels: int, expansion: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, round(channels * expansion))
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.expand(x)).chunk(2, dim=1)
        return self.project(self.dropout(self.act(a) * b))


class WindowAttentionBlock(nn.Module):
    """Pre-norm Swin block on (B, C, H, W) maps: x + WMSA(LN(x)); x + GDFN(LN(x))."""

    def __init__(
        self,
        channels: int,
        window_size: int = 8,
        heads: int = 4,
        shift: bool = False,
        ffn_expansion: float = 2.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = LayerNorm2d(channels)
        self.attn = WindowAttention(channels, window_size, heads)
        self.norm2 = LayerNorm2d(channels)
        self.ffn = GDFN(channels, ffn_expansion, dropout)
        self.drop_path = DropPath(drop_path)
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    @property
    def use_sdpa(self) -> bool:
        return self.attn.use_sdpa

    @use_sdpa.setter
    def use_sdpa(self, value: bool) -> None:
        self.attn.use_sdpa = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        ws = self.window_size
        y = self.norm1(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        pad_h, pad_w = (-height) % ws, (-width) % ws
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))  # padded keys are masked, the value is irrelevant
        hp, wp = height + pad_h, width + pad_w
        # a shift only makes sense when there is more than one window along both axes
        shift = self.shift_size if hp > ws and wp > ws else 0
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # a dynamic export's sizes are symbols (unhashable, and a cached mask would freeze one
            # size into the graph): build the mask in the graph instead
            mask = attention_mask(hp, wp, pad_h, pad_w, ws, shift, x.device)
        else:
            # inference-mode tensors cannot enter autograd later: cache them separately
            key = (hp, wp, pad_h, pad_w, shift, x.device, torch.is_inference_mode_enabled())
            if key not in self._mask_cache:  # masks depend only on sizes: build once per input size
                if len(self._mask_cache) > 16:
                    self._mask_cache.clear()
                self._mask_cache[key] = attention_mask(hp, wp, pad_h, pad_w, ws, shift, x.device)
            mask = self._mask_cache[key]
        y = window_merge(self.attn(window_partition(y, ws), mask), ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y[:, :height, :width].permute(0, 3, 1, 2)  # (B, C, H, W)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.ffn(self.norm2(x)))
