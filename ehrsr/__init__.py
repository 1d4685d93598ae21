"""ehrsr: hardware-aware architecture search and ablation suite for the EHR-SR network."""

from __future__ import annotations

from ehrsr.config import MODULE_TOGGLES, EHRSRConfig
from ehrsr.model import EHRSR, build_model
from ehrsr.reparam import reparameterize

__all__ = ["EHRSR", "MODULE_TOGGLES", "EHRSRConfig", "build_model", "reparameterize"]
__version__ = "0.1.0"
