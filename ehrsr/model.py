"""EHR-SR: stem -> MSG encoder -> hybrid trunk -> MSG decoder -> head (``docs/architecture.md``).

Levels and channels (``w`` = ``config.width``, ``L`` = ``config.msg.levels``)::

    level 0 (H x W, w)          stem ─────────────────────────────skip──────────► fuse ─► head
    level 1 (H/2 x W/2, 2w)       └► down ─► blocks ─────────skip──────► fuse ─► blocks ┘
    ...                                       ...                         ...
    level L (H/2^L x W/2^L, 2^L w)                 └► down ─► blocks ─► up ┘

The hybrid trunk runs at ``trunk_level`` (default L, the bottleneck; at a shallower level it runs
in the decoder right after that level's blocks). A trunk block is a conv block (NAF or gated)
followed by the enabled mixers WAB, SSMB, FSB, MoE-TX and RepMix, each with its own residual;
switched-off modules are ``nn.Identity``. With every module off this is the conv-only baseline.
Noise injection (when on) follows the stem, each encoder level, the trunk and each decoder level.

The input is padded (reflection) to a multiple of ``2**L`` and the output cropped back, so any
H, W works; blocks that need more (window attention) pad and crop internally. The head predicts
a residual on top of the bicubic-upsampled input (``F.interpolate``; the input itself at scale 1)
and its convolution starts at zero, so an untrained network returns that base image.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks import (
    FrequencySeparationBlock,
    GatedCNNBlock,
    GatedConv,
    MoEBlock,
    NAFBlock,
    NoiseInjection,
    RepConv,
    RepMixBlock,
    SSMBlock,
    WindowAttentionBlock,
    pad_to_multiple,
)
from ehrsr.config import EHRSRConfig

__all__ = ["EHRSR", "build_model", "state_mismatch"]


def _conv_block(block_type: str, channels: int, expansion: float, dropout: float) -> nn.Module:
    if block_type == "naf":
        return NAFBlock(channels, expansion, dropout)
    if block_type == "gated":
        return GatedCNNBlock(channels, expansion, dropout=dropout)
    raise ValueError(f"unknown block_type {block_type!r}; use 'naf' or 'gated'")


def _noise(cfg: EHRSRConfig) -> nn.Module:
    return NoiseInjection(cfg.noise.eval_mode, cfg.noise.seed) if cfg.noise.enabled else nn.Identity()


class Downsample(nn.Module):
    """Halve H and W, double channels: strided 2x2 conv, or PixelUnshuffle + 1x1 conv."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        if mode == "conv":
            self.body = nn.Conv2d(channels, 2 * channels, 2, stride=2)
        else:
            self.body = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * channels, 2 * channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double H and W, halve channels: 1x1 conv + PixelShuffle (NAFNet's decoder up-sampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip (Attention U-Net, Oktay et al. 2018)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.from_skip = nn.Conv2d(channels, inner, 1)
        self.from_decoder = nn.Conv2d(channels, inner, 1, bias=False)
        self.score = nn.Conv2d(inner, 1, 1)

    def forward(self, skip: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.score(F.relu(self.from_skip(skip) + self.from_decoder(decoder))))
        return skip * alpha


class SkipFusion(nn.Module):
    """Merge a decoder feature with its encoder skip: add, or concat + 1x1; optional gate first."""

    def __init__(self, channels: int, mode: str, attention_gate: bool) -> None:
        super().__init__()
        self.mode = mode
        self.gate = AttentionGate(channels) if attention_gate else None
        self.merge = nn.Conv2d(2 * channels, channels, 1) if mode == "concat" else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            skip = self.gate(skip, x)
        if self.merge is not None:
            return self.merge(torch.cat([x, skip], dim=1))
        return x + skip


class TrunkBlock(nn.Module):
    """Conv block, then WAB, SSMB, FSB, MoE-TX, RepMix (each residual, each optional)."""

    def __init__(self, cfg: EHRSRConfig, channels: int, index: int, drop_path: float) -> None:
        super().__init__()
        self.conv = _conv_block(cfg.block_type, channels, cfg.ffn_expansion, cfg.dropout)
        wab, ssm, fsb, moe, rep = cfg.wab, cfg.ssm, cfg.fsb, cfg.moe, cfg.repmix
        self.wab = (
            WindowAttentionBlock(
                channels,
                window_size=wab.window_size,
                heads=wab.heads,
                shift=wab.shift and index % 2 == 1,  # Swin: every second block is shifted
                ffn_expansion=wab.ffn_expansion,
                dropout=cfg.dropout,
                drop_path=drop_path,
            )
            if wab.enabled
            else nn.Identity()
        )
        self.ssm = (
            SSMBlock(
                channels,
                d_state=ssm.d_state,
                expand=ssm.expand,
                dt_rank=ssm.dt_rank,
                directions=ssm.directions,
                conv_kernel=ssm.conv_kernel,
                drop_path=drop_path,
            )
            if ssm.enabled
            else nn.Identity()
        )
        self.fsb = FrequencySeparationBlock(channels, fsb.cutoff, fsb.n_bins) if fsb.enabled else nn.Identity()
        self.moe = (
            MoEBlock(
                channels,
                n_experts=moe.n_experts,
                top_k=moe.top_k,
                expansion=moe.expansion,
                capacity_factor=moe.capacity_factor,
                balance_weight=moe.balance_weight,
                entropy_weight=moe.entropy_weight,
                dropout=cfg.dropout,
                drop_path=drop_path,
            )
            if moe.enabled
            else nn.Identity()
        )
        self.repmix = (
            RepMixBlock(channels, rep.kernel_size, rep.partial_ratio, drop_path) if rep.enabled else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.wab(x)
        x = self.ssm(x)
        x = self.fsb(x)
        x = self.moe(x)
        return self.repmix(x)


class EHRSR(nn.Module):
    def __init__(self, config: EHRSRConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        levels = cfg.msg.levels
        trunk_level = cfg.resolved_trunk_level
        self.scale = cfg.scale
        self.levels = levels
        self.trunk_level = trunk_level
        self.size_multiple = 2**levels
        widths = [cfg.width * 2**i for i in range(levels + 1)]

        self.stem = nn.Sequential(RepConv(cfg.in_channels, cfg.width, identity=False), GatedConv(cfg.width))
        self.stem_noise = _noise(cfg)

        self.down = nn.ModuleList(Downsample(widths[i], cfg.msg.downsample) for i in range(levels))
        self.encoders = nn.ModuleList(
            nn.Sequential(
                *(_conv_block(cfg.block_type, widths[i + 1], cfg.ffn_expansion, cfg.dropout) for _ in range(depth))
            )
            for i, depth in enumerate(cfg.msg.depths)
        )
        self.encoder_noise = nn.ModuleList(_noise(cfg) for _ in range(levels))

        rates = [cfg.drop_path * i / max(1, cfg.trunk_blocks - 1) for i in range(cfg.trunk_blocks)]
        self.trunk = nn.Sequential(
            *(TrunkBlock(cfg, widths[trunk_level], i, rate) for i, rate in enumerate(rates))
        )
        self.trunk_noise = _noise(cfg)

        # decoder stage i (i = levels-1 .. 0) goes from level i+1 to level i
        self.up = nn.ModuleList(Upsample(widths[i + 1]) for i in range(levels))
        self.fusions = nn.ModuleList(
            SkipFusion(widths[i], cfg.msg.skip_fusion, cfg.msg.attention_gate) for i in range(levels)
        )
        # level i >= 1 mirrors the encoder's blocks of that level; level 0 has only the head
        self.decoders = nn.ModuleList(
            nn.Sequential(
                *(
                    _conv_block(cfg.block_type, widths[i], cfg.ffn_expansion, cfg.dropout)
                    for _ in range(cfg.msg.depths[i - 1] if i >= 1 else 0)
                )
            )
            for i in range(levels)
        )
        self.decoder_noise = nn.ModuleList(_noise(cfg) for _ in range(levels))

        out = cfg.out_channels * cfg.scale**2
        self.head = nn.Sequential(
            nn.Conv2d(cfg.width, out, 3, padding=1),
            nn.PixelShuffle(cfg.scale) if cfg.scale > 1 else nn.Identity(),
        )
        # The predicted residual starts at zero, so the untrained network returns the bicubic-
        # upsampled input (SR) or the input itself (restoration). Brief training then only has to
        # learn what to add; with the default init it first has to unlearn a random residual
        # (measured on the built-in images, x4, 108 steps: 28.6 dB with the default init, 29.5 dB
        # zero-initialised; bicubic is 29.4 dB). Gradients still reach the body after one step.
        nn.init.zeros_(self.head[0].weight)
        nn.init.zeros_(self.head[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"EHRSR expects (B, {self.config.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        x_in, _, _ = pad_to_multiple(x, self.size_multiple)

        feat = self.stem_noise(self.stem(x_in))
        skips = []
        for level in range(self.levels):
            skips.append(feat)
            feat = self.encoder_noise[level](self.encoders[level](self.down[level](feat)))
        if self.trunk_level == self.levels:
            feat = self.trunk_noise(self.trunk(feat))
        for level in reversed(range(self.levels)):
            feat = self.fusions[level](self.up[level](feat), skips[level])
            feat = self.decoder_noise[level](self.decoders[level](feat))
            if level == self.trunk_level:
                feat = self.trunk_noise(self.trunk(feat))

        residual = self.head(feat)[:, :, : height * self.scale, : width * self.scale]
        # the base is the unpadded input's, so an untrained network is exactly bicubic (or identity)
        if self.scale > 1:
            base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        else:
            base = x
        return base + residual

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE blocks' weighted auxiliary losses from the last forward (0 without MoE).

        Training adds this to the reconstruction loss: ``loss = l1 + model.aux_loss()``.
        """
        total = None
        for module in self.modules():
            if isinstance(module, MoEBlock):
                loss = module.aux_loss()
                if loss is not None:
                    total = loss if total is None else total + loss
        if total is None:
            return torch.zeros((), device=self.head[0].weight.device)
        return total


def build_model(config: EHRSRConfig | dict) -> EHRSR:
    """Build the network for a configuration (an ``EHRSRConfig`` or a dict for ``from_dict``)."""
    if isinstance(config, dict):
        config = EHRSRConfig.from_dict(config)
    if not isinstance(config, EHRSRConfig):
        raise TypeError(f"build_model expects an EHRSRConfig or a dict, got {type(config).__name__}")
    return EHRSR(config)


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 3) -> str | None:
    """Why ``state`` does not load into ``model`` with ``strict=True``, in one line naming the first
    ``limit`` tensors of each kind (those whose shapes differ, with both shapes; those missing
    from ``state``; those the model lacks); None when it loads. PyTorch's own message starts
    with a line that names none of them."""
    expected = model.state_dict()
    reshaped = [f"{name} (file {tuple(tensor.shape)}, model {tuple(expected[name].shape)})"
                for name, tensor in state.items() if name in expected and tensor.shape != expected[name].shape]
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    parts = []
    for what, names in (("of another shape", reshaped), ("missing from the file", missing),
                        ("unknown to the model", unexpected)):
        if names:
            more = f", and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{len(names)} tensor{'s' if len(names) != 1 else ''} {what}: {', '.join(names[:limit])}{more}")
    return "; ".join(parts) or None
