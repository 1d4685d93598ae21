"""Full training vs the search's brief training: PSNR curve, gains, EMA cost.

    python benchmarks/full_training.py [--pick FILE.json] [--factor 30] [--val-every N] [--out DIR] [--smoke]

A configuration (by default the tiny space's middle: width 16, one MSG level, one trunk block,
RepMix k7; or the configuration of a pick JSON) is trained on the built-in x4 images
1. briefly, as a tiny-space trial is (108 steps, batch 8, 32 px patches, ``ehrsr.training.train``),
2. ``--factor`` times longer with ``ehrsr.fulltrain.full_train`` (same batch and patch, the
   recipe's cosine schedule and EMA 0.999 with its warm-up; ``--no-ema-warmup`` for plain 0.999),
and validated on the built-in validation images (PSNR/SSIM on Y, crop = scale). Printed: the PSNR
curve of the long run, the gain over the 108-step weights and over bicubic, and training steps/s
with and without the EMA update (timed interleaved, medians). ``--smoke``: a 2-step brief run and a
4-step long one, validated once. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_load, paired_median_ms, parse_args, print_table
from ehrsr import EHRSRConfig, build_model
from ehrsr.data import TaskConfig
from ehrsr.fulltrain import FullTrainSettings, ModelEMA, Recipe, full_train, prepare_sets
from ehrsr.metrics import bicubic_baseline, evaluate
from ehrsr.training import TrainSettings, train

# the middle of search_spaces/tiny.yaml: width {8,12,16,24}, msg.levels 0..2, trunk_blocks 1..2, RepMix k {5,7,9}
TINY_MIDDLE = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1,
               "repmix": {"enabled": True, "kernel_size": 7}}
TRIAL_STEPS, BATCH, PATCH = 108, 8, 32  # tiny.yaml: max_steps, batch_size, patch_size
TRIAL_LR = 6.3e-4  # geometric middle of tiny.yaml's lr range [2e-4, 2e-3]


def ema_cost(config: EHRSRConfig, train_set, repeats: int, batch: int = BATCH, patch: int = PATCH) -> tuple[float, float]:
    """Median ms of one training step without and with the EMA update, timed alternately."""
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = ModelEMA(model, 0.999)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        lr, hr = train_set.sample(batch, patch, generator)
        loss = (model(lr) - hr).abs().mean() + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def step_with_ema() -> None:
        step()
        ema.update(model)

    return paired_median_ms(step, step_with_ema, warmup=2, repeats=repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pick", type=Path, help="train this pick's configuration instead of the tiny middle")
    parser.add_argument("--factor", type=int, default=30, help="long run = factor x the trial's steps (default 30)")
    parser.add_argument("--val-every", type=int, help="validation interval (default: a tenth of the long run)")
    parser.add_argument("--ema-repeats", type=int, default=15, help="timed steps per variant for the EMA cost")
    parser.add_argument("--no-ema-warmup", action="store_true", help="EMA at 0.999 from the first step (BasicSR)")
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    parser.add_argument("--trial-steps", type=int, default=TRIAL_STEPS,
                        help=f"steps of the brief run without --pick (default {TRIAL_STEPS}, the tiny space's top rung)")
    args = parse_args(parser, argv, smoke={"trial_steps": 2, "factor": 2, "val_every": 4, "ema_repeats": 2})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pick = json.loads(args.pick.read_text()) if args.pick else None
    config = EHRSRConfig.from_dict(pick["config"] if pick else TINY_MIDDLE)
    # the brief run is the trial's own protocol (the pick records it), else the tiny space's middle
    if pick and pick.get("train"):
        trial = TrainSettings.from_dict(pick["train"], ignore=("seed",))
    else:
        trial = TrainSettings(steps=args.trial_steps, lr=TRIAL_LR, batch_size=BATCH, patch_size=PATCH)
    task = TaskConfig(scale=config.scale)
    train_set, sets = prepare_sets(task, None, ())
    val_set = sets[0][1]
    crop = config.scale

    print(f"machine: {torch.get_num_threads()} threads, {machine_load()}")
    start = time.perf_counter()
    torch.manual_seed(0)
    brief = build_model(config)
    train(brief, train_set, trial, seed=0)
    print(f"brief run: {trial}")
    brief_result = evaluate(brief, val_set, crop_border=crop)
    brief_seconds = time.perf_counter() - start

    steps = args.factor * trial.steps
    val_every = args.val_every or max(1, steps // 10)
    recipe = Recipe(steps=steps, batch_size=trial.batch_size, patch_size=trial.patch_size, lr=trial.lr,
                    loss=trial.loss, val_every=val_every,
                    checkpoint_every=val_every, ema_warmup=not args.no_ema_warmup)
    out = args.out or Path(tempfile.mkdtemp(prefix="full_training_"))
    start = time.perf_counter()
    result = full_train(FullTrainSettings(config=config, recipe=recipe, out_dir=out, progress=True, finish=False,
                                          source="benchmarks/full_training.py"))
    full_seconds = time.perf_counter() - start
    rows = [line.split(",") for line in (out / "validation.csv").read_text().splitlines()[1:]]
    bicubic = bicubic_baseline(val_set, crop_border=crop)

    print_table(["step", "PSNR (dB)", "SSIM", "lr", "train loss"],
                [(int(r[0]), float(r[2]), f"{float(r[3]):.4f}", f"{float(r[4]):.2e}", f"{float(r[5]):.4f}") for r in rows],
                title=f"PSNR curve of the long run ({steps} steps, EMA weights, built-in val, Y, crop {crop})")
    final_psnr, final_ssim = float(rows[-1][2]), float(rows[-1][3])
    print_table(
        ["weights", "steps", "PSNR (dB)", "SSIM", "gain over bicubic (dB)", "wall s"],
        [("bicubic", 0, bicubic.psnr, f"{bicubic.ssim:.4f}", 0.0, "-"),
         ("brief (the trial's protocol)", trial.steps, brief_result.psnr, f"{brief_result.ssim:.4f}",
          brief_result.psnr - bicubic.psnr, brief_seconds),
         (f"full x{args.factor} (EMA)", steps, final_psnr, f"{final_ssim:.4f}", final_psnr - bicubic.psnr, full_seconds)],
        title=f"gain of full training over the trial's weights: {final_psnr - brief_result.psnr:+.2f} dB",
    )
    plain_ms, ema_ms = ema_cost(config, train_set, args.ema_repeats, trial.batch_size, trial.patch_size)
    print_table(["variant", "ms/step (median)", "steps/s"],
                [("without EMA", plain_ms, 1e3 / plain_ms), ("with EMA 0.999", ema_ms, 1e3 / ema_ms)],
                title=f"EMA cost (batch {trial.batch_size}, patch {trial.patch_size}, interleaved): "
                      f"x{ema_ms / plain_ms:.3f}")
    print(f"\nlong run: {result.steps_per_second:.2f} steps/s overall (validation included); folder {out}")


if __name__ == "__main__":
    main()
