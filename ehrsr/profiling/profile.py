"""``profile_model``: MACs, parameters, latency and peak memory of one model on one device.

What is profiled (``docs/profiling.md``, "What is profiled"): an EHR-SR model in its deploy form
(``ehrsr.reparameterize``: fused convs, no training branches, eval mode); any other module as
given, in eval mode (its training flags are restored afterwards, and it is copied rather than
moved when it must go to another device or memory format). Everything runs under
``torch.inference_mode()``. MACs are counted on the CPU in float32 (``counting.count_macs``);
latency and memory are measured on ``device`` with ``dtype`` (autocast for float16 / bfloat16).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ehrsr import faults
from ehrsr.profiling.counting import (
    DEPLOY_EHRSR,
    DEPLOY_GENERIC,
    MacCount,
    count_prepared,
    deploy_form,
    eval_mode,
    is_ehrsr_model,
    validate_input_shape,
)
from ehrsr.profiling.latency import cpu_threads, measure_latency, parse_device, parse_dtype, resolve_budget
from ehrsr.profiling.memory import measure_peak_memory

__all__ = ["Profile", "profile_model"]

log = logging.getLogger(__name__)

NOT_MEASURED = "not measured (measure_memory=False)"


@dataclass(frozen=True)
class Profile:
    """Cost of one model on one device. MACs: one multiply-accumulate = 1; memory in MiB."""

    macs: int  # fvcore, deploy form, at ``macs_input_shape`` ("FLOPs (fvcore)" in NTIRE tables)
    macs_ptflops: int | None  # ptflops cross-check with the same rules (None: not run)
    params: int  # the model as given, every branch included
    params_deploy: int  # the deploy form (fused; nothing counted twice)
    latency_ms: float  # median of ``repeats`` timed passes
    latency_ms_p10: float
    latency_ms_p90: float
    peak_memory_mb: float | None  # beyond weights and input, one pass (None: not measured)
    peak_memory_total_mb: float | None  # including weights and input
    memory_method: str  # how memory was measured
    device: str  # GPU model, or CPU model and threads
    unsupported_ops: dict[str, int]  # operators a counter could not price (empty for EHR-SR)
    input_shape: tuple[int, ...]  # input used for latency and memory
    macs_input_shape: tuple[int, ...]  # input used for counting
    dtype: str  # float32, float16 or bfloat16 (autocast)
    warmup: int  # untimed passes run before timing
    repeats: int  # timed passes
    threads: int | None  # CPU threads (None on GPU)
    channels_last: bool
    latency_samples_ms: tuple[float, ...]  # every timed pass
    by_operator: dict[str, int]  # fvcore MACs per operator family
    macs_constant: int  # input-independent MACs left out of ``macs`` (weights-only work)
    deploy_form: str  # what was profiled

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (tuples as lists)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data


def profile_model(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 256, 256),
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    channels_last: bool = False,
    measure_memory: bool = True,
    macs_input_shape: Sequence[int] | None = None,
    mac_count: MacCount | None = None,
    latency_budget_s: float | None = None,
) -> Profile:
    """Count, time and measure ``model`` (module docstring says what exactly is profiled).

    ``warmup`` / ``repeats`` None: chosen automatically from a calibration pass (see
    ``ehrsr.profiling.latency``). ``threads``: CPU threads for the whole profile (restored
    afterwards; None keeps the current setting). ``macs_input_shape`` defaults to ``input_shape``;
    the NTIRE convention counts at ``(1, 3, 256, 256)``. ``mac_count``: the result of an earlier
    ``count_macs(model, macs_input_shape)`` (a search counts first to refuse over-limit
    configurations); it is reused instead of counting again. ``latency_budget_s``: seconds of timed
    passes an automatic plan aims for (default 1 s; at least 5 timed passes whatever the budget).
    Invalid arguments raise ``ValueError``.
    """
    faults.inject("profile-error")  # EHRSR_FAULT (tests only; nothing when unset)
    shape = validate_input_shape(input_shape, model)
    macs_shape = validate_input_shape(macs_input_shape if macs_input_shape is not None else shape, model)
    dev = parse_device(device)
    dtype_name, _ = parse_dtype(dtype)
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum} or None (automatic), got {value!r}")
    resolve_budget(dev.type, latency_budget_s)
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be true or false, got {channels_last!r}")
    if channels_last and len(shape) != 4:
        raise ValueError(f"channels_last needs a 4-D input_shape, got {shape}")
    if mac_count is not None:
        expected = (macs_shape, DEPLOY_EHRSR if is_ehrsr_model(model) else DEPLOY_GENERIC)
        if not isinstance(mac_count, MacCount) or (mac_count.input_shape, mac_count.deploy_form) != expected:
            raise ValueError(
                f"mac_count must be count_macs(model, {macs_shape}) for this model, got "
                f"{getattr(mac_count, 'input_shape', mac_count)!r}"
            )

    with cpu_threads(threads if dev.type == "cpu" else None) as n_threads:
        deploy, description = deploy_form(model)
        copied = deploy is not model
        log.info("profiling %s (%s) on %s", type(model).__name__, description, dev)
        count = mac_count if mac_count is not None else count_prepared(model, deploy, description, macs_shape)

        runtime = deploy
        if _needs_copy(deploy, dev, channels_last) and not copied:
            runtime = copy.deepcopy(deploy)
        runtime = runtime.to(dev)
        if channels_last:
            runtime = runtime.to(memory_format=torch.channels_last)
        with eval_mode(runtime):
            x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            timing = measure_latency(
                runtime, x, dtype=dtype_name, warmup=warmup, repeats=repeats, budget_s=latency_budget_s
            )
            memory = measure_peak_memory(runtime, x, dtype=dtype_name) if measure_memory else None

    return Profile(
        macs=count.macs,
        macs_ptflops=count.macs_ptflops,
        params=count.params,
        params_deploy=count.params_deploy,
        latency_ms=timing.latency_ms,
        latency_ms_p10=timing.latency_ms_p10,
        latency_ms_p90=timing.latency_ms_p90,
        peak_memory_mb=memory.peak_memory_mb if memory else None,
        peak_memory_total_mb=memory.peak_memory_total_mb if memory else None,
        memory_method=memory.method if memory else NOT_MEASURED,
        device=timing.device,
        unsupported_ops=count.unsupported_ops,
        input_shape=shape,
        macs_input_shape=macs_shape,
        dtype=dtype_name,
        warmup=timing.warmup,
        repeats=timing.repeats,
        threads=n_threads if dev.type == "cpu" else None,
        channels_last=channels_last,
        latency_samples_ms=timing.samples_ms,
        by_operator=count.by_operator,
        macs_constant=count.macs_constant,
        deploy_form=description,
    )


def _needs_copy(module: nn.Module, device: torch.device, channels_last: bool) -> bool:
    """Would running on ``device`` (in ``channels_last``) modify the caller's module in place?"""
    if channels_last:
        return True
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
            return True
    return False
