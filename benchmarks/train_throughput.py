"""Training throughput: patches/s of brief training, conv-only and with each module on.

    python benchmarks/train_throughput.py [--threads N] [--steps N] [--batch N] [--patch N]
                                          [--device cpu|cuda] [--smoke] [--clock wall|cpu]

Runs :func:`ehrsr.training.train` (the loop the search uses: sampling, forward, loss + MoE aux,
backward, clipping, AdamW) on the built-in x4 data for a small EHR-SR (width 16, one MSG level,
two trunk blocks), first conv-only and then with each module of ``MODULE_TOGGLES`` switched on
alone. Each model gets 2 warm-up steps, then the median of several timed runs, interleaved (one run
of every model per round), is shown. CPU by default, CUDA too when present (bf16 autocast and
channels_last there, as in the search). On the CPU the SSMB is timed twice, with its compiled
cross-scan and with the PyTorch form (target: the SSMB model at 0.6x or more of the conv-only
model's patches/s). ``--smoke``: one timed step of batch 2 on 16-pixel patches per model (seconds).
``--threads 1 --clock cpu`` times the CPU runs in CPU time (one thread's compute, for a busy machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_clock, print_table
from ehrsr import MODULE_TOGGLES, build_model
from ehrsr.blocks import scan_kernel, ssm
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.training import TrainSettings, train

BASE = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 2}


@dataclasses.dataclass
class Variant:
    """One timed model: a configuration, and for the SSMB whether its compiled scan is used."""

    label: str
    config: dict
    scan: str = "auto"  # ssm.SCAN_KERNEL while it trains
    model: torch.nn.Module | None = None
    rates: list[float] = dataclasses.field(default_factory=list)


def run_once(variant: Variant, train_set, settings: TrainSettings, device: torch.device, clock) -> float:
    """Training patches per second of one run of ``settings.steps`` steps (wall clock: the loop's own
    training time; CPU clock: the process's CPU time around the run)."""
    saved, ssm.SCAN_KERNEL = ssm.SCAN_KERNEL, variant.scan
    try:
        start = clock()
        result = train(variant.model, train_set, settings, device=device)
        seconds = result.train_seconds if clock is time.perf_counter else clock() - start
    finally:
        ssm.SCAN_KERNEL = saved
    return settings.batch_size * result.steps_done / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32, help="LR patch size")
    parser.add_argument("--device", nargs="+", default=["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
    parser.add_argument("--smoke", action="store_true", help="one step of batch 2 on 16-pixel patches per model")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU runs: wall clock, or CPU time (with --threads 1, for a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = cpu_clock(args.clock, args.threads)
    if args.smoke:
        args.steps, args.repeats, args.batch, args.patch = 1, 1, 2, 16

    with tempfile.TemporaryDirectory() as cache:
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
    settings = TrainSettings(steps=args.steps, lr=1e-4, batch_size=args.batch, patch_size=args.patch)
    for device_name in args.device:
        device = torch.device(device_name)
        device_clock = clock if device.type == "cpu" else time.perf_counter
        train_set.to(device)
        variants = [Variant("conv-only", BASE)]
        for name in MODULE_TOGGLES:
            config = {**BASE, name: {"enabled": True}}
            if name == "ssm" and device.type == "cpu":  # the same SSMB with and without the compiled CPU scan
                used = "compiled scan" if scan_kernel.available() else f"PyTorch scan: {scan_kernel.reason()}"
                variants += [Variant(f"+ ssm ({used})", config), Variant("+ ssm (PyTorch scan)", config, "torch")]
            else:
                variants.append(Variant(f"+ {name}", config))
        load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        for variant in variants:
            torch.manual_seed(0)
            variant.model = build_model(variant.config)
            # warm-up: allocator, kernels, caches
            run_once(variant, train_set, dataclasses.replace(settings, steps=2), device, device_clock)
        for _ in range(args.repeats):  # interleaved: one run of every model per round
            for variant in variants:
                variant.rates.append(run_once(variant, train_set, settings, device, device_clock))
        baseline = statistics.median(variants[0].rates)
        rows = []
        for variant in variants:
            rate = statistics.median(variant.rates)
            params = sum(p.numel() for p in variant.model.parameters())
            rows.append([variant.label, params, rate, rate / baseline])
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        clock_name = "CPU time" if device_clock is time.process_time else "wall clock"
        print_table(
            ["model (width 16, 1 level, 2 trunk blocks)", "params", "train patches/s", "vs conv-only"],
            rows,
            title=(
                f"Brief-training throughput on {device}{threads} ({clock_name}): x4, batch {args.batch}, LR patch "
                f"{args.patch}; median of {args.repeats} interleaved runs of {args.steps} steps after 2 warm-up "
                f"steps (load average {load_before} before, {', '.join(f'{v:.1f}' for v in os.getloadavg())} after)"
            ),
        )


if __name__ == "__main__":
    main()
