"""Time one training step of random configurations from a search space (sizing the fidelity).

For each of N random configurations (Optuna's RandomSampler, fixed seed) plus the two reference
anchors: build the network, run a few forward + backward + Adam steps on a batch of the space's
LR patch size, and print the median step time and what the top rung (max_steps) would cost.
Prints a table; asserts nothing. Example:

    PYTHONPATH=. python benchmarks/space_step_time.py --space tiny --configs 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch

from ehrsr import build_model
from ehrsr.search.space import load_space


def step_ms(model: torch.nn.Module, batch: int, patch: int, scale: int, steps: int) -> float:
    """Median wall time of one optimisation step, after one warm-up step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    lr = torch.rand(batch, 3, patch, patch)
    hr = torch.rand(batch, 3, patch * scale, patch * scale)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = (model(lr) - hr).abs().mean() + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--configs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    fid = space.fidelity
    print(
        f"space {space.name}: batch {fid.batch_size} x {fid.patch_size}x{fid.patch_size} LR, x{args.scale}, "
        f"rungs {list(fid.rung_steps)}, {args.threads} threads"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(args.seed))
    for name, params in space.reference_params().items():
        study.enqueue_trial(params, user_attrs={"reference": name})
    n = args.configs + len(space.reference_params())
    rows = []
    for i in range(n):
        trial = study.ask()
        sampled = space.suggest(trial, scale=args.scale)
        if sampled.config is None:
            print(f"{i:3d} refused: {sampled.refused}")
            continue
        model = build_model(sampled.config).train()
        params_k = sum(p.numel() for p in model.parameters()) / 1e3
        ms = step_ms(model, fid.batch_size, fid.patch_size, args.scale, args.steps)
        label = trial.user_attrs.get("reference", "")
        rows.append((ms, params_k, sampled.summary(), label))
        print(f"{i:3d} {ms:8.1f} ms/step {ms * fid.max_steps / 1000:7.1f} s/top rung {params_k:9.1f} k params  "
              f"{sampled.summary()} {label}", flush=True)
    times = sorted(r[0] for r in rows)
    quantile = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))]  # noqa: E731
    print()
    print("| statistic | ms/step | s at max_steps |")
    print("|---|---|---|")
    for label, q in (("min", 0.0), ("median", 0.5), ("90 %", 0.9), ("max", 1.0)):
        print(f"| {label} | {quantile(q):.1f} | {quantile(q) * fid.max_steps / 1000:.1f} |")


if __name__ == "__main__":
    main()
