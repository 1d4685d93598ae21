"""Overhead of profiling: seconds to count and to fully profile EHR-SR configurations on the CPU.

Target: a full ``profile_model`` under 10 % of a default CPU trial. The brief for this work says to
assume a default CPU trial takes about 40 s until the lead's tiny CPU space exists (``--trial-s``);
the tiny space being written on the ``search`` branch budgets 20 s per trial. The configurations
grow from the tiny space's conv-only corner (widths 8-24, at most two MSG levels, one scan
direction, 4x4 windows) to wider, deeper networks. Timings on a shared machine are noisy, and with
several threads OpenMP spins against the other processes: the script prints the load average and
defaults to one thread.

    PYTHONPATH=. python benchmarks/profile_overhead.py [--sizes 64 256] [--threads 1] [--trial-s 40]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ehrsr import EHRSRConfig, build_model
from ehrsr.profiling import count_macs, profile_model

TINY_MODULES = {  # the tiny space's module settings
    "wab": {"enabled": True, "heads": 2, "window_size": 4},
    "ssm": {"enabled": True, "directions": 1, "d_state": 8},
    "fsb": {"enabled": True},
    "moe": {"enabled": True},
    "repmix": {"enabled": True, "kernel_size": 7},
    "noise": {"enabled": True},
}
DEFAULT_MODULES = {name: {"enabled": True} for name in ("wab", "ssm", "fsb", "moe", "repmix", "noise")}

# growing size
CONFIGS: dict[str, dict] = {
    "tiny conv-only w8 L2": {"width": 8, "trunk_blocks": 1},
    "tiny all-on w16 L2 t2": {"width": 16, **TINY_MODULES},
    "tiny all-on w24 L2x2 t2": {"width": 24, "msg": {"levels": 2, "depths": [2, 2]}, **TINY_MODULES},
    "tiny worst: all-on w24 L0 t2": {"width": 24, "msg": {"levels": 0, "depths": []}, **TINY_MODULES},
    "all-on w32 L2x2 t4 (defaults)": {"width": 32, "trunk_blocks": 4, "msg": {"levels": 2, "depths": [2, 2]},
                                      **DEFAULT_MODULES, "wab": {"enabled": True, "heads": 4}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="square LR input sides")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for profiling")
    parser.add_argument("--trial-s", type=float, default=40.0, help="assumed seconds of a default CPU trial")
    args = parser.parse_args()

    # the first forward of a process pays one-time costs (oneDNN kernels, lazy init): not profiling's
    warm = build_model(EHRSRConfig.from_dict({"width": 8, **TINY_MODULES})).eval()
    with torch.inference_mode():
        warm(torch.rand(1, 3, 32, 32))

    rows = [
        "| config | input | params | MACs (G) | count_macs (s) | profile_model (s) | latency median (ms) "
        f"| warm-up + timed passes | share of a {args.trial_s:.0f} s trial | share of a 20 s tiny trial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        shape = (1, 3, size, size)
        for name, data in CONFIGS.items():
            torch.manual_seed(0)
            model = build_model(EHRSRConfig.from_dict(data))
            previous = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            start = time.perf_counter()
            counted = count_macs(model, shape)
            count_s = time.perf_counter() - start
            torch.set_num_threads(previous)
            start = time.perf_counter()
            profile = profile_model(model, shape, threads=args.threads)  # counts again (no mac_count)
            profile_s = time.perf_counter() - start
            share = 100 * profile_s / args.trial_s
            rows.append(
                f"| {name} | {size}x{size} | {counted.params / 1e6:.3f} M | {counted.macs / 1e9:.3f} | {count_s:.2f} "
                f"| {profile_s:.2f} | {profile.latency_ms:.1f} | {profile.warmup} + {profile.repeats} | {share:.1f} % "
                f"| {100 * profile_s / 20:.1f} % |"
            )
            print(f"[overhead] {name} @ {size}: count {count_s:.2f} s, profile {profile_s:.2f} s", flush=True)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"\nCPU: {profile.device}; load average (1, 5, 15 min): {load} on {os.cpu_count()} cores.\n"
        f"A default CPU trial is ASSUMED to take {args.trial_s:.0f} s (this work's brief, until the tiny space "
        "lands on main); the tiny space on the search branch budgets 20 s per trial.\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
