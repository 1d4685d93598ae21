"""Per-block CPU timings: forward and forward+backward at 64x64 and 128x128, width 32; the
chunked parallel scan vs the sequential loop; RepMix unfused vs fused; the SSMB against its
baseline form (one scan call per direction, autograd through the chunked scan) and as built
(directions batched into one scan call; the scan compiled for the CPU, ehrsr/blocks/scan_kernel.c).

    python benchmarks/blocks.py [--threads N] [--repeats N] [--only ssmb] [--smoke]

Prints tables (medians in ms); targets: parallel scan >= 5x the loop at L = 4096, fused RepMix
>= 1.3x faster than unfused, SSMB forward+backward >= 3x faster than the baseline form with no
slower forward. Nothing is asserted: timings on shared machines are noisy, so competing variants
are timed interleaved in one run and compared by their ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_median_ms, median_ms, paired_median_ms, parse_args, print_table
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
from ehrsr.blocks.ssm import scan_orders

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


class _RecomputeScan(torch.autograd.Function):
    """The baseline's autograd formula: the backward recomputes the chunked
    forward under autograd. Kept here, not in the package, so the benchmark can compare."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return selective_scan_parallel(*inputs)

    @staticmethod
    def backward(ctx, grad_y):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            y = selective_scan_parallel(*inputs)
        return torch.autograd.grad(y, inputs, grad_y, allow_unused=True)


def ssmb_baseline_forward(block: SSMBlock, x: torch.Tensor) -> torch.Tensor:
    """``SSMBlock.forward`` in its baseline form: one scan call per direction in a Python loop."""
    bsz, _, height, width = x.shape
    xs, z = block.in_proj(block.norm(x)).chunk(2, dim=1)
    xs = block.act(block.dwconv(xs))
    tokens = xs.flatten(2)
    y = None
    for k, order in enumerate(scan_orders(height, width, block.directions, x.device)):
        seq = tokens[:, :, order]
        proj = F.linear(seq.transpose(1, 2), block.x_proj[k].weight)
        dt, b_mat, c_mat = proj.split([block.dt_rank, block.d_state, block.d_state], dim=-1)
        delta = F.softplus(F.linear(dt, block.dt_proj[k].weight, block.dt_proj[k].bias)).transpose(1, 2)
        inputs = (
            seq.contiguous(), delta.contiguous(), -torch.exp(block.A_log[k]),
            b_mat.transpose(1, 2).contiguous(), c_mat.transpose(1, 2).contiguous(), block.D[k],
        )
        y_k = _RecomputeScan.apply(*inputs) if torch.is_grad_enabled() else selective_scan_parallel(*inputs)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        y = y_k[:, :, inverse] if y is None else y + y_k[:, :, inverse]
    y = block.out_norm(y.view(bsz, block.inner, height, width)) * block.act(z)
    return x + block.drop_path(block.out_proj(y))


def _with_scan(mode: str, fn):
    """``fn`` run with ``ssm.SCAN_KERNEL = mode`` ("auto": the compiled CPU kernel; "torch")."""

    def run(*args):
        saved, ssm.SCAN_KERNEL = ssm.SCAN_KERNEL, mode
        try:
            return fn(*args)
        finally:
            ssm.SCAN_KERNEL = saved

    return run


def ssmb_table(sizes: list[int], repeats: int) -> None:
    """Baseline vs current SSMB (PyTorch scan and compiled kernel), and the NAF block for scale,
    interleaved in one run."""
    if not scan_kernel.available():
        print(f"note: the compiled scan kernel is not used ({scan_kernel.reason()}); 'kernel' = PyTorch scan",
              file=sys.stderr)
    rows = []
    for size in sizes:
        for directions in (2, 4):
            torch.manual_seed(0)
            block = SSMBlock(WIDTH, d_state=8, directions=directions)
            naf = NAFBlock(WIDTH)
            x = torch.randn(1, WIDTH, size, size)
            torch.testing.assert_close(ssmb_baseline_forward(block, x), block(x), atol=1e-4, rtol=1e-4)
            torch_path = _with_scan("torch", lambda x, b=block: b(x))
            kernel_path = _with_scan("auto", lambda x, b=block: b(x))
            with torch.inference_mode():
                fwd_old, fwd_torch, fwd_kernel = interleaved_median_ms(
                    [lambda b=block, x=x: ssmb_baseline_forward(b, x), lambda x=x: torch_path(x),
                     lambda x=x: kernel_path(x)],
                    repeats=repeats,
                )
            xg = x.clone().requires_grad_()

            def train_step(module, forward, x=xg):
                module.zero_grad(set_to_none=True)
                forward(x).sum().backward()

            both_old, both_torch, both_kernel, both_naf = interleaved_median_ms(
                [
                    lambda b=block: train_step(b, lambda x, b=b: ssmb_baseline_forward(b, x)),
                    lambda b=block: _with_scan("torch", train_step)(b, b),
                    lambda b=block: _with_scan("auto", train_step)(b, b),
                    lambda n=naf: train_step(n, n),
                ],
                repeats=repeats,
            )
            rows.append([
                f"{size}x{size}", directions, fwd_old, fwd_torch, fwd_kernel, f"{fwd_old / fwd_kernel:.2f}x",
                both_old, both_torch, both_kernel, f"{both_old / both_kernel:.2f}x", both_naf,
                f"{both_old / both_naf:.1f}x", f"{both_kernel / both_naf:.1f}x",
            ])
            print(f"  timed SSMB {directions} dirs at {size}x{size}", file=sys.stderr)
    print_table(
        ["input", "dirs", "fwd old ms", "fwd torch ms", "fwd kernel ms", "fwd speed-up", "fwd+bwd old ms",
         "fwd+bwd torch ms", "fwd+bwd kernel ms", "fwd+bwd speed-up", "NAF fwd+bwd ms", "old/NAF", "kernel/NAF"],
        rows,
        title=(
            f"SSMB (width 32, N=8, batch 1) in its baseline form (old), as built with the PyTorch scan (torch) and with the "
            f"compiled CPU scan (kernel), CPU ({torch.get_num_threads()} threads), medians of {repeats} interleaved "
            "rounds; speed-up = old / kernel (target: fwd+bwd >= 3x at 64x64, fwd not slower)"
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
    parser.add_argument("--scan-lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--only", choices=["ssmb"], help="run only the SSMB before/after table")
    args = parse_args(parser, argv, smoke={"repeats": 1, "sizes": [16], "scan_lengths": [64]})
    torch.set_num_threads(args.threads)
    ssmb_table(args.sizes, args.repeats)
    if args.only:
        return
    block_table(args.sizes, args.repeats)
    scan_table(args.scan_lengths, args.repeats)
    repmix_table(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
