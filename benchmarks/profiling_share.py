"""Profiling share of default tiny CPU trials: latency measured here vs predicted by a latency model.

Runs two real searches of the README kind (tiny space, built-in images, ``--budget trials=N``,
no baselines, ablation or fidelity share, so only trials run), one after the other with the same
seed: one with the default objectives (``psnr,latency``: latency measured on this machine) and one
with ``psnr,latency@bench-1t``, a device profile whose latency model is calibrated first (or given
with ``--latency-model``; torch, 1 thread, 128x128 LR). Each trial stores its seconds of training,
evaluation and profiling (``seconds`` user attribute); the table gives the profiling share
``profile / total`` per search: its median and range, and the total over all trials.
The second half of each search is shown apart: the search counts MACs from unit counts cached
across trials (docs/profiling.md, "Counting in a search"), so counting gets cheaper as the search
goes on. The goal: <= 5 % when the latency objective is predicted. Asserts nothing.

    python benchmarks/profiling_share.py --trials 12 [--latency-model FILE]

``--smoke``: one trial per search on the test fixture space ``micro``, latency at 16x16, the
shortest calibration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna

from benchmarks._common import parse_args, print_table

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "bench-1t"


def _search(out_dir: Path, name: str, objectives: str, devices: Path, args: argparse.Namespace) -> None:
    command = [
        sys.executable, str(ROOT / "run_search.py"), "--budget", f"trials={args.trials}", "--space", args.space,
        *(["--profile-size", str(args.profile_size)] if args.profile_size else []),
        "--objectives", objectives, "--devices-file", str(devices), "--out-dir", str(out_dir), "--study-name", name,
        "--baselines", "none", "--ablation-share", "0", "--fidelity-share", "0", "--seed", str(args.seed),
        "--no-report",  # the table reads the trials' stored seconds only
    ]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _shares(out_dir: Path, name: str) -> list[tuple[float, float]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out_dir / name / 'study.db'}")
    rows = []
    for trial in study.trials:
        seconds = trial.user_attrs.get("seconds") or {}
        # complete and pruned trials alike (a pruned trial was counted and profiled too); recorded
        # repeats and refused proposals train nothing and are left out
        if seconds.get("total") and seconds.get("train") and "repeat_of" not in trial.user_attrs:
            rows.append((float(seconds.get("profile", 0.0)), float(seconds["total"])))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--input", type=int, default=128, help="LR side of the predicted latency (the profile's)")
    parser.add_argument("--profile-size", type=int, default=None,
                        help="LR side of the measured latency (default: the search's, 256)")
    parser.add_argument("--latency-model", type=Path, help="a torch 1-thread model of the space at --input "
                        "(default: calibrate one first, a few minutes)")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the studies here (default: a temporary folder)")
    args = parse_args(parser, argv, smoke={"trials": 1, "input": 16, "profile_size": 16,
                                           "space": str(ROOT / "tests" / "fixtures" / "micro.yaml")})
    shortest = dict(n_fit=3, n_holdout=3, unit_budget_s=0.002, network_budget_s=0.01) if args.smoke else {}
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="ehrsr-share-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    model_file = args.latency_model
    if model_file is None:
        from ehrsr.profiling.latency_model import LatencyTarget, calibrate
        from ehrsr.search.space import load_space

        model_file = out_dir / f"{PROFILE}.json"
        target = LatencyTarget(PROFILE, "cpu", "torch", 1, "float32", (args.input, args.input))
        calibrate(load_space(args.space), target, model_file, log=lambda m: print(m, file=sys.stderr), **shortest)
    devices = out_dir / "devices.yaml"
    devices.write_text(
        f"profiles:\n  {PROFILE}:\n    kind: cpu\n    threads: 1\n    dtype: float32\n"
        f"    input_size: [{args.input}, {args.input}]\n    latency_model: {model_file.resolve()}\n"
    )
    runs = [("measured", "psnr,latency"), ("predicted", f"psnr,latency@{PROFILE}")]
    for name, objectives in runs:
        _search(out_dir, name, objectives, devices, args)
    table = []
    for name, objectives in runs:
        rows = _shares(out_dir, name)
        shares = [100.0 * p / t for p, t in rows]
        later = shares[len(shares) // 2:]
        table.append([
            name, objectives, len(rows), f"{statistics.median(shares):.1f}", f"{min(shares):.1f} - {max(shares):.1f}",
            f"{statistics.median(later):.1f}",
            f"{statistics.median(p for p, _ in rows):.2f}", f"{statistics.median(t for _, t in rows):.2f}",
            f"{100.0 * sum(p for p, _ in rows) / sum(t for _, t in rows):.1f}",
        ])
    load = os.getloadavg()
    print_table(
        ["search", "objectives", "trials", "profiling share median %", "min - max %", "second half median %",
         "profile s median",
         "trial s median", "profile s / trial s, all trials %"],
        table,
        title=(f"Profiling share of CPU trials of {args.space} ({args.trials} trials each, seed {args.seed}); load average "
               f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores (goal when predicted: <= 5 %)"),
    )


if __name__ == "__main__":
    main()
