"""Hand-designed efficient-SR baselines trained with a search protocol, next to bicubic.

Trains each baseline from ``ehrsr.baselines`` (as published-init and "+bicubic skip") with one
protocol (steps, batch, patch, lr, loss; default: the tiny space's 108-step top rung) on the
built-in images, and prints params and MACs (fvcore convention, one multiply-add = 1, deploy
form, 1x3x256x256 LR), CPU latency (median of timed runs after warm-up, 64x64 LR, one thread)
and PSNR (Y, crop = scale, per evaluation unit) with a paired 95 % interval of the gain over
bicubic on the same units (``ehrsr.stats.paired_interval``). The integrator extends it with the
searched EHR-SR rows.

    PYTHONPATH=. python benchmarks/baselines.py [--size tiny] [--steps 108] [--names SPAN,RLFN]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_ms, print_table

from ehrsr.baselines import available_baselines, baseline_label, build_baseline, deploy_baseline
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.metrics import bicubic_baseline, evaluate
from ehrsr.profiling import count_macs
from ehrsr.stats import paired_interval, verdict
from ehrsr.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--names", help="comma list (default: every available baseline)")
    parser.add_argument("--steps", type=int, default=108, help="tiny space: 108 (top rung)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32, help="LR patch side")
    parser.add_argument("--lr", type=float, default=6e-4, help="tiny space samples 2e-4..2e-3 (log); 6e-4 is its middle")
    parser.add_argument("--loss", choices=("l1", "charbonnier"), default="l1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 4
    train_set, val_set = prepare_data(TaskConfig(scale=scale), progress=False)
    bicubic = bicubic_baseline(val_set)
    infos = [i for i in available_baselines() if i.available]
    for info in available_baselines():
        if not info.available:
            print(f"[baselines] skipping {info.name}: {info.reason}")
    names = args.names.split(",") if args.names else [i.name for i in infos]
    rows = [["bicubic", "-", "-", "-", f"{bicubic.psnr:.2f}", "-", "-"]]
    for name in names:
        for skip in (False, True):
            start = time.perf_counter()
            torch.manual_seed(args.seed)
            model = build_baseline(name, scale, args.size, bicubic_skip=skip)
            train(model, train_set, steps=args.steps, lr=args.lr, batch_size=args.batch, patch_size=args.patch,
                  loss=args.loss, seed=args.seed)
            deployed = deploy_baseline(model)
            result = evaluate(deployed, val_set, crop_border=scale)
            deltas = np.array(result.psnr_per_image) - np.array(bicubic.psnr_per_image)
            interval = paired_interval(deltas)
            macs = count_macs(deployed, (1, 3, 256, 256))
            x = torch.rand(1, 3, 64, 64)
            with torch.inference_mode():
                latency_ms = median_ms(lambda: deployed(x), warmup=3, repeats=15)
            rows.append([
                baseline_label(name, skip), f"{macs.params_deploy / 1e3:.1f}", f"{macs.macs / 1e9:.3f}",
                f"{latency_ms:.1f}", f"{result.psnr:.2f}",
                f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]",
                verdict(interval, higher_is_better=True),
            ])
            print(f"[baselines] {' | '.join(rows[-1])} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(
        ["model", "params (K)", "MACs 256² (G)", "CPU ms 64² (1 thr)", "PSNR-Y (dB)", "vs bicubic, 95 % CI (dB)", "verdict"],
        rows,
        title=f"{args.size} baselines, {args.steps} steps, batch {args.batch}, patch {args.patch}, lr {args.lr}, "
        f"{args.loss}, seed {args.seed}; {len(val_set)} evaluation units ({val_set.description.split(';')[0]}). "
        "Machine shared with other jobs: latencies are indicative only.",
    )


if __name__ == "__main__":
    main()
