"""EHR-SR against hand-designed efficient-SR baselines, at equal latency, in one search run.

Default: run the README's main job (``run_search.py --budget minutes=M`` on the built-in images,
tiny space, CPU; search, controlled ablation, baselines and proxy-fidelity retrains), or read a
study such a run left (``--study-name``/``--out-dir`` of an existing study with ``--reuse``), and
print one table: each baseline's params, MACs, latency and PSNR (95 % bootstrap interval over the
validation units) next to the best searched EHR-SR configuration at no more latency, the paired
PSNR difference with its 95 % interval, and whether EHR-SR wins (interval above 0), ties (interval
contains 0) or loses (interval below 0); then the proxy-fidelity rank agreement (Kendall's tau,
Spearman) of the same run. Conventions are the study's (docs/data_and_metrics.md,
docs/profiling.md): PSNR on Y with the crop border = scale; MACs of the deploy form (fvcore: one
multiply-add = 1); latency as the study measured it (median of timed runs after warm-up, the
study's profile input and threads).

    python benchmarks/baselines.py [--minutes 10] [--out-dir DIR] [--study-name NAME] [--reuse]
        [--search-args "--space FILE --baselines SPAN,RLFN"]

``--standalone``: each baseline trained alone with one fixed protocol and compared with bicubic
(no search):

    python benchmarks/baselines.py --standalone [--size tiny] [--steps 108] [--names SPAN,RLFN]

``--smoke``: a two-trial search on the test fixture space ``micro`` with the SPAN baseline, then the
standalone table for SPAN after 2 steps.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_load, median_ms, parse_args, print_table
from ehrsr.baselines import available_baselines, baseline_label, build_baseline, deploy_baseline
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.metrics import bicubic_baseline, evaluate
from ehrsr.profiling import count_macs
from ehrsr.stats import paired_interval, verdict
from ehrsr.training import TrainSettings, train

DASH = "-"
SMOKE_SEARCH = (f"--space {ROOT / 'tests' / 'fixtures' / 'micro.yaml'} --baselines SPAN --baselines-share 0.5 "
                "--fidelity-share 0 --ablation-share 0 --quiet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="budget of the search run (README: 10)")
    parser.add_argument("--budget", help="the search's --budget instead of --minutes (e.g. trials=20)")
    parser.add_argument("--search-args", default="", help="more run_search.py options for the search run")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--study-name", default="bench-baselines")
    parser.add_argument("--reuse", action="store_true", help="read the existing study instead of running one")
    parser.add_argument("--standalone", action="store_true", help="the no-search table (see the docstring)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--names", help="comma list (default: every available baseline)")
    parser.add_argument("--steps", type=int, default=108, help="tiny space: 108 (top rung)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32, help="LR patch side")
    parser.add_argument("--lr", type=float, default=6e-4, help="tiny space samples 2e-4..2e-3 (log); 6e-4 is its middle")
    parser.add_argument("--loss", choices=("l1", "charbonnier"), default="l1")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv, smoke={"budget": "trials=2", "search_args": SMOKE_SEARCH, "names": "SPAN",
                                           "steps": 2})
    if args.standalone:
        standalone(args)
        return
    from_search(args)
    if args.smoke:
        standalone(args)


def _mean_interval(values: list[float] | None) -> str:
    if not values or len(values) < 2:
        return DASH
    interval = paired_interval(np.asarray(values, dtype=float))
    return f"[{interval.low:.2f}, {interval.high:.2f}]"


def from_search(args: argparse.Namespace) -> None:
    from ehrsr.cli import main as cli_main
    from ehrsr.reports.baselines import baseline_runs, compare_with_baselines, per_image_psnr
    from ehrsr.reports.fidelity import fidelity_report
    from ehrsr.search.study import load_study

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="ehrsr-bench-baselines-"))
    before = machine_load()
    if not args.reuse:
        argv = ["--budget", args.budget or f"minutes={args.minutes:g}", "--out-dir", str(out_dir),
                "--study-name", args.study_name, *shlex.split(args.search_args)]
        print(f"[baselines] running: run_search.py {' '.join(argv)} ({before})", flush=True)
        start = time.perf_counter()
        code = cli_main(argv)
        if code != 0:
            raise SystemExit(f"the search run ended with exit status {code}")
        print(f"[baselines] search run took {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    study, _, _ = load_study(args.study_name, None, out_dir)
    runs = {r.label: r for r in baseline_runs(study)}
    if not runs:
        raise SystemExit(f"study {args.study_name!r} has no baseline runs (--baselines none, --no-report, "
                         f"or a baselines share too small for one run)")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trivial = study.user_attrs.get("baseline") or {}
    rows = [[trivial.get("name", "bicubic"), DASH, DASH, DASH, f"{trivial.get('psnr', float('nan')):.2f}", DASH,
             DASH, DASH, DASH, DASH]]
    outcomes = []
    for comparison in compare_with_baselines(study):
        if comparison.cost_key != "latency_ms":
            continue
        run = runs[comparison.baseline]
        m = run.metrics
        label = f"{run.label} ({run.size_class})"
        own = [label, f"{m['params_deploy'] / 1e3:.1f}", f"{m['macs'] / 1e9:.3f}", f"{m['latency_ms']:.1f}",
               f"{m['psnr']:.2f} {_mean_interval(run.per_image)}"]
        if comparison.best_trial is None:
            rows.append([*own, "none at no more latency", DASH, DASH, DASH, "EHR-SR has nothing this fast"])
            outcomes.append("none")
            continue
        best = trials[comparison.best_trial].user_attrs["metrics"]
        searched = (f"#{comparison.best_trial}: {best['params_deploy'] / 1e3:.1f} K, {best['macs'] / 1e9:.3f} G, "
                    f"{best['latency_ms']:.1f} ms")
        interval = comparison.interval
        if interval is None:
            diff, result = f"{comparison.psnr_difference:+.2f} (no CI: {comparison.no_interval_reason})", "no CI"
        else:
            diff = f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
            result = "EHR-SR wins" if interval.low > 0 else ("EHR-SR loses" if interval.high < 0 else "tie")
            if interval.low > 0 and interval.mean >= 0.1:
                result += " (goal met: >= 0.1 dB, CI above 0)"
        outcomes.append(result.split(" (")[0])
        rows.append([*own, searched, f"{best['psnr']:.2f} {_mean_interval(per_image_psnr(trials[comparison.best_trial]))}",
                     diff, result, ""])
    n_units = len(next((r.per_image for r in runs.values() if r.per_image), []) or [])
    print_table(
        ["baseline", "params (K)", "MACs (G)", "latency (ms)", "PSNR-Y (dB) [95 % CI]",
         "best searched EHR-SR at no more latency", "its PSNR-Y [95 % CI]", "difference (dB) [95 % CI]",
         "result", "note"],
        [r[:9] + ([r[9]] if r[9] else [""]) for r in rows],
        title=(f"study {args.study_name} in {out_dir}: {len(trials)} trials; PSNR on Y, crop border = scale, over "
               f"{n_units} validation units; paired bootstrap 95 % intervals over units (one seed each side); "
               f"latency and MACs as the study measured them (docs/data_and_metrics.md, docs/profiling.md). Machine: {before} before, "
               f"{machine_load()} after."),
    )
    counts = {k: outcomes.count(k) for k in ("EHR-SR wins", "tie", "EHR-SR loses", "none", "no CI")}
    print("\nsummary: " + ", ".join(f"{k}: {v}" for k, v in counts.items() if v))
    report = fidelity_report(study)
    if report is None:
        print("proxy fidelity: not run in this study")
    else:
        a = report.agreement
        if a is not None:
            print(f"proxy fidelity ({len(report.points)} configurations retrained "
                  f"{report.factor:g}x longer): Kendall tau {a.kendall:.2f} [{a.kendall_low:.2f}, {a.kendall_high:.2f}], "
                  f"Spearman {a.spearman:.2f} [{a.spearman_low:.2f}, {a.spearman_high:.2f}]")
        print(f"proxy fidelity verdict: {report.message}")


def standalone(args: argparse.Namespace) -> None:
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
            settings = TrainSettings(steps=args.steps, lr=args.lr, batch_size=args.batch, patch_size=args.patch,
                                     loss=args.loss)
            train(model, train_set, settings, seed=args.seed)
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
