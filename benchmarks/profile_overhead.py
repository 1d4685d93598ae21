"""Overhead of profiling: its share of a default CPU trial, measured, not assumed.

Target: profiling under 10 % of a default CPU trial. A default CPU trial is what
``python run_search.py`` runs with no options on a machine without CUDA: the ``tiny`` space's
fidelity (batch 8, 32x32 LR patches, 108 steps to the top rung, an evaluation at the 36-step
rung and one at the end on the built-in validation images), then the cost of the deploy form at
the NTIRE size, 256x256. For configurations from the tiny space's cheapest corner to its most
expensive one the script trains and evaluates exactly that, and profiles the way the search does
(``count_macs`` once, then ``profile_model`` with the search's latency plan, 0.25 s of timed
passes) and the way ``deploy`` does (the full 1 s plan). It prints each part's seconds and the
share of the trial spent on profiling.

Timings on a shared machine are noisy: the script prints the load average. It uses the threads
the search would (torch's default) unless ``--threads`` says otherwise.

    python benchmarks/profile_overhead.py [--size 256] [--threads N] [--smoke]

``--smoke``: the cheapest configuration, the test fixture space ``micro``'s fidelity (8 steps) and a
16x16 profile input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import parse_args, print_table
from ehrsr import EHRSRConfig, build_model
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.metrics import evaluate
from ehrsr.profiling import count_macs, profile_model
from ehrsr.search.space import load_space
from ehrsr.search.study import SEARCH_LATENCY_BUDGET_S
from ehrsr.training import train

TINY_MODULES = {  # the tiny space's module settings, every module on
    "wab": {"enabled": True, "heads": 2, "window_size": 4},
    "ssm": {"enabled": True, "directions": 1, "d_state": 8},
    "fsb": {"enabled": True},
    "moe": {"enabled": True, "n_experts": 4, "top_k": 2},
    "repmix": {"enabled": True, "kernel_size": 7},
    "noise": {"enabled": True},
}

# from the tiny space's cheapest corner to its most expensive one (x4)
CONFIGS: dict[str, dict] = {
    "conv-only w8 L1": {"width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1},
    "conv-only w12 L1 (reference)": {"width": 12, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1},
    "all-on w12 L1 (reference)": {"width": 12, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1,
                                  **TINY_MODULES},
    "all-on w16 L2 t2": {"width": 16, "msg": {"levels": 2, "depths": [1, 1]}, "trunk_blocks": 2, **TINY_MODULES},
    "all-on w24 L2x2 t2": {"width": 24, "msg": {"levels": 2, "depths": [2, 2]}, "trunk_blocks": 2, **TINY_MODULES},
    "worst: all-on w24 L0 t2": {"width": 24, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 2, **TINY_MODULES},
}


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="square LR profile input (default 256, NTIRE)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, as the search)")
    parser.add_argument("--space", default="tiny", help="the space whose fidelity a trial trains with")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                        help="a subset of the configurations, by name")
    args = parse_args(parser, argv, smoke={"size": 16, "space": str(ROOT / "tests" / "fixtures" / "micro.yaml"),
                                           "configs": ["conv-only w8 L1"]})
    if args.threads:
        torch.set_num_threads(args.threads)
    fidelity = load_space(args.space).fidelity
    train_set, val_set = prepare_data(TaskConfig(task="sr", scale=4), progress=False)
    shape = (1, 3, args.size, args.size)

    # the first forward of a process pays one-time costs (oneDNN kernels, lazy init): not profiling's
    with torch.inference_mode():
        build_model(EHRSRConfig.from_dict({"width": 8, **TINY_MODULES})).eval()(torch.rand(1, 3, 32, 32))

    rows, shares = [], []
    for name in args.configs:
        data = CONFIGS[name]
        config = EHRSRConfig.from_dict({"scale": 4, **data})
        torch.manual_seed(0)
        model = build_model(config)
        count, count_s = _timed(lambda m=model: count_macs(m, shape))
        search, search_s = _timed(lambda m=model, c=count: profile_model(
            m, shape, mac_count=c, latency_budget_s=SEARCH_LATENCY_BUDGET_S))
        full, full_s = _timed(lambda m=model, c=count: profile_model(m, shape, mac_count=c))
        evals = []
        _, train_s = _timed(lambda m=model: train(
            m, train_set, fidelity.train_settings({"lr": 1e-3}), seed=0, eval_steps=fidelity.rung_steps[:-1],
            on_eval=lambda step, net: evals.append(evaluate(net, val_set, crop_border=4).seconds)))
        final, _ = _timed(lambda m=model: evaluate(m, val_set, crop_border=4))
        eval_s = sum(evals) + final.seconds
        train_s -= sum(evals)
        profile_s = count_s + search_s
        share = profile_s / (train_s + eval_s + profile_s)
        shares.append(share)
        rows.append([name, f"{count.params / 1e6:.3f} M", f"{count.macs / 1e9:.2f}", train_s, eval_s, count_s,
                     search_s, f"{search.warmup} + {search.repeats}", f"{search.latency_ms:.1f}", f"{100 * share:.1f}%",
                     full_s, f"{full.warmup} + {full.repeats}", f"{full.latency_ms:.1f}",
                     f"{100 * (count_s + full_s) / (train_s + eval_s + count_s + full_s):.1f}%"])
        print(f"[overhead] {name}: train {train_s:.1f} s, eval {eval_s:.1f} s, count {count_s:.2f} s, "
              f"profile {search_s:.2f} s (search plan) / {full_s:.2f} s (full plan)", file=sys.stderr, flush=True)
    print_table(
        ["config", "params", f"MACs (G) @{args.size}", "train s", "eval s", "count s", "profile s",
         "warm-up + timed", "latency ms", "profiling share", "full-plan profile s", "warm-up + timed (full)",
         "latency ms (full)", "share (full plan)"],
        rows,
        title=f"Profiling share of a default CPU trial ({args.space} fidelity: {fidelity.max_steps} steps, batch "
              f"{fidelity.batch_size}, {fidelity.patch_size}x{fidelity.patch_size} patches; cost at "
              f"{args.size}x{args.size}; search latency plan {SEARCH_LATENCY_BUDGET_S} s, full plan 1 s)",
    )
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    shares.sort()
    print(f"\nCPU: {full.device}; load average (1, 5, 15 min): {load} on {os.cpu_count()} cores")
    print(f"profiling share with the search plan: median {100 * shares[len(shares) // 2]:.1f}%, "
          f"max {100 * shares[-1]:.1f}% (target < 10 %)")


if __name__ == "__main__":
    main()
