"""Minimum detectable effect of the built-in validation: 2 whole images vs fixed tiles of them.

Trains one tiny-space EHR-SR configuration twice (seeds 0 and 1, same steps) and takes the
per-unit PSNR differences between the two runs: a comparison whose true effect is zero, so their
spread is the noise a real comparison must beat. ``ehrsr.stats.minimum_detectable_effect``
(paired t, alpha 0.05, power 0.8) is reported for the two whole images and for the tiled
default (``ehrsr.data.val_tiles``), together with the paired 95 % interval of the difference.

    PYTHONPATH=. python benchmarks/validation_power.py [--steps 108]
"""

from __future__ import annotations

import argparse

import numpy as np
import optuna
import torch

from ehrsr.data import TaskConfig, prepare_data
from ehrsr.data.val_tiles import tile_val_set
from ehrsr.metrics import evaluate
from ehrsr.model import build_model
from ehrsr.search.space import load_space
from ehrsr.stats import minimum_detectable_effect, paired_interval
from ehrsr.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=108)
    parser.add_argument("--lr", type=float, default=6e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_set, tiled = prepare_data(TaskConfig(scale=4), progress=False)
    # the whole images: the tiled default's source, rebuilt without tiling
    from ehrsr.data.datasets import BUILTIN_VAL, ValSet, _builtin_files, read_image

    whole = ValSet.from_images([read_image(p) for p in _builtin_files(BUILTIN_VAL)], TaskConfig(scale=4),
                               names=[n.rsplit(".", 1)[0] for n in BUILTIN_VAL])
    assert len(tile_val_set(whole)) == len(tiled)
    space = load_space("tiny")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    config = space.suggest(trial, scale=4).config
    per_seed = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(config)
        train(model, train_set, steps=args.steps, lr=args.lr, batch_size=8, patch_size=32, seed=seed)
        per_seed[seed] = (evaluate(model, whole, crop_border=4), evaluate(model, tiled, crop_border=4))
        print(f"seed {seed}: whole {per_seed[seed][0].psnr:.3f} dB, tiles {per_seed[seed][1].psnr:.3f} dB", flush=True)
    print(f"\nconfiguration {config and space.suggest(trial, scale=4).summary()}, {args.steps} steps, lr {args.lr}")
    print("| validation | units | PSNR-Y delta seed1-seed0 (dB), 95 % CI (t) | MDE (dB, alpha 0.05, power 0.8) |")
    print("|---|---|---|---|")
    for label, index in (("2 whole images", 0), ("18 fixed 128 px HR tiles (new default)", 1)):
        deltas = np.array(per_seed[1][index].psnr_per_image) - np.array(per_seed[0][index].psnr_per_image)
        interval = paired_interval(deltas, method="t")
        print(f"| {label} | {deltas.size} | {interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}] | "
              f"{minimum_detectable_effect(deltas):.4f} |")


if __name__ == "__main__":
    main()
