"""Per-block CPU timings (issue 2): forward and forward+backward at 64x64 and 128x128, width 32;
the chunked parallel scan vs the sequential loop; RepMix unfused vs fused.

    python benchmarks/blocks.py [--threads N] [--repeats N]

Prints tables (medians in ms); targets: parallel scan >= 5x the loop at L = 4096, fused RepMix
>= 1.3x faster than unfused. Nothing is asserted: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median_ms, paired_median_ms, print_table
from ehrsr import reparameterize
from ehrsr.blocks import (
    FrequencySeparationBlock,
    GatedCNNBlock,
    MoEBlock,
    NAFBlock,
    RepMixBlock,
    SSMBlock,
    WindowAttentionBlock,
    selective_scan_parallel,
    selective_scan_sequential,
)

WIDTH = 32


def block_table(sizes: list[int], repeats: int) -> None:
    blocks = {
        "NAFBlock": lambda: NAFBlock(WIDTH),
        "GatedCNNBlock": lambda: GatedCNNBlock(WIDTH),
        "WAB (w=8, 4 heads, shift)": lambda: WindowAttentionBlock(WIDTH, 8, 4, shift=True),
        "SSMB (N=8, 2 dirs)": lambda: SSMBlock(WIDTH, d_state=8, directions=2),
        "SSMB (N=8, 4 dirs)": lambda: SSMBlock(WIDTH, d_state=8, directions=4),
        "FSB": lambda: FrequencySeparationBlock(WIDTH),
        "MoE-TX (4 experts, top-2)": lambda: MoEBlock(WIDTH, 4, 2),
        "RepMix (k=13, train form)": lambda: RepMixBlock(WIDTH, 13, 0.25),
    }
    rows = []
    for name, make in blocks.items():
        row = [name]
        for size in sizes:
            torch.manual_seed(0)
            block = make()
            x = torch.randn(1, WIDTH, size, size)
            block.eval()
            with torch.inference_mode():
                fwd = median_ms(lambda b=block, x=x: b(x), repeats=repeats)
            block.train()
            xg = x.clone().requires_grad_()

            def step(b=block, x=xg):
                b.zero_grad(set_to_none=True)
                b(x).sum().backward()

            both = median_ms(step, repeats=repeats)
            row += [fwd, both]
        rows.append(row)
        print(f"  timed {name}", file=sys.stderr)
    headers = ["block (width 32)"]
    for size in sizes:
        headers += [f"fwd {size}x{size} ms", f"fwd+bwd {size}x{size} ms"]
    print_table(headers, rows, title=f"Blocks on CPU ({torch.get_num_threads()} threads), median of {repeats}")


def scan_table(lengths: list[int], repeats: int) -> None:
    rows = []
    d, n = 64, 8
    for length in lengths:
        torch.manual_seed(0)
        u = torch.randn(1, d, length)
        delta = torch.nn.functional.softplus(torch.randn(1, d, length)) * 0.1
        a = -torch.rand(d, n) - 0.5
        bm, cm, dv = torch.randn(1, n, length), torch.randn(1, n, length), torch.randn(d)
        with torch.inference_mode():
            seq, par = paired_median_ms(
                lambda: selective_scan_sequential(u, delta, a, bm, cm, dv),
                lambda: selective_scan_parallel(u, delta, a, bm, cm, dv),
                warmup=1,
                repeats=5,
            )
        rows.append([length, d, n, seq, par, f"{seq / par:.1f}x"])
    print_table(
        ["L", "d_inner", "d_state", "sequential ms", "parallel ms", "speed-up"],
        rows,
        title="Selective scan: chunked parallel vs sequential loop (target >= 5x at L = 4096)",
    )


def repmix_table(sizes: list[int], repeats: int) -> None:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        block = RepMixBlock(WIDTH, 13, 0.25).eval()
        fused = reparameterize(block)
        x = torch.randn(1, WIDTH, size, size)
        with torch.inference_mode():
            t_unfused, t_fused = paired_median_ms(lambda: block(x), lambda: fused(x), repeats=3 * repeats)
            err = (block(x) - fused(x)).abs().max().item()
        p_unfused = sum(p.numel() for p in block.parameters())
        p_fused = sum(p.numel() for p in fused.parameters())
        rows.append([f"{size}x{size}", p_unfused, p_fused, t_unfused, t_fused, f"{t_unfused / t_fused:.2f}x", f"{err:.1e}"])
    print_table(
        ["input", "params unfused", "params fused", "unfused ms", "fused ms", "speed-up", "max |diff|"],
        rows,
        title="RepMix (width 32, k=13, partial 0.25): unfused vs fused (target >= 1.3x)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    block_table(args.sizes, args.repeats)
    scan_table([1024, 4096], args.repeats)
    repmix_table(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
