"""EHR-SR building blocks: plain ``nn.Module``s with explicit keyword arguments (no config objects)."""

from __future__ import annotations

from ehrsr.blocks.attention import GDFN, WindowAttention, WindowAttentionBlock
from ehrsr.blocks.frequency import FrequencySeparationBlock
from ehrsr.blocks.gated import GatedCNNBlock, GatedConv
from ehrsr.blocks.layers import DropPath, LayerNorm2d, SimpleGate, pad_to_multiple
from ehrsr.blocks.moe import ExpertFFN, MoEBlock, load_balance_loss
from ehrsr.blocks.naf import NAFBlock
from ehrsr.blocks.noise import NoiseInjection
from ehrsr.blocks.rep import PartialLargeKernel, RepConv, RepMixBlock
from ehrsr.blocks.ssm import (
    SSMBlock,
    cross_scan,
    cross_scan_macs,
    cross_scan_reference,
    selective_scan,
    selective_scan_exportable,
    selective_scan_macs,
    selective_scan_parallel,
    selective_scan_sequential,
)

__all__ = [
    "GDFN",
    "DropPath",
    "ExpertFFN",
    "FrequencySeparationBlock",
    "GatedCNNBlock",
    "GatedConv",
    "LayerNorm2d",
    "MoEBlock",
    "NAFBlock",
    "NoiseInjection",
    "PartialLargeKernel",
    "RepConv",
    "RepMixBlock",
    "SSMBlock",
    "SimpleGate",
    "WindowAttention",
    "WindowAttentionBlock",
    "cross_scan",
    "cross_scan_macs",
    "cross_scan_reference",
    "load_balance_loss",
    "pad_to_multiple",
    "selective_scan",
    "selective_scan_exportable",
    "selective_scan_macs",
    "selective_scan_parallel",
    "selective_scan_sequential",
]
