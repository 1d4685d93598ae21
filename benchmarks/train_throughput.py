"""Training throughput: patches/s of brief training, conv-only and with each module on.

    python benchmarks/train_throughput.py [--threads N] [--steps N] [--batch N] [--patch N]
                                          [--device cpu|cuda] [--smoke]

Runs :func:`ehrsr.training.train` (the loop the search uses: sampling, forward, loss + MoE aux,
backward, clipping, AdamW) on the built-in x4 data for a small EHR-SR (width 16, one MSG level,
two trunk blocks), first conv-only and then with each module of ``MODULE_TOGGLES`` switched on
alone. Each model gets 2 warm-up steps, then the median of several timed runs is shown. CPU by default, CUDA
too when present (bf16 autocast and channels_last there, as in the search). On the CPU the SSMB is
timed twice, with its compiled cross-scan and with the PyTorch form (target: the SSMB model at
0.6x or more of the conv-only model's patches/s). ``--smoke``: one timed step of batch 2 on 16-pixel
patches per model (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import print_table
from ehrsr import MODULE_TOGGLES, build_model
from ehrsr.blocks import scan_kernel, ssm
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.training import TrainSettings, train

BASE = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 2}


def throughput(
    config: dict, train_set, device: torch.device, steps: int, batch: int, patch: int, repeats: int
) -> tuple[int, float]:
    """(parameters, median over ``repeats`` runs of training patches per second)."""
    torch.manual_seed(0)
    model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    settings = TrainSettings(steps=steps, lr=1e-4, batch_size=batch, patch_size=patch)
    train(model, train_set, dataclasses.replace(settings, steps=2), device=device)  # warm-up: allocator, kernels, caches
    rates = []
    for _ in range(repeats):
        result = train(model, train_set, settings, device=device)
        rates.append(batch * result.steps_done / result.train_seconds)
    return params, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32, help="LR patch size")
    parser.add_argument("--device", nargs="+", default=["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
    parser.add_argument("--smoke", action="store_true", help="one step of batch 2 on 16-pixel patches per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.repeats, args.batch, args.patch = 1, 1, 2, 16

    with tempfile.TemporaryDirectory() as cache:
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
    variants = {"conv-only": BASE} | {f"+ {name}": {**BASE, name: {"enabled": True}} for name in MODULE_TOGGLES}
    for device_name in args.device:
        device = torch.device(device_name)
        train_set.to(device)
        throughput(BASE, train_set, device, 2, args.batch, args.patch, 1)  # process warm-up, not shown
        rows = []
        baseline = None
        load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        for label, config in variants.items():
            params, patches_per_s = throughput(
                config, train_set, device, args.steps, args.batch, args.patch, args.repeats
            )
            if label == "+ ssm" and device.type == "cpu":  # the same SSMB without the compiled CPU scan
                saved, ssm.SCAN_KERNEL = ssm.SCAN_KERNEL, "torch"
                try:
                    _, torch_rate = throughput(config, train_set, device, args.steps, args.batch, args.patch,
                                               args.repeats)
                finally:
                    ssm.SCAN_KERNEL = saved
                rows.append([f"{label} (PyTorch scan)", params, torch_rate, torch_rate / baseline])
                label = f"{label} ({'compiled scan' if scan_kernel.available() else 'PyTorch scan: ' + str(scan_kernel.reason())})"
            baseline = baseline or patches_per_s
            rows.append([label, params, patches_per_s, patches_per_s / baseline])
            print(f"  timed {label} on {device}", file=sys.stderr)
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        print_table(
            ["model (width 16, 1 level, 2 trunk blocks)", "params", "train patches/s", "vs conv-only"],
            rows,
            title=(
                f"Brief-training throughput on {device}{threads}: x4, batch {args.batch}, LR patch "
                f"{args.patch}; median of {args.repeats} runs of {args.steps} steps after 2 warm-up steps "
                f"(load average {load_before} before, {', '.join(f'{v:.1f}' for v in os.getloadavg())} after)"
            ),
        )


if __name__ == "__main__":
    main()
