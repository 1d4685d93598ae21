"""Per-block CPU timings: forward and forward+backward at 64x64 and 128x128, width 32; the SSMB
with its cross-scan compiled for the CPU (ehrsr/blocks/scan_kernel.c) and with the PyTorch form,
against the NAF block; the chunked parallel scan vs the sequential loop; RepMix unfused vs fused.

    python benchmarks/blocks.py [--threads N] [--repeats N] [--sizes 64 128] [--only ssmb] [--smoke]
                                [--clock wall|cpu]

Prints tables (medians in ms); targets: SSMB forward+backward <= 2.5x the NAF block's at 64x64
(2 directions), parallel scan >= 5x the loop at L = 4096, fused RepMix >= 1.3x faster than
unfused. Nothing is asserted: timings on shared machines are noisy, so competing variants are
timed interleaved in one run and compared by their ratio, and the load average is printed; on a
busy machine, ``--threads 1 --clock cpu`` times the SSMB table in CPU time (one thread's compute).
``--smoke`` runs every table once at the smallest sizes (a few seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_clock, interleaved_median_ms, median_ms, paired_median_ms, print_table
from ehrsr import reparameterize
from ehrsr.blocks import (
    FrequencySeparationBlock,
    GatedCNNBlock,
    MoEBlock,
    NAFBlock,
    RepMixBlock,
    SSMBlock,
    WindowAttentionBlock,
    scan_kernel,
    selective_scan_parallel,
    selective_scan_sequential,
    ssm,
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


def _with_scan(mode: str, fn):
    """``fn`` run with ``ssm.SCAN_KERNEL = mode`` ("auto": the compiled CPU kernel; "torch")."""

    def run(*args):
        saved, ssm.SCAN_KERNEL = ssm.SCAN_KERNEL, mode
        try:
            return fn(*args)
        finally:
            ssm.SCAN_KERNEL = saved

    return run


def _load() -> str:
    return "load average " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def ssmb_table(sizes: list[int], repeats: int, clock=time.perf_counter) -> None:
    """The SSMB with the compiled cross-scan against the NAF block (interleaved), and with its
    PyTorch form (timed after them)."""
    if not scan_kernel.available():
        print(f"note: the compiled scan kernel is not used ({scan_kernel.reason()}); 'kernel' = PyTorch scan",
              file=sys.stderr)
    rows = []
    load_before = _load()
    for size in sizes:
        for directions in (2, 4):
            torch.manual_seed(0)
            block = SSMBlock(WIDTH, d_state=8, directions=directions)
            naf = NAFBlock(WIDTH)
            x = torch.randn(1, WIDTH, size, size)
            torch_path = _with_scan("torch", lambda x, b=block: b(x))
            kernel_path = _with_scan("auto", lambda x, b=block: b(x))
            xg = x.clone().requires_grad_()

            def train_step(module, forward, x=xg):
                module.zero_grad(set_to_none=True)
                forward(x).sum().backward()

            def kernel_step(b=block):
                _with_scan("auto", train_step)(b, b)

            def torch_step(b=block):
                _with_scan("torch", train_step)(b, b)

            # the kernel against NAF, interleaved; the PyTorch form after them (its large temporary
            # tensors make whatever runs next pay for page faults and cold caches)
            with torch.inference_mode():
                diff = (torch_path(x) - kernel_path(x)).abs().max().item()
                fwd_kernel, fwd_naf = interleaved_median_ms(
                    [lambda x=x: kernel_path(x), lambda x=x: naf(x)], repeats=repeats, clock=clock
                )
            both_kernel, both_naf = interleaved_median_ms(
                [kernel_step, lambda n=naf: train_step(n, n)], repeats=repeats, clock=clock
            )
            with torch.inference_mode():
                (fwd_torch,) = interleaved_median_ms([lambda x=x: torch_path(x)], repeats=repeats, clock=clock)
            (both_torch,) = interleaved_median_ms([torch_step], repeats=repeats, clock=clock)
            rows.append([
                f"{size}x{size}", directions, fwd_torch, fwd_kernel, fwd_naf, f"{fwd_kernel / fwd_naf:.2f}x",
                both_torch, both_kernel, both_naf, f"{both_torch / both_kernel:.2f}x", f"{both_kernel / both_naf:.2f}x",
                f"{diff:.1e}",
            ])
            print(f"  timed SSMB {directions} dirs at {size}x{size}", file=sys.stderr)
    print_table(
        ["input", "dirs", "fwd torch ms", "fwd kernel ms", "NAF fwd ms", "kernel/NAF fwd", "fwd+bwd torch ms",
         "fwd+bwd kernel ms", "NAF fwd+bwd ms", "torch/kernel", "kernel/NAF", "max |kernel - torch|"],
        rows,
        title=(
            f"SSMB (width 32, N=8, batch 1) with the compiled cross-scan (kernel) and its PyTorch form (torch), "
            f"against the NAF block, CPU ({torch.get_num_threads()} threads, "
            f"{'CPU time' if clock is time.process_time else 'wall clock'}), medians of {repeats} rounds, kernel and "
            f"NAF interleaved, torch after them; target: kernel/NAF fwd+bwd <= 2.5 at 64x64, 2 dirs ({load_before} "
            f"before, {_load()} after)"
        ),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--only", choices=["ssmb"], help="run only the SSMB table")
    parser.add_argument("--smoke", action="store_true", help="every table once at the smallest sizes (seconds)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="SSMB table: wall clock, or CPU time (with --threads 1, for a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = cpu_clock(args.clock, args.threads)
    sizes, repeats, lengths = (args.sizes, args.repeats, [1024, 4096]) if not args.smoke else ([16], 1, [64])
    ssmb_table(sizes, repeats, clock)
    if args.only:
        return
    block_table(sizes, repeats)
    scan_table(lengths, repeats)
    repmix_table(sizes, repeats)


if __name__ == "__main__":
    main()
