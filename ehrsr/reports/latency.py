"""What a report says about latencies predicted by per-device latency models (docs/latency_models.md).

Predicted numbers are marked as predicted wherever they appear (``study_schema.metric_header``
and ``StudyInfo.axis_label`` say "latency on NAME, predicted (ms)"); this section states, per
device, the model file and the accuracy it measured on held-out networks at calibration, how many
trials fell back to a measurement here (units the model lacks), and how many of this machine's
latency measurements the canary flagged as taken on a busy machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from ehrsr.study_schema import CANARY_ATTR, LATENCY_MODELS_ATTR, LATENCY_SOURCES_ATTR

__all__ = ["latency_section"]


def _accuracy_text(accuracy: dict[str, Any] | None) -> str:
    if not accuracy:
        return "no accuracy stored in the file"
    return (f"median absolute error {accuracy['median_abs_pct_error']:.1f} %, 90th percentile "
            f"{accuracy['p90_abs_pct_error']:.1f} %, Spearman {accuracy['spearman']:.2f} on {accuracy['n']} "
            "held-out networks timed at calibration")


def latency_section(study: optuna.Study) -> str:
    """Markdown (possibly empty) on predicted latencies and the canary; the report appends it."""
    models: dict[str, Any] = study.user_attrs.get(LATENCY_MODELS_ATTR) or {}
    trials = study.get_trials(deepcopy=False)
    canaries = [t.user_attrs[CANARY_ATTR] for t in trials if CANARY_ATTR in t.user_attrs]
    if not models and not canaries:
        return ""
    out = ["## Latency on other devices (predicted)\n\n" if models else "## Latency measurement\n\n"]
    if models:
        out.append("Columns and axes named \"latency on NAME, predicted\" are predictions of the device profile's "
                   "latency model (calibrated on that device with `run_search.py calibrate`), not measurements "
                   "on this machine. Their measured accuracy:\n\n")
        for name, model in models.items():
            fallbacks = sum(
                1 for t in trials
                if ((t.user_attrs.get(LATENCY_SOURCES_ATTR) or {}).get(name) or {}).get("source") == "measured"
            )
            limit = model.get("max_latency_ms")
            out.append(
                f"- **{name}** (`{Path(model['file']).name}`): {_accuracy_text(model.get('accuracy'))}"
                + (f"; limit {limit:g} ms, over-limit configurations refused before training" if limit else "")
                + (f"; {fallbacks} trial{'s' if fallbacks != 1 else ''} had units the model lacks and were "
                   "measured on this machine instead" if fallbacks else "")
                + "\n"
            )
        out.append("\n")
    if canaries:
        contended = sum(1 for c in canaries if c.get("contended"))
        ratios = sorted(float(c["ratio"]) for c in canaries)
        out.append(
            f"This machine's latency was measured next to a canary network in {len(canaries)} trials "
            f"(median ratio to the quiet reference {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f}); "
            f"{contended} {'was' if contended == 1 else 'were'} measured under contention (ratio above the "
            "threshold even after measuring again) and read slower than on a quiet machine.\n\n"
        )
    return "".join(out)
