"""Minimum detectable effect of the built-in validation: 2 whole images vs fixed tiles of them.

Trains one tiny-space EHR-SR configuration twice (seeds 0 and 1, same steps) and takes the
per-unit PSNR differences between the two runs: a comparison whose true effect is zero, so their
spread is the noise a real comparison must beat. ``ehrsr.stats.minimum_detectable_effect``
(paired t, alpha 0.05, power 0.8) is reported for the two whole images and for the tiled
default (``ehrsr.data.val_tiles``), together with the paired 95 % interval of the difference.

    python benchmarks/validation_power.py [--steps 108] [--smoke]

``--smoke``: 2 training steps per seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table
from ehrsr.data import BUILTIN_VAL, TaskConfig, ValSet, prepare_data, read_image
from ehrsr.data.io import builtin_files
from ehrsr.data.val_tiles import BUILTIN_VAL_TILE_HR, tile_val_set
from ehrsr.metrics import evaluate
from ehrsr.model import build_model
from ehrsr.search.space import load_space
from ehrsr.stats import minimum_detectable_effect, paired_interval
from ehrsr.training import TrainSettings, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=108)
    parser.add_argument("--lr", type=float, default=6e-4)
    args = parse_args(parser, argv, smoke={"steps": 2})
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = TaskConfig(scale=4)
    train_set, tiled = prepare_data(task, progress=False)
    # the whole images: the tiled default's source, rebuilt without tiling
    whole = ValSet.from_images([read_image(p) for p in builtin_files(BUILTIN_VAL)], task,
                               names=[n.rsplit(".", 1)[0] for n in BUILTIN_VAL])
    if len(tile_val_set(whole)) != len(tiled):
        raise SystemExit(f"the whole images tile into {len(tile_val_set(whole))} units, the default set has "
                         f"{len(tiled)}: they are not the same images")
    space = load_space("tiny")
    sampled = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(), scale=4)
    settings = TrainSettings(steps=args.steps, lr=args.lr, batch_size=8, patch_size=32)
    per_seed = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(sampled.config)
        train(model, train_set, settings, seed=seed)
        per_seed[seed] = (evaluate(model, whole, crop_border=4), evaluate(model, tiled, crop_border=4))
        print(f"seed {seed}: whole {per_seed[seed][0].psnr:.3f} dB, tiles {per_seed[seed][1].psnr:.3f} dB",
              file=sys.stderr, flush=True)
    rows = []
    for label, index in ((f"{len(whole)} whole images", 0),
                         (f"{len(tiled)} fixed {BUILTIN_VAL_TILE_HR} px HR tiles (the default)", 1)):
        deltas = np.array(per_seed[1][index].psnr_per_image) - np.array(per_seed[0][index].psnr_per_image)
        interval = paired_interval(deltas, method="t")
        rows.append([label, deltas.size, f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]",
                     f"{minimum_detectable_effect(deltas):.4f}"])
    print_table(["validation", "units", "PSNR-Y delta seed1-seed0 (dB), 95 % CI (t)", "MDE (dB, alpha 0.05, power 0.8)"],
                rows, title=f"configuration {sampled.summary()}, {settings}")


if __name__ == "__main__":
    main()
