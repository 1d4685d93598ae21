"""One-shot check of every CUDA path of ehrsr (issue 15), in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py [--device cuda:0] [--skip-search]

Sections (each catches its own failure and shows FAIL with the reason, so one broken path does
not hide the others): CUDA-event latency in float32, float16 and bfloat16 autocast with
channels_last and the peak memory (``ehrsr.profiling``); AMP training steps/s of a conv-only,
an all-modules and an SSMB-heavy model (``ehrsr.training.train``); the uint8-on-GPU patch
sampling against one training step; ``mamba_ssm``'s fused scan against the project's scan
(values and gradients) when importable, else that the fallback is used; a 3-trial search on the
``full`` space (fidelity shortened to minutes) with child-process isolation, and one with
``--workers auto``, both through ``run_search.py``. Prints one table; nothing is asserted.
Without CUDA it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table
from ehrsr import build_model

SMALL = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 2}
CONFIGS = {
    "conv-only": SMALL,
    "all modules": {**SMALL, **{m: {"enabled": True} for m in ("wab", "ssm", "fsb", "moe", "repmix")}},
    "SSMB-heavy": {**SMALL, "trunk_blocks": 4, "ssm": {"enabled": True, "directions": 4, "d_state": 16}},
}
BATCH, PATCH, TRAIN_STEPS = 8, 48, 20
SEARCH_TIMEOUT_S = 180  # two searches + the rest stay under 8 minutes

Row = list[str]


def train_steps(model: torch.nn.Module, train_set: object, steps: int, device: torch.device) -> object:
    """The one call into ``ehrsr.training.train`` (its signature is about to take a settings object)."""
    from ehrsr.training import train

    return train(model, train_set, steps=steps, batch_size=BATCH, patch_size=PATCH, device=device, amp=True, lr=1e-4)


def check_latency(device: torch.device) -> list[Row]:
    from ehrsr.profiling import profile_model

    model = build_model(CONFIGS["all modules"]).to(device).eval()
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        prof = profile_model(model, (1, 3, 128, 128), device=device, dtype=dtype, channels_last=True,
                             latency_budget_s=0.5)
        rows.append([f"latency {dtype}, channels_last (all modules, 128 px)",
                     f"{prof.latency_ms:.2f} ms (p10 {prof.latency_ms_p10:.2f}, p90 {prof.latency_ms_p90:.2f}, "
                     f"{prof.repeats} runs); peak {prof.peak_memory_mb:.1f} MiB", "ok"])
    return rows


def check_training(device: torch.device, train_set: object) -> list[Row]:
    rows = []
    torch.cuda.reset_peak_memory_stats(device)
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = build_model(config)
        train_steps(model, train_set, 2, device)  # warm-up: cuDNN autotuning, allocator
        result = train_steps(model, train_set, TRAIN_STEPS, device)
        rate = result.steps_done / result.train_seconds
        rows.append([f"AMP training {name} (batch {BATCH}, LR patch {PATCH})",
                     f"{rate:.1f} steps/s, {rate * BATCH:.0f} patches/s", "ok"])
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    rows.append(["peak memory of the training runs", f"{peak_mib:.0f} MiB (torch.cuda.max_memory_allocated)", "ok"])
    return rows


def cuda_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median of ``repeats`` timings of ``fn`` with CUDA events (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_data(device: torch.device, train_set: object) -> list[Row]:
    generator = torch.Generator(device=device).manual_seed(0)
    sample_ms = cuda_ms(lambda: train_set.sample(BATCH, PATCH, generator), device)
    model = build_model(CONFIGS["conv-only"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr, hr = train_set.sample(BATCH, PATCH, generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(lr) - hr).abs().mean()
        loss.backward()
        optimizer.step()

    step_ms = cuda_ms(step, device)
    on_gpu = lr.is_cuda and train_set.hr.buffer.is_cuda
    return [["uint8-on-GPU patch sampling vs a conv-only step",
             f"sample {sample_ms:.2f} ms, step {step_ms:.2f} ms ({sample_ms / step_ms:.0%})",
             "ok" if on_gpu else "FAIL: patches or images not on the GPU"]]


def check_scan(device: torch.device) -> list[Row]:
    from ehrsr.blocks import ssm

    torch.manual_seed(0)
    b, groups, d, n, length = 2, 4, 64, 16, 1024
    inputs = [
        torch.randn(b, d, length), torch.nn.functional.softplus(torch.randn(b, d, length)) * 0.1,
        -torch.rand(d, n) - 0.5, torch.randn(b, groups, n, length), torch.randn(b, groups, n, length), torch.randn(d),
    ]
    kernel = ssm._mamba_kernel()
    ours = [t.to(device).requires_grad_() for t in inputs]
    y_ours = torch.ops.ehrsr.selective_scan(*ours)
    weight = torch.randn_like(y_ours)
    (y_ours * weight).sum().backward()
    ms_ours = cuda_ms(lambda: torch.ops.ehrsr.selective_scan(*ours).mul(weight).sum().backward(), device, 5)
    if kernel is None:
        auto = ssm.selective_scan(*[t.detach() for t in ours], impl="auto")
        same = torch.allclose(auto, y_ours.detach(), rtol=1e-6, atol=1e-6)
        return [["scan: mamba_ssm not importable", f"fallback custom op fwd+bwd {ms_ours:.2f} ms at L={length}",
                 "ok (fallback used)" if same else "FAIL: auto did not use the fallback"]]
    theirs = [t.to(device).requires_grad_() for t in inputs]
    y_theirs = ssm.selective_scan(*theirs, impl="auto")
    (y_theirs * weight).sum().backward()
    ms_theirs = cuda_ms(lambda: ssm.selective_scan(*theirs, impl="auto").mul(weight).sum().backward(), device, 5)
    errors = {"y": _rel(y_theirs, y_ours)} | {
        f"d{name}": _rel(t.grad, o.grad) for name, t, o in zip(("u", "delta", "A", "B", "C", "D"), theirs, ours)
    }
    worst = max(errors, key=errors.get)
    status = "ok" if errors[worst] < 1e-3 else f"FAIL: {worst} differs by {errors[worst]:.1e} (relative)"
    return [["scan: mamba_ssm kernel vs ehrsr op (fp32)",
             f"max rel. diff {errors[worst]:.1e} ({worst}); fwd+bwd {ms_theirs:.2f} vs {ms_ours:.2f} ms", status]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def short_space(folder: Path) -> Path:
    """The ``full`` space with its fidelity cut to a few dozen steps, so 3 trials fit in minutes."""
    from ehrsr.resources import space_file

    text = space_file("full").read_text()
    for key, value in (("min_steps", "20"), ("max_steps", "60"), ("seconds_per_trial_estimate", "30"),
                       ("patch_size", "32"), ("batch_size", "8")):
        text, count = re.subn(rf"^(\s*{key}:)\s*[^#\n]+", rf"\g<1> {value}  ", text, count=1, flags=re.M)
        if count != 1:
            raise ValueError(f"ehrsr/search_spaces/full.yaml has no '{key}:' line to shorten")
    path = folder / "full_short.yaml"
    path.write_text(text)
    return path


def check_search(device: torch.device, extra: list[str], label: str) -> list[Row]:
    with tempfile.TemporaryDirectory() as folder:
        space = short_space(Path(folder))
        command = [sys.executable, str(ROOT / "run_search.py"), "--budget", "trials=3", "--space", str(space),
                   "--device", str(device), "--out-dir", folder, "--ablation-share", "0", "--no-report",
                   "--profile-size", "64", *extra]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return [[label, f"no result in {SEARCH_TIMEOUT_S} s", "FAIL: timeout"]]
        seconds = time.perf_counter() - start
        lines = (done.stdout + done.stderr).strip().splitlines() or ["(no output)"]
        if done.returncode != 0:
            return [[label, lines[-1][:100], f"FAIL: exit status {done.returncode}"]]
        return [[label, f"{seconds:.0f} s; {lines[-1][:90]}", "ok"]]


def run_section(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one section; an exception becomes a FAIL row naming it instead of ending the script."""
    print(f"  {name} ...", file=sys.stderr)
    try:
        return fn()
    except Exception as exc:  # every failure is a result here
        return [[name, "", f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-search", action="store_true", help="leave out the two run_search.py sections")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    from ehrsr.data import TaskConfig, prepare_data

    with tempfile.TemporaryDirectory() as cache:
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
    train_set.to(device)
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("latency and memory", lambda: check_latency(device)),
        ("AMP training", lambda: check_training(device, train_set)),
        ("data pipeline", lambda: check_data(device, train_set)),
        ("selective scan", lambda: check_scan(device)),
    ]
    if not args.skip_search:
        sections += [
            ("search --isolate", lambda: check_search(device, ["--isolate"], "3-trial search, full space, --isolate")),
            ("search --workers auto", lambda: check_search(device, ["--workers", "auto"],
                                                            "3-trial search, full space, --workers auto")),
        ]
    start = time.perf_counter()
    rows = [row for name, fn in sections for row in run_section(name, fn)]
    print_table(["check", "result", "status"], rows,
                title=f"GPU check on {torch.cuda.get_device_name(device)} ({time.perf_counter() - start:.0f} s)")
    return 0 if all(row[2].startswith("ok") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
