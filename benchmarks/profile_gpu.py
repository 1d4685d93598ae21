"""Profile a handful of EHR-SR configurations and SPAN on a GPU, float32 and float16, in one short run.

Latency: CUDA events around each pass, cudnn.benchmark, automatic warm-up / timed passes (see
``ehrsr.profiling.latency``); memory: ``max_memory_allocated`` during one pass; float16 via autocast.
MACs are counted at the same input (1x3x256x256 by default, the NTIRE ESR convention).

    python benchmarks/profile_gpu.py [--size 256] [--channels-last]
    python benchmarks/profile_gpu.py --smoke     # conv-only and SPAN at 16x16, float32, short timing; CPU without a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args
from ehrsr import EHRSRConfig, build_model
from ehrsr.profiling import device_name, profile_model

MODULES_ON = {
    "wab": {"enabled": True, "heads": 4},
    "ssm": {"enabled": True},
    "fsb": {"enabled": True},
    "moe": {"enabled": True},
    "repmix": {"enabled": True},
    "noise": {"enabled": True},
}

CONFIGS: dict[str, dict] = {
    "EHR-SR conv-only w32": {"width": 32},
    "EHR-SR all-on w32 t2": {"width": 32, **MODULES_ON},
    "EHR-SR all-on w48 t4 d2": {"width": 48, "trunk_blocks": 4, "msg": {"levels": 2, "depths": [2, 2]}, **MODULES_ON},
}


def _span() -> torch.nn.Module | None:
    try:
        from spandrel.architectures.SPAN.__arch.span import SPAN
    except ImportError:
        print("[gpu] spandrel not installed: SPAN skipped (pip install -e '.[baselines]')")
        return None
    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=28, upscale=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu")
    parser.add_argument("--size", type=int, default=256, help="square LR input side")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help=f"a subset of: {', '.join(CONFIGS)}, SPAN")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="seconds of timed passes per measurement (default: the profiler's, 1 s)")
    args = parse_args(parser, argv, smoke={"size": 16, "dtypes": ["float32"], "latency_budget": 0.02,
                                           "models": ["EHR-SR conv-only w32", "SPAN"],
                                           "device": "cuda" if torch.cuda.is_available() else "cpu"})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this benchmark needs a GPU (use --device cpu for a smoke test)")
    shape = (1, 3, args.size, args.size)

    wanted = set(args.models or [*CONFIGS, "SPAN"])
    unknown = wanted - {*CONFIGS, "SPAN"}
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}, SPAN")
    models: dict[str, torch.nn.Module] = {}
    for name, data in CONFIGS.items():
        if name in wanted:
            torch.manual_seed(0)
            models[name] = build_model(EHRSRConfig.from_dict(data))
    span = _span() if "SPAN" in wanted else None
    if span is not None:
        models["SPAN (spandrel, 28 ch)"] = span

    rows = [
        "| model | dtype | MACs (G) | params deploy (M) | latency median (ms) | p10-p90 (ms) | passes | peak mem (MiB) "
        "| total mem (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in models.items():
        for dtype in args.dtypes:
            start = time.perf_counter()
            p = profile_model(model, shape, device=args.device, dtype=dtype, channels_last=args.channels_last,
                              latency_budget_s=args.latency_budget)
            rows.append(
                f"| {name} | {p.dtype} | {p.macs / 1e9:.3f} | {p.params_deploy / 1e6:.3f} | {p.latency_ms:.3f} "
                f"| {p.latency_ms_p10:.3f}-{p.latency_ms_p90:.3f} | {p.warmup} + {p.repeats} "
                f"| {p.peak_memory_mb:.1f} | {p.peak_memory_total_mb:.1f} |"
            )
            print(f"[gpu] {name} {dtype}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\nDevice: {device_name(args.device)}; input {shape}; channels_last={args.channels_last}; "
          f"torch {torch.__version__}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
