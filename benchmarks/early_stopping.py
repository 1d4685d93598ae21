"""MO-ASHA early stopping: hypervolume vs compute, with and without it, on the tiny space.

    python benchmarks/early_stopping.py [--seeds 0 1 2] [--trials 20] [--share 0.5]

For every seed (the sampler's and the training's) the script runs two real searches on the
built-in images:

* **full**: ``--no-early-stopping``, ``trials=N``: every trial trains to the top rung;
* **MO-ASHA**: early stopping on, with a time budget of ``share`` (default 50 %) of the compute
  the full run used, so it answers the target directly: does MO-ASHA reach >= 95 % of the
  full run's hypervolume with <= 50 % of its compute?

Compute is the charged device-seconds of every trial (training, rung evaluations and
profiling: what the budget counts) and, separately, the training steps. Hypervolume is that of
the finished (full-fidelity) trials, over ``--objectives`` (default ``psnr,macs``: MACs are
exact, so two runs are compared on quality alone; latency would add timing noise to the
comparison), with one reference point per seed shared by both runs: 0.5 dB below the worst
PSNR and 10 % above the worst cost seen in either run. ``--smoke``: one seed, two trials on the
test fixture space ``micro`` (tests/fixtures/micro.yaml). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import parse_args, print_table
from ehrsr.search.budget import trial_charge
from ehrsr.search.driver import run_search
from ehrsr.search.objectives import parse_objectives
from ehrsr.search.pareto import hypervolume
from ehrsr.search.study import SearchSettings


def _study(settings: SearchSettings, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{settings.out_dir / name / 'study.db'}")


def _measure(study: optuna.Study) -> dict:
    trials = [t for t in study.trials if t.state != TrialState.WAITING]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        "trials": len(trials),
        "complete": len(complete),
        "seconds": sum(trial_charge(t).seconds for t in trials),
        "steps": sum(int(t.user_attrs.get("steps_done", 0)) for t in trials),
        "values": [t.values for t in complete],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20, help="trials of the full-fidelity run")
    parser.add_argument("--share", type=float, default=0.5, help="MO-ASHA budget as a share of the full run's")
    parser.add_argument("--objectives", default="psnr,macs")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--profile-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the studies here (default: a temp dir)")
    args = parse_args(parser, argv, smoke={"seeds": [0], "trials": 2, "profile_size": 16,
                                           "space": str(ROOT / "tests" / "fixtures" / "micro.yaml")})
    if args.threads:
        torch.set_num_threads(args.threads)
    objectives = parse_objectives(args.objectives)
    directions = [o.direction for o in objectives]
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="ehrsr-es-"))
    rows, ratios_hv, ratios_s = [], [], []
    for seed in args.seeds:
        common = dict(space=args.space, objectives=args.objectives, seed=seed, out_dir=out_dir,
                      profile_size=(args.profile_size, args.profile_size), threads=args.threads,
                      write_reports=False, verbosity=0, ablation_share=0.0)
        full = SearchSettings(**common, budget=f"trials={args.trials}", study_name=f"full-{seed}", early_stopping=False)
        run_search(full)
        m_full = _measure(_study(full, f"full-{seed}"))
        minutes = args.share * m_full["seconds"] / 60
        asha = SearchSettings(**common, budget=f"minutes={minutes:.4f}", study_name=f"asha-{seed}", early_stopping=True)
        run_search(asha)
        m_asha = _measure(_study(asha, f"asha-{seed}"))
        both = m_full["values"] + m_asha["values"]
        reference = []
        for i, o in enumerate(objectives):
            column = [v[i] for v in both]
            if o.direction == "maximize":
                reference.append(min(column) - 0.5)
            else:
                reference.append(max(column) * 1.1)
        hv_full = hypervolume(m_full["values"], directions, reference)
        hv_asha = hypervolume(m_asha["values"], directions, reference)
        r_hv = hv_asha / hv_full if hv_full else float("nan")
        r_s = m_asha["seconds"] / m_full["seconds"]
        ratios_hv.append(r_hv)
        ratios_s.append(r_s)
        rows.append([seed, f"{m_full['trials']} / {m_asha['trials']}", f"{m_full['complete']} / {m_asha['complete']}",
                     f"{m_full['steps']} / {m_asha['steps']}", m_full["seconds"], m_asha["seconds"],
                     f"{100 * r_s:.0f}%", f"{hv_full:.4g}", f"{hv_asha:.4g}", f"{100 * r_hv:.1f}%"])
        print(f"seed {seed}: compute {100 * r_s:.0f}%, hypervolume {100 * r_hv:.1f}%", file=sys.stderr)
    print_table(
        ["seed", "trials full / ASHA", "finished", "train steps", "full s", "ASHA s", "compute", "HV full",
         "HV ASHA", "HV ratio"],
        rows,
        title=f"MO-ASHA vs full fidelity on '{args.space}', objectives {args.objectives}, "
        f"ASHA budget = {args.share:.0%} of the full run's compute (target: HV >= 95 % at <= 50 % compute)",
    )
    print(f"\nmedian compute ratio {100 * statistics.median(ratios_s):.0f}%, "
          f"median hypervolume ratio {100 * statistics.median(ratios_hv):.1f}% over {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
