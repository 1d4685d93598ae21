"""Bicubic baselines with the suite's own evaluation code, next to the published values.

    python benchmarks/bicubic_baselines.py --data Set5=/data/Set5/HR --data Set14=/data/Set14/HR \
        [--data B100=... --data Urban100=...] [--scales 2 3 4]

For each HR folder and scale: LR by MATLAB-compatible bicubic (HR cropped to a multiple of the
scale), upsampled back by the same bicubic, PSNR / SSIM on the Y channel with crop_border = scale
(BasicSR's convention); printed beside the values SR papers publish for "Bicubic" (listed with
their sources in ``docs/data_and_metrics.md``, "Published bicubic baselines"). Without ``--data``
it runs on the built-in validation images, for which nothing is published: a demonstration that
the pipeline runs. ``--smoke``: the built-in images at x4 only. Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.metrics import bicubic_baseline

# Y-channel PSNR (dB) of bicubic upsampling, as published in SR papers (e.g. EDSR, RCAN, SwinIR
# tables; listed in docs/data_and_metrics.md, "Published bicubic baselines")
PUBLISHED_PSNR = {
    "Set5": {2: 33.66, 3: 30.39, 4: 28.42},
    "Set14": {2: 30.24, 3: 27.55, 4: 26.00},
    "B100": {2: 29.56, 3: 27.21, 4: 25.96},
    "Urban100": {2: 26.88, 3: 24.46, 4: 23.14},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=[], metavar="NAME=DIR",
                        help="an HR benchmark folder, e.g. Set5=/data/Set5/HR (repeatable)")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--cache-dir", default=None)
    args = parse_args(parser, argv, smoke={"scales": [4]})
    sets = []
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            parser.error(f"--data {item!r}: expected NAME=DIR")
        sets.append((name, folder))
    if not sets:
        sets = [("built-in val", None)]
    rows = []
    for name, folder in sets:
        for scale in args.scales:
            _, val_set = prepare_data(TaskConfig(scale=scale), None, folder, cache_dir=args.cache_dir, progress=False)
            result = bicubic_baseline(val_set)
            published = PUBLISHED_PSNR.get(name, {}).get(scale)
            diff = f"{result.psnr - published:+.3f}" if published is not None else "-"
            rows.append([name, f"x{scale}", len(val_set), f"{result.psnr:.3f}", f"{result.ssim:.4f}",
                         f"{published:.2f}" if published is not None else "n/a", diff])
    print_table(["set", "scale", "images", "PSNR (Y) dB", "SSIM (Y)", "published PSNR", "difference"], rows,
                title="Bicubic baselines: MATLAB bicubic down and up, Y channel, crop_border = scale")


if __name__ == "__main__":
    main()
