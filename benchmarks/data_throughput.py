"""Data pipeline speed: patch sampling vs one training step of the smallest tiny model.

    python benchmarks/data_throughput.py [--threads N] [--repeats N] [--device cpu|cuda] [--shapes 8x32 16x48]

For several (batch, LR patch) sizes (``--shapes``, BATCHxPATCH) on the built-in x4 data, prints the median time of
``TrainSet.sample`` (patches/s) and of one full training step (forward, backward, AdamW) of the
smallest tiny EHR-SR (width 16, one MSG level, one trunk block, conv-only), and their ratio.
The target is sampling >= 10x faster than the step. Also times loading the prepared set from
the disk cache. Nothing is asserted: shared machines make timings noisy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median_ms, parse_args, print_table
from ehrsr import build_model
from ehrsr.data import TaskConfig, prepare_data

SMALLEST_TINY = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1}


def _shape(text: str) -> tuple[int, int]:
    batch, sep, patch = text.partition("x")
    if not sep or not batch.isdigit() or not patch.isdigit():
        raise argparse.ArgumentTypeError(f"expected BATCHxPATCH such as 16x48, got {text!r}")
    return int(batch), int(patch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(8, 32), (16, 48), (32, 48), (16, 64)],
                        help="batch x LR patch sizes to time")
    args = parse_args(parser, argv, smoke={"repeats": 1, "shapes": [(4, 16)]})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
        load_s = time.perf_counter() - start
    print(
        f"built-in x4 training set: {len(train_set)} images, {train_set.nbytes / 1e6:.1f} MB uint8; "
        f"prepared in {prepare_s:.2f} s, loaded from the cache in {load_s * 1e3:.0f} ms"
    )
    train_set.to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    torch.manual_seed(0)
    model = build_model(SMALLEST_TINY).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for batch, patch in args.shapes:

        def sample(b=batch, p=patch) -> None:
            train_set.sample(b, p, generator, device)
            sync()

        lr_patch, hr_patch = train_set.sample(batch, patch, generator, device)

        def step(x=lr_patch, y=hr_patch) -> None:
            optimizer.zero_grad(set_to_none=True)
            (model(x) - y).abs().mean().backward()
            optimizer.step()
            sync()

        sample_ms = median_ms(sample, warmup=3, repeats=args.repeats * 3)
        step_ms = median_ms(step, warmup=2, repeats=args.repeats)
        rows.append([batch, patch, sample_ms, batch / sample_ms * 1e3, step_ms, step_ms / sample_ms])
        print(f"  timed batch {batch}, patch {patch}", file=sys.stderr)
    print_table(
        ["batch", "LR patch", "sample ms", "patches/s", "train step ms", "step / sample"],
        rows,
        title=(
            f"Patch sampling vs one training step of the smallest tiny EHR-SR (x4, {device}, "
            f"{torch.get_num_threads()} threads), medians"
        ),
    )


if __name__ == "__main__":
    main()
