"""Resident memory of N search workers on one machine: memory-mapped training set vs a private copy.

Each worker process loads the prepared training set from the data cache (``prepare_data``) and
draws a few batches, as a search worker does; then its USS (memory only it holds) and PSS (its
fair share of shared pages) are read with psutil. With the cache memory-mapped
(``ehrsr.data.cache.load_npz``) the images live once in the page cache, whatever N; with a private
copy (the mapping threshold raised out of reach) every worker holds its own.

Default: a synthetic set of 100 images of 1020x1020 (a scaled-down DIV2K: 800 images of about
2040x1400 take ~6.9 GB prepared; pass --images 800 --size 2040 for that); ``--smoke``: 4 images of
200x200 (a worker draws 48 px LR patches) and one worker. Prints a table, asserts nothing. The
machine may be busy: memory, not time, is measured.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table


def _make_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png",
                                                                                   compress_level=0)


def _worker(train: str, val: str, cache: str, mapped: bool, ready, go, results) -> None:
    import psutil
    import torch

    from ehrsr.data import TaskConfig, prepare_data
    from ehrsr.data import cache as cache_module

    if not mapped:
        cache_module.MMAP_MIN_BYTES = 1 << 62  # read every array into private memory
    task = TaskConfig.from_dict({"task": "sr", "scale": 4})
    train_set, _ = prepare_data(task, train, val, cache_dir=cache, progress=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # touch patches all over the set, as training does
        train_set.sample(16, 48, generator)
    _ = int(train_set.hr.buffer[:: 4096].sum())  # and every page of the images
    ready.put(1)
    go.wait()
    info = psutil.Process().memory_full_info()
    results.put((info.uss, info.pss))


def measure(train: Path, val: Path, cache: Path, workers: int, mapped: bool) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(str(train), str(val), str(cache), mapped, ready, go, results))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=1200)
    go.set()  # all loaded at once: the shared pages are shared now
    values = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    uss = sum(v[0] for v in values) / 2**20
    pss = sum(v[1] for v in values) / 2**20
    return uss, pss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1020)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parse_args(parser, argv, smoke={"images": 4, "size": 200, "workers": [1]})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        _make_images(root / "train", args.images, args.size)
        _make_images(root / "val", 2, 64)
        from ehrsr.data import TaskConfig, prepare_data

        prepare_data(TaskConfig.from_dict({"task": "sr", "scale": 4}), root / "train", root / "val",
                     cache_dir=root / "cache", progress=False)
        prepared_mb = sum(p.stat().st_size for p in (root / "cache").rglob("train-*.npz")) / 2**20
        made_s = time.perf_counter() - start
        rows = []
        for n in args.workers:
            for mapped in (True, False):
                uss, pss = measure(root / "train", root / "val", root / "cache", n, mapped)
                name = "memory-mapped" if mapped else "private copy"
                rows.append([n, name, f"{uss:.0f}", f"{pss:.0f}", f"{pss / n:.0f}"])
                print(f"  {n} worker(s), {name}: {pss:.0f} MiB PSS", file=sys.stderr, flush=True)
    print_table(["workers", "variant", "sum USS MiB", "sum PSS MiB", "PSS per worker MiB"], rows,
                title=f"Resident memory of search workers (psutil USS / PSS): synthetic set of {args.images} images "
                      f"of {args.size}x{args.size}, prepared cache {prepared_mb:.0f} MiB ({made_s:.0f} s to make)")


if __name__ == "__main__":
    main()
