"""Repeated configurations: recorded repeats vs ``--allow-repeats``, same budget.

    python benchmarks/revisits.py [--seeds 0 1] [--trials 16] [--minutes 3] [--space PATH] [--smoke]

For every seed the script runs two real searches back to back (order alternating by seed, so
drift in the machine's speed hits both alike) on the built-in images, with the same budget
``trials=N,minutes=M`` (whichever is exhausted first):

* **allow-repeats**: ``--allow-repeats``, every proposal trains, repeats included;
* **recorded**: the default policy (docs/search_spaces.md, "Repeated configurations"): a proposal
  that repeats a finished configuration is recorded with ``repeat_of``, not trained, costs 0 s
  and takes no ``trials`` slot.

The default space is the test fixture ``micro`` with its learning rate fixed, so every
configuration is one of 32 discrete points and a sampler can actually repeat one (with a
continuous ``lr``, as in ``tiny``, an exact repeat needs a replayed random stream, which
``sampler_seed`` already prevents on resumes and extra workers). Prints, per run and as medians
over seeds: trials trained, distinct configurations trained, repeats trained (% of trained),
repeats recorded, charged device-minutes and wall seconds. ``--smoke``: one seed, two trials per
search. Asserts nothing; the machine is shared, so wall times are indicative only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table
from ehrsr.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "tests" / "fixtures" / "micro.yaml"


def discrete_micro(folder: Path) -> Path:
    """The micro fixture with ``lr`` fixed: 32 discrete configurations."""
    lines = []
    for line in MICRO.read_text().splitlines():
        if line.strip().startswith("lr:"):
            line = "  lr: 2.0e-3"
        lines.append(line)
    path = folder / "micro_discrete.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_one(space: Path, out: Path, cache: Path, seed: int, budget: str, allow: bool) -> dict[str, float]:
    name = f"{'allow' if allow else 'recorded'}-{seed}"
    args = ["--space", str(space), "--budget", budget, "--out-dir", str(out), "--cache-dir", str(cache),
            "--profile-size", "32", "--study-name", name, "--no-report", "--quiet", "--seed", str(seed),
            "--profile-seconds", "0.000001", "--ablation-share", "0"]
    if allow:
        args.append("--allow-repeats")
    start = time.perf_counter()
    code = cli_main(args)
    wall_s = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"search {name} exited {code}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trained = [t for t in finished if "repeat_of" not in t.user_attrs]
    keys = [repr((t.user_attrs["config"], t.user_attrs["train"])) for t in trained]
    distinct = len(set(keys))
    charged_s = sum(float(t.user_attrs.get("charged_seconds", 0.0)) for t in study.trials)
    return {
        "trained": len(trained),
        "distinct": distinct,
        "repeats_trained": len(keys) - distinct,
        "repeats_trained_pct": 100.0 * (len(keys) - distinct) / max(1, len(keys)),
        "repeats_recorded": len(finished) - len(trained),
        "charged_min": charged_s / 60,
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--space", type=Path, help="space YAML (default: micro with lr fixed)")
    args = parse_args(parser, argv, smoke={"seeds": [0], "trials": 2, "minutes": 1.0})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = f"trials={args.trials},minutes={args.minutes:g}"
    columns = ["trained", "distinct", "repeats_trained", "repeats_trained_pct", "repeats_recorded",
               "charged_min", "wall_s"]
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        space = args.space or discrete_micro(folder)
        for i, seed in enumerate(args.seeds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for allow in order:
                print(f"seed {seed}: {'--allow-repeats' if allow else 'recorded repeats'} ...", flush=True)
                result = run_one(space, folder / "reports", folder / "cache", seed, budget, allow)
                results[allow].append(result)
                rows.append([seed, "--allow-repeats" if allow else "recorded", *(result[c] for c in columns)])
    headers = ["seed", "variant", *columns]
    print_table(headers, rows, title=f"Per run (budget {budget}, space {space if args.space else 'micro, lr fixed'})")
    medians = [
        ["--allow-repeats" if allow else "recorded",
         *(statistics.median(r[c] for r in results[allow]) for c in columns)]
        for allow in (True, False)
    ]
    print_table(["variant", *columns], medians, title=f"Medians over seeds {args.seeds} (machine shared: wall times indicative)")


if __name__ == "__main__":
    main()
