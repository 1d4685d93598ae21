"""Reference check: our counts for hand-designed efficient-SR models next to published NTIRE figures.

NTIRE Efficient SR convention: fvcore ``FlopCountAnalysis`` on a 1x3x256x256 LR input (x4), total
reported as "FLOPs" (fvcore counts a multiply-add as one, so it is MACs), and
``sum(p.numel() for p in model.parameters())`` on the model as evaluated.

Columns:
* ``params all``: every parameter of the module as built (training branches included);
* ``params deploy`` / ``MACs (ours)``: ``ehrsr.profiling.count_macs`` (data path only, fused);
* ``ptflops``: our cross-check counter;
* ``weights-only``: input-independent MACs left out of both (``MacCount.macs_constant``);
* ``plain fvcore``: the NTIRE recipe run as is on the same module, for comparison;
* ``published``: the number and its source; "n/a" where no NTIRE-convention figure was sourced.

Models: spandrel 0.4.2 builds SPAN, PLKSR, RealPLKSR, SAFMN and OmniSR without weights (the
``baselines`` extra); RLFN is implemented in ``ehrsr.baselines.rlfn`` (spandrel has no RLFN);
EFDN is listed with its published figure only (spandrel has no EFDN, and it is not implemented here).

    python benchmarks/profile_reference.py [--size 256] [--models SPAN RLFN] [--smoke]

``--smoke``: SPAN, RLFN and EFDN's published row at 16x16.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args
from ehrsr.baselines.rlfn import RLFN
from ehrsr.profiling import count_macs

NTIRE_2026 = "NTIRE 2026 ESR README (Amazingren/NTIRE2026_ESR), baseline SPAN"
NTIRE_2025 = "NTIRE 2025 ESR README (Amazingren/NTIRE2025_ESR), baseline EFDN"
NTIRE_2024 = "NTIRE 2024 ESR README (Amazingren/NTIRE2024_ESR), baseline RLFN"


def _spandrel(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            import spandrel.architectures as archs
        except ImportError:  # optional extra
            raise SystemExit("spandrel is not installed: pip install -e '.[baselines]'") from None
        if name == "SPAN":
            from spandrel.architectures.SPAN.__arch.span import SPAN

            return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=28, upscale=4)
        if name == "PLKSR":
            from spandrel.architectures.PLKSR.__arch.PLKSR import PLKSR

            return PLKSR(dim=64, n_blocks=12, kernel_size=13, split_ratio=0.25, use_ea=False)
        if name == "RealPLKSR":
            from spandrel.architectures.PLKSR.__arch.RealPLKSR import RealPLKSR

            return RealPLKSR()
        if name == "SAFMN":
            from spandrel.architectures.SAFMN.__arch.safmn import SAFMN

            return SAFMN(dim=36, n_blocks=8, ffn_scale=2.0, upscaling_factor=4)
        if name == "OmniSR":
            from spandrel.architectures.OmniSR.__arch.OmniSR import OmniSR

            return OmniSR()
        raise ValueError(f"unknown spandrel model {name!r}; archs at {archs.__file__}")

    return build


# name, configuration note, builder (None: not built), published (params M, FLOPs G) or None, source
MODELS: list[tuple[str, str, Callable[[], nn.Module] | None, tuple[float, float] | None, str]] = [
    ("SPAN", "spandrel, 28 ch, x4", _spandrel("SPAN"), (0.151, 9.83), NTIRE_2026),
    ("RLFN", "ours, 46/48/16 ch, x4", RLFN, (0.317, 19.70), NTIRE_2024),
    ("EFDN", "not built", None, (0.276, 16.70), NTIRE_2025),
    ("SAFMN", "spandrel, dim 36, 8 blocks", _spandrel("SAFMN"), None, "n/a: no NTIRE-convention figure sourced"),
    ("PLKSR", "spandrel, dim 64, 12 blocks, k13, no EA", _spandrel("PLKSR"), None, "n/a: no NTIRE-convention figure sourced"),
    ("RealPLKSR", "spandrel defaults (dim 64, 28 blocks)", _spandrel("RealPLKSR"), None, "n/a: no NTIRE-convention figure sourced"),
    ("OmniSR", "spandrel defaults (64 ch)", _spandrel("OmniSR"), None, "n/a: no NTIRE-convention figure sourced"),
]


def plain_fvcore(model: nn.Module, x: torch.Tensor) -> str:
    """The NTIRE script's count: FlopCountAnalysis(model, x).total(), nothing added (in G)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        try:
            return f"{analysis.total() / 1e9:.3f}"
        except Exception as exc:  # fvcore's own handlers assert on some shapes
            return f"fails ({type(exc).__name__} {exc})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="LR input side (NTIRE: 256)")
    names = [m[0] for m in MODELS]
    parser.add_argument("--models", nargs="+", choices=names, default=names, help="a subset of the models")
    args = parse_args(parser, argv, smoke={"size": 16, "models": ["SPAN", "RLFN", "EFDN"]})
    shape = (1, 3, args.size, args.size)
    torch.manual_seed(0)

    header = (
        "| model | built as | params all (M) | params deploy (M) | MACs ours (G) | ptflops (G) | weights-only (G) "
        "| plain fvcore (G) | published params (M) | published FLOPs (G) | source | unsupported ops |"
    )
    rows = [header, "|" + "|".join("---" for _ in range(12)) + "|"]
    for name, note, build, published, source in MODELS:
        if name not in args.models:
            continue
        pub_p, pub_f = (f"{published[0]:.3f}", f"{published[1]:.2f}") if published else ("n/a", "n/a")
        if build is None:
            rows.append(f"| {name} | {note} | - | - | - | - | - | - | {pub_p} | {pub_f} | {source} | - |")
            print(f"[reference] {name}: not built (published figure only)", flush=True)
            continue
        start = time.perf_counter()
        model = build().eval()
        result = count_macs(model, shape)
        plain = plain_fvcore(model, torch.rand(shape))
        unsupported = ", ".join(f"{k} x{v}" for k, v in result.unsupported_ops.items()) or "none"
        rows.append(
            f"| {name} | {note} | {result.params / 1e6:.3f} | {result.params_deploy / 1e6:.3f} | "
            f"{result.macs / 1e9:.3f} | {result.macs_ptflops / 1e9:.3f} | {result.macs_constant / 1e9:.3f} | {plain} "
            f"| {pub_p} | {pub_f} "
            f"| {source} | {unsupported} |"
        )
        print(f"[reference] {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\nInput {shape}, x4 models, MACs = fvcore 'FLOPs' (one multiply-add = 1).\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
