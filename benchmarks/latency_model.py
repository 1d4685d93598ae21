"""How well a per-device latency model predicts configurations it never saw, on this CPU.

For each profile (torch 1 thread, torch 2 threads, onnxruntime 1 thread with its units timed
inside whole profiled networks, and the same onnxruntime target with each unit exported and timed
alone; the input size of ``--input``) the script calibrates a latency model of the space (timing
its units), then draws ``--n`` random configurations that no calibration of that target used,
predicts each, and measures each whole deploy-form network through the profile's runtime twice:
two passes over all configurations, the second in reverse order, each measurement as the search
takes it (the project's protocol: warm-up, fixed threads, median of ``--network-budget`` seconds
of passes; right after a canary reading, measured again while the canary says the machine is
busy, ``ehrsr.profiling.canary.measure_with_canary``). Profiles of one target (runtime and
threads) share these measurements, so their models are compared on the same truth. The truth is
the mean of the two measurements; how much the two disagree (the "repeat" columns) is the noise
floor no predictor can beat on this machine. Prints one table and the load average; asserts
nothing.

    python benchmarks/latency_model.py --n 100 --input 128
    python benchmarks/latency_model.py --smoke      # a 12-network micro space at 16x16, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table
from ehrsr.config import EHRSRConfig
from ehrsr.model import build_model
from ehrsr.profiling.canary import Canary, measure_with_canary
from ehrsr.profiling.latency_model import (
    LatencyModel,
    LatencyTarget,
    accuracy_of,
    calibrate,
    measure_network,
    sample_configs,
)
from ehrsr.profiling.onnx_graph import profile_onnx
from ehrsr.profiling.onnx_runtime import export_for_timing, time_onnx
from ehrsr.reparam import reparameterize
from ehrsr.search.space import load_space, space_from_text

PROFILES = {  # name: (runtime, threads, unit timing)
    "torch-1t": ("torch", 1, "isolated"),
    "torch-2t": ("torch", 2, "isolated"),
    "onnxruntime-1t": ("onnxruntime", 1, "isolated"),
    "onnxruntime-1t-graph": ("onnxruntime", 1, "graph"),
}
SMOKE_SPACE = """
model:
  width: {choices: [8, 16]}
  block_type: {choices: [naf, gated]}
  msg.levels: 0
  trunk_blocks: {low: 1, high: 3}
training: {patch_size: 16, batch_size: 2, lr: 1.0e-3, min_steps: 2, eta: 2, max_steps: 4,
           seconds_per_trial_estimate: 1}
"""


def _key(config: object) -> str:
    return json.dumps(config.to_dict() if hasattr(config, "to_dict") else config, sort_keys=True)


def _measurers(configs: list[EHRSRConfig], target: LatencyTarget, budget_s: float, clock: str,
               folder: Path) -> tuple[list[Callable[[], float]], list[Callable[[], float]]]:
    """One measurement of each configuration's whole deploy form on ``target``, as
    ``measure_network`` takes it; for onnxruntime each network is exported once (here) and its
    file timed at every measurement, instead of exporting it again each time. Second list
    (onnxruntime only): the network's node time, the sum of its nodes' median kernel times under
    onnxruntime's profiler (``ehrsr.profiling.onnx_graph.profile_onnx``)."""
    if target.runtime != "onnxruntime":
        return [lambda c=c: measure_network(c, target, budget_s=budget_s, clock=clock) for c in configs], []
    folder.mkdir(parents=True, exist_ok=True)
    wall, node = [], []
    for i, config in enumerate(configs):
        shape = (1, config.in_channels, *target.input_hw)
        path = export_for_timing(reparameterize(build_model(config)), [shape], folder / f"network{i}.onnx")
        wall.append(lambda p=path, s=shape: time_onnx(p, [s], target.threads, budget_s=budget_s).latency_ms)
        node.append(lambda p=path, s=shape: sum(profile_onnx(p, [s], target.threads, budget_s=budget_s)[1]
                                                .node_ms.values()))
    return wall, node


