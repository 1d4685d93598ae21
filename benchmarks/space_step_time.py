"""Time one training step of random configurations from a search space (sizing its fidelity).

For the two reference anchors and N random configurations (Optuna's RandomSampler, fixed seed):
build the network and time forward + backward + Adam steps on a batch of the space's LR patch
size; print the median step time and what training to the top rung (max_steps) would cost.

    python benchmarks/space_step_time.py [--space tiny] [--configs 20] [--threads 2] [--device cuda] [--smoke]

``--smoke``: the anchors and one random configuration of the test fixture space ``micro``, one
timed step each. Prints tables; asserts nothing (timings on shared machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import median_ms, parse_args, print_table
from ehrsr import build_model
from ehrsr.search.space import load_space


def train_step_ms(
    model: torch.nn.Module, batch: int, patch: int, scale: int, repeats: int, device: torch.device
) -> float:
    """Median ms of one optimisation step (L1 + MoE auxiliary loss, Adam) after one warm-up."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    lr_batch = torch.rand(batch, 3, patch, patch, device=device)
    hr_batch = torch.rand(batch, 3, patch * scale, patch * scale, device=device)

    def step() -> None:
        loss = (model(lr_batch) - hr_batch).abs().mean() + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # wall time of the step, not of its launch

    return median_ms(step, warmup=1, repeats=repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--configs", type=int, default=20, help="random configurations besides the anchors")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parse_args(parser, argv, smoke={"configs": 1, "repeats": 1, "threads": 1,
                                           "space": str(ROOT / "tests" / "fixtures" / "micro.yaml")})
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    fid = space.fidelity
    print(
        f"space {space.name}: batch {fid.batch_size} x {fid.patch_size}x{fid.patch_size} LR patches, "
        f"x{args.scale}, rungs {list(fid.rung_steps)}, {device}, {args.threads} threads"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(args.seed))
    references = space.reference_params()
    for name, params in references.items():
        study.enqueue_trial(params, user_attrs={"reference": name})

    rows = []
    for i in range(args.configs + len(references)):
        trial = study.ask()
        sampled = space.suggest(trial, scale=args.scale)
        if sampled.config is None:
            print(f"#{i}: refused: {sampled.refused}")
            continue
        model = build_model(sampled.config).to(device).train()
        params_k = sum(p.numel() for p in model.parameters()) / 1e3
        ms = train_step_ms(model, fid.batch_size, fid.patch_size, args.scale, args.repeats, device)
        rows.append([i, trial.user_attrs.get("reference", ""), sampled.summary(), params_k, ms, ms * fid.max_steps / 1e3])
        print(f"#{i}: {ms:.1f} ms/step  {sampled.summary()}", flush=True)

    print_table(
        ["#", "anchor", "configuration", "params (k)", "ms/step", f"s for {fid.max_steps} steps"],
        rows,
        title=f"training step time, space {space.name}",
    )
    times = sorted(row[4] for row in rows)
    summary = [
        ["median", statistics.median(times), statistics.median(times) * fid.max_steps / 1e3],
        ["90 %", times[round(0.9 * (len(times) - 1))], times[round(0.9 * (len(times) - 1))] * fid.max_steps / 1e3],
        ["max", times[-1], times[-1] * fid.max_steps / 1e3],
    ]
    print_table(["statistic", "ms/step", f"s for {fid.max_steps} steps"], summary, title="over all configurations")


if __name__ == "__main__":
    main()
