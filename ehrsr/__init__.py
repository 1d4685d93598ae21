"""ehrsr: hardware-aware architecture search and ablation suite for the EHR-SR network."""

from __future__ import annotations

from ehrsr.config import EHRSRConfig

__all__ = ["EHRSRConfig"]
__version__ = "0.1.0"