def _calibrated(name: str, space: Any, target: LatencyTarget, path: Path, reuse: bool,
                calibrate_options: dict[str, object]) -> tuple[LatencyModel, float]:
    """Profile ``name``'s latency model and its calibration seconds: calibrated here, or with
    ``reuse`` read from ``path`` when a finished one is there."""
    if reuse and path.exists():
        model = LatencyModel.load(path, space=space, device=target)
        if model.extra["protocol"]["unit_timing"] == PROFILES[name][2]:
            print(f"{name}: reusing {path}", file=sys.stderr)
            return model, float(model.extra["calibration_s"])
    start = time.perf_counter()
    model = calibrate(space, target, path, resume=False, unit_timing=PROFILES[name][2],
                      log=lambda m: print(m, file=sys.stderr), **calibrate_options)  # type: ignore[arg-type]
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="unseen configurations per target")
    parser.add_argument("--input", type=int, default=128, help="LR input side (square)")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--profiles", default=None,
                        help=f"subset of {', '.join(PROFILES)} (default: all; with --smoke: all but torch-2t)")
    parser.add_argument("--network-budget", type=float, default=0.5, help="seconds of timed passes per network")
    parser.add_argument("--unit-budget", type=float, default=0.15, help="seconds of timed passes per isolated unit")
    parser.add_argument("--n-fit", type=int, default=24, help="networks that fit each model's correction")
    parser.add_argument("--n-holdout", type=int, default=12, help="networks each calibration holds out")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (1-thread torch profiles only), immune to other jobs preempting this one")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the latency model files here")
    parser.add_argument("--reuse", action="store_true",
                        help="read finished latency models from --out-dir instead of calibrating them again")
    parser.add_argument("--node-time", action="store_true",
                        help="onnxruntime: also profile each unseen network twice and compare the unit sums with its "
                             "node time (sum of per-node median kernel times: little moved by other jobs)")
    parser.add_argument("--smoke", action="store_true",
                        help="the real code path at the smallest size: a 12-network micro space, 16x16, 3 networks")
    args = parser.parse_args(argv)
    patience = 3000
    if args.smoke:
        args.n, args.input, args.network_budget, args.unit_budget = 3, 16, 0.01, 0.01
        args.n_fit, args.n_holdout, patience, args.node_time = 3, 2, 50, True
        args.profiles = args.profiles or "torch-1t,onnxruntime-1t,onnxruntime-1t-graph"
        space = space_from_text(SMOKE_SPACE, name="smoke")
    else:
        space = load_space(args.space)

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="ehrsr-latmodel-"))
    load_start = os.getloadavg()
    rows: list[list[object]] = []
    node_rows: list[list[object]] = []
    headers = ["profile", "unit timing", "clock", "input", "units", "calibration s", "n unseen", "Spearman",
               "median |err| %", "p90 |err| %", "repeat median / p90 %", "repeat Spearman", "predict ms/config",
               "median measured ms", "canary ratio med / max", "busy after retries", "stored hold-out err % / rho"]
    names = (args.profiles or ",".join(PROFILES)).split(",")
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        parser.error(f"unknown profile {', '.join(unknown)}; choose from {', '.join(PROFILES)}")
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        runtime, threads, _ = PROFILES[name]
        if args.clock == "cpu" and (threads != 1 or runtime != "torch"):
            print(f"{name}: skipped, the cpu clock is a latency only for torch with one thread", file=sys.stderr)
            continue
        groups.setdefault((runtime, threads), []).append(name)

    for (runtime, threads), members in groups.items():
        target = LatencyTarget(members[0], "cpu", runtime, threads, "float32", (args.input, args.input))
        options = dict(progress=not args.smoke, clock=args.clock, n_fit=args.n_fit, n_holdout=args.n_holdout,
                       unit_budget_s=args.unit_budget, network_budget_s=args.network_budget,
                       enumeration_patience=patience)
        models = {name: _calibrated(name, space, target, out_dir / f"{name}.json", args.reuse, options)
                  for name in members}
        seen = {_key(p["config"]) for model, _ in models.values()
                for p in model.extra["fit_networks"] + model.extra["holdout_networks"]}
        configs = [c for c in sample_configs(space, args.n + 20, seed=999) if _key(c) not in seen][: args.n]
        predicted: dict[str, list[float]] = {name: [] for name in members}
        sums: dict[str, list[float]] = {name: [] for name in members}
        predict_ms: dict[str, list[float]] = {name: [] for name in members}
        for name, (model, _) in models.items():
            for config in configs:
                t0 = time.perf_counter()
                prediction = model.predict(config)
                predict_ms[name].append(1000 * (time.perf_counter() - t0))
                predicted[name].append(prediction.latency_ms)
                sums[name].append(prediction.units_sum_ms)

        measure, node_time = _measurers(configs, target, args.network_budget, args.clock,
                                        out_dir / f"{runtime}-{threads}t")
        node_time = node_time if args.node_time else []
        canary = Canary(threads=threads)
        canary.calibrate()
        passes: list[list[float]] = [[0.0] * len(configs), [0.0] * len(configs)]
        node_passes: list[list[float]] = [[0.0] * len(configs), [0.0] * len(configs)]
        ratios, busy = [], 0
        for round_, order in enumerate((range(len(configs)), reversed(range(len(configs))))):
            for done, i in enumerate(order, start=1):
                value, reading, _ = measure_with_canary(measure[i], canary, retries=2)
                passes[round_][i] = value
                if node_time:
                    node_passes[round_][i] = node_time[i]()
                ratios.append(reading.ratio)
                busy += int(reading.contended)
                if done % 20 == 0:
                    print(f"{runtime}-{threads}t: pass {round_ + 1}, {done}/{len(configs)} measured", file=sys.stderr)
        measured = [(a + b) / 2 for a, b in zip(*passes, strict=True)]
        repeat = [100.0 * abs(a - b) / ((a + b) / 2) for a, b in zip(*passes, strict=True)]
        repeat_rho = accuracy_of(passes[0], passes[1]).spearman
        repeat_p90 = statistics.quantiles(repeat, n=10)[-1] if len(repeat) > 1 else repeat[0]
        print(f"{runtime}-{threads}t: " + json.dumps({"predicted": predicted, "units_sum": sums, "measured": passes,
                                                       "node_time": node_passes if node_time else None,
                                                       "canary": ratios}), file=sys.stderr)
        for name, (model, calibration_s) in models.items():
            acc = accuracy_of(predicted[name], measured)
            stored = model.accuracy
            rows.append([
                name, PROFILES[name][2], args.clock, f"{args.input}x{args.input}", len(model.units),
                f"{calibration_s:.0f}", acc.n, f"{acc.spearman:.3f}", f"{acc.median_abs_pct_error:.1f}",
                f"{acc.p90_abs_pct_error:.1f}", f"{statistics.median(repeat):.1f} / {repeat_p90:.1f}",
                f"{repeat_rho:.3f}", f"{statistics.median(predict_ms[name]):.2f}", f"{statistics.median(measured):.1f}",
                f"{statistics.median(ratios):.2f} / {max(ratios):.2f}", f"{busy} of {len(ratios)}",
                f"{stored.median_abs_pct_error:.1f} / {stored.spearman:.2f}" if stored else "-",
            ])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)  # survives a later failure
            if node_time:
                node_mean = [(a + b) / 2 for a, b in zip(*node_passes, strict=True)]
                node_acc = accuracy_of(sums[name], node_mean)
                node_rows.append([
                    name, PROFILES[name][2], acc.n, f"{node_acc.spearman:.3f}", f"{node_acc.median_abs_pct_error:.1f}",
                    f"{node_acc.p90_abs_pct_error:.1f}", f"{accuracy_of(node_passes[0], node_passes[1]).spearman:.3f}",
                    f"{statistics.median(node_mean):.1f}",
                ])
                print(" | ".join(map(str, node_rows[-1])), file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    print_table(
        headers,
        rows,
        title=(f"Latency model accuracy, space '{space.name}', this CPU (shared with other jobs: see canary "
               f"ratio; load average 1/5/15 min at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
               f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f})"),
    )
    if node_rows:
        print_table(
            ["profile", "unit timing", "n unseen", "Spearman (unit sum)", "median |err| % (unit sum)",
             "p90 |err| % (unit sum)", "repeat Spearman", "median node time ms"],
            node_rows,
            title="The same networks' node time (onnxruntime profiler: sum of per-node median kernel times, "
                  "measured right after each wall-clock measurement) against each model's uncorrected unit sum",
        )


if __name__ == "__main__":
    main()
