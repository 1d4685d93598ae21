"""How well a per-device latency model predicts configurations it never saw, on this CPU.

For each profile (torch 1 thread, torch 2 threads, onnxruntime 1 thread; the input size of
``--input``) the script calibrates a latency model of the tiny space (timing its units), then
draws ``--n`` random configurations that calibration did not use, predicts each, and measures each
whole deploy-form network through the profile's runtime twice: two passes over all
configurations, the second in reverse order, each measurement as the search takes it (the
project's protocol: warm-up, fixed threads, median of ``--network-budget`` seconds of passes;
right after a canary reading, measured again while the canary says the machine is busy,
``ehrsr.profiling.canary.measure_with_canary``). The truth is the mean of the two measurements;
how much the two disagree (the "repeat" columns) is the noise floor no predictor can beat on this
machine. Prints one table; asserts nothing.

    python benchmarks/latency_model.py --n 100 --input 128

``--smoke``: the torch 1-thread profile of the test fixture space ``micro`` at 16x16, two unseen
configurations, the shortest calibration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks._common import parse_args, print_table
from ehrsr.profiling.canary import Canary, measure_with_canary
from ehrsr.profiling.latency_model import (
    LatencyTarget,
    accuracy_of,
    calibrate,
    measure_network,
    sample_configs,
)
from ehrsr.search.space import load_space

PROFILES = {
    "torch-1t": ("torch", 1),
    "torch-2t": ("torch", 2),
    "onnxruntime-1t": ("onnxruntime", 1),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="unseen configurations per profile")
    parser.add_argument("--input", type=int, default=128, help="LR input side (square)")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--profiles", default=",".join(PROFILES), help=f"subset of {', '.join(PROFILES)}")
    parser.add_argument("--network-budget", type=float, default=0.5, help="seconds of timed passes per network")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (1-thread profiles only), immune to other jobs preempting this one")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the latency model files here")
    args = parse_args(parser, argv, smoke={"n": 2, "input": 16, "profiles": "torch-1t", "network_budget": 0.01,
                                           "space": str(ROOT / "tests" / "fixtures" / "micro.yaml")})
    shortest = dict(n_fit=3, n_holdout=3, unit_budget_s=0.002, network_budget_s=0.01) if args.smoke else {}

    space = load_space(args.space)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="ehrsr-latmodel-"))
    rows = []
    headers = ["profile", "clock", "input", "units", "calibration s", "n unseen", "Spearman", "median |err| %",
               "p90 |err| %", "repeat median / p90 %", "repeat Spearman", "predict ms/config", "median measured ms",
               "canary ratio med / max", "busy after retries", "stored hold-out err % / rho"]
    unknown = [n for n in args.profiles.split(",") if n not in PROFILES]
    if unknown:
        parser.error(f"unknown profile {', '.join(unknown)}; choose from {', '.join(PROFILES)}")
    for name in args.profiles.split(","):
        runtime, threads = PROFILES[name]
        if args.clock == "cpu" and threads != 1:
            print(f"{name}: skipped, the cpu clock is a latency only with one thread", file=sys.stderr)
            continue
        target = LatencyTarget(name, "cpu", runtime, threads, "float32", (args.input, args.input))
        start = time.perf_counter()
        model = calibrate(space, target, out_dir / f"{name}.json", resume=False, progress=True, clock=args.clock,
                          log=lambda m: print(m, file=sys.stderr), **shortest)
        calibration_s = time.perf_counter() - start
        used = model.extra["fit_networks"] + model.extra["holdout_networks"]
        seen = {json.dumps(p["config"], sort_keys=True) for p in used}
        canary = Canary(threads=threads)
        canary.calibrate()
        predicted, predict_ms = [], []
        configs = [c for c in sample_configs(space, args.n + 20, seed=999) if json.dumps(c.to_dict(), sort_keys=True) not in seen]
        configs = configs[: args.n]
        for config in configs:
            t0 = time.perf_counter()
            prediction = model.predict(config)
            predict_ms.append(1000 * (time.perf_counter() - t0))
            predicted.append(prediction.latency_ms)
        passes: list[list[float]] = [[0.0] * len(configs), [0.0] * len(configs)]
        ratios, busy = [], 0
        for round_, order in enumerate((range(len(configs)), reversed(range(len(configs))))):
            for done, i in enumerate(order, start=1):
                value, reading, _ = measure_with_canary(
                    lambda c=configs[i]: measure_network(c, target, budget_s=args.network_budget, clock=args.clock),
                    canary, retries=2,
                )
                passes[round_][i] = value
                ratios.append(reading.ratio)
                busy += int(reading.contended)
                if done % 20 == 0:
                    print(f"{name}: pass {round_ + 1}, {done}/{len(configs)} measured", file=sys.stderr)
        measured = [(a + b) / 2 for a, b in zip(*passes)]
        repeat = [100.0 * abs(a - b) / ((a + b) / 2) for a, b in zip(*passes)]
        repeat_rho = accuracy_of(passes[0], passes[1]).spearman
        print(f"{name}: " + json.dumps({"predicted": predicted, "measured": passes, "canary": ratios}), file=sys.stderr)
        acc = accuracy_of(predicted, measured)
        stored = model.accuracy
        rows.append([
            name, args.clock, f"{args.input}x{args.input}", len(model.units), f"{calibration_s:.0f}", acc.n,
            f"{acc.spearman:.3f}", f"{acc.median_abs_pct_error:.1f}", f"{acc.p90_abs_pct_error:.1f}",
            f"{statistics.median(repeat):.1f} / {statistics.quantiles(repeat, n=10)[-1]:.1f}", f"{repeat_rho:.3f}",
            f"{statistics.median(predict_ms):.2f}", f"{statistics.median(measured):.1f}",
            f"{statistics.median(ratios):.2f} / {max(ratios):.2f}", f"{busy} of {len(ratios)}",
            f"{stored.median_abs_pct_error:.1f} / {stored.spearman:.2f}" if stored else "-",
        ])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)  # survives a later failure
    print_table(
        headers,
        rows,
        title=f"Latency model accuracy, space '{args.space}', this CPU (shared with other jobs: see canary ratio)",
    )


if __name__ == "__main__":
    main()
