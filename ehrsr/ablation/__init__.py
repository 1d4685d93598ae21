"""The controlled ablation: retrain a reference configuration with each module switched off or
added back, with several seeds, and tabulate the paired differences (docs/reports.md).

``variants`` builds the plan, ``runner`` trains and records the runs (through
``ehrsr.search.record``), ``table`` computes the table from the stored runs alone.
"""

from __future__ import annotations

from ehrsr.ablation.runner import AblationResult, run_controlled_ablation
from ehrsr.ablation.table import ablation_runs, controlled_table, load_controlled_ablation
from ehrsr.ablation.variants import AblationError, Variant, build_variants, module_settings_from_space

__all__ = [
    "AblationError",
    "AblationResult",
    "Variant",
    "ablation_runs",
    "build_variants",
    "controlled_table",
    "load_controlled_ablation",
    "module_settings_from_space",
    "run_controlled_ablation",
]
