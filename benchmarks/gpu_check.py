"""One-shot check of every CUDA path of ehrsr, in under 8 minutes on one GPU, and its CPU rehearsal.

    python benchmarks/gpu_check.py [--device cuda:0] [--skip-search]
    python benchmarks/gpu_check.py --rehearse     # no GPU: every step on the CPU at reduced sizes
    python benchmarks/gpu_check.py --smoke        # the rehearsal's sizes, without the run_search.py sections

Sections (each catches its own failure and shows FAIL with the reason, so one broken path does
not hide the others):

1. full-space sampling: configurations drawn from the ``full`` space by the search's sampler
   (TPE, seed 0), each built and run forward once on the device;
2. latency and memory of the all-modules model with channels_last (``ehrsr.profiling``): CUDA
   events in float32, float16 and bfloat16 autocast; the CPU rehearsal times float32 and bfloat16;
3. AMP training (``ehrsr.training.train``, bf16 autocast and channels_last) of a conv-only, an
   all-modules and an SSMB-heavy model: steps/s and peak memory;
4. the data pipeline: the uint8 training set on the device, patches cut there, against one
   training step; the rehearsal keeps the set in (unpinned) CPU memory and checks the GPU's
   cropping code (``ImageBank.gather``) against the CPU's (``crop_loop``);
5. the selective scan: ``mamba_ssm``'s fused kernel against the project's op (values and
   gradients) when importable, else that ``impl="auto"`` falls back to the op;
6. a search on the ``full`` space (fidelity cut to a few dozen steps) through ``run_search.py``
   with a child process per trial (``--isolate``), and one with ``--workers auto``: 3 trials each
   on the GPU, 1 trial at reduced size in the rehearsal;
7. ``run_search.py deploy --onnx``: the first search's pick for a device profile of this device,
   re-profiled here, fused, exported to ONNX and checked with onnxruntime.

The rehearsal (``--rehearse``) runs every step of the real check on the CPU except the CUDA
kernels themselves, and prints the same table; CI runs it (tests/test_gpu_check.py). Nothing is
asserted: the table says ok or FAIL per row, and the exit status is 1 when a row failed. Without
CUDA and without ``--rehearse`` or ``--smoke`` it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import parse_args, print_table
from ehrsr import MODULE_TOGGLES, build_model
from ehrsr.profiling.latency import CudaEventClock, PerfCounterClock, cpu_name

SMALL = {"scale": 4, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 2}
CONFIGS = {
    "conv-only": SMALL,
    "all modules": {**SMALL, **{m: {"enabled": True} for m in ("wab", "ssm", "fsb", "moe", "repmix")}},
    "SSMB-heavy": {**SMALL, "trunk_blocks": 4, "ssm": {"enabled": True, "directions": 4, "d_state": 16}},
}
STUDY = "gpu-check"
PROFILE = "gpu-check"

Row = list[str]


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of the check: the real one on a GPU or the rehearsal on the CPU."""

    sampled_configs: int  # full-space configurations drawn, built and run
    sample_hw: int  # their input side
    latency_hw: int  # the latency section's input side
    dtypes: tuple[str, ...]  # latency dtypes; below float32 by autocast
    batch: int  # training and data sections
    patch: int  # LR patch side
    warmup_steps: int  # AMP training steps per model before the timed ones (cuDNN autotuning, allocator)
    train_steps: int  # timed AMP training steps per model
    scan_length: int  # tokens of the selective-scan comparison
    search_trials: int
    search_steps: tuple[int, int]  # min_steps, max_steps of the shortened full space
    search_patch: int
    search_batch: int
    profile_size: int  # the searches' --profile-size
    deploy_hw: int  # input side of the deploy section's device profile
    deploy_dtype: str
    timeout_s: int  # per run_search.py command: 3 x 130 s and about a minute in-process stay under 8 minutes


REAL = Plan(sampled_configs=20, sample_hw=64, latency_hw=128, dtypes=("float32", "float16", "bfloat16"), batch=8,
            patch=48, warmup_steps=2, train_steps=20, scan_length=1024, search_trials=3, search_steps=(20, 60), search_patch=32,
            search_batch=8, profile_size=64, deploy_hw=64, deploy_dtype="float16", timeout_s=130)
REHEARSAL = Plan(sampled_configs=6, sample_hw=16, latency_hw=32, dtypes=("float32", "bfloat16"), batch=2, patch=16,
                 warmup_steps=1, train_steps=1, scan_length=64, search_trials=1, search_steps=(2, 4), search_patch=16,
                 search_batch=2, profile_size=16, deploy_hw=32, deploy_dtype="bfloat16", timeout_s=600)


class Target:
    """The device the check runs on, with its clock (CUDA events, or the wall clock on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = CudaEventClock(device) if self.cuda else PerfCounterClock()

    def median_ms(self, fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.clock.time_ms(fn) for _ in range(repeats))

    def reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> str:
        if self.cuda:
            return f"{torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB (torch.cuda.max_memory_allocated)"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (peak RSS of this process)"

    @property
    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else cpu_name()


def check_sampling(target: Target, plan: Plan) -> list[Row]:
    import optuna

    from ehrsr.search.space import load_space
    from ehrsr.search.study import build_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("full")
    study = optuna.create_study(sampler=build_sampler("tpe", 0))
    built, refused, params, seen = 0, [], [], set()
    for _ in range(plan.sampled_configs):
        sampled = space.suggest(study.ask(), scale=4)
        if sampled.config is None:
            refused.append(sampled.refused)
            continue
        model = build_model(sampled.config).to(target.device).eval()
        with torch.inference_mode():
            out = model(torch.rand(1, 3, plan.sample_hw, plan.sample_hw, device=target.device))
        if out.shape != (1, 3, 4 * plan.sample_hw, 4 * plan.sample_hw):
            raise RuntimeError(f"{sampled.summary()}: output {tuple(out.shape)} at {plan.sample_hw} px")
        built += 1
        params.append(sum(p.numel() for p in model.parameters()) / 1e6)
        seen |= {(m, getattr(sampled.config, m).enabled) for m in MODULE_TOGGLES}
    both = sorted(m for m in MODULE_TOGGLES if (m, True) in seen and (m, False) in seen)
    result = (f"{built} built and run at {plan.sample_hw} px, {len(refused)} refused; "
              f"{min(params, default=0):.2f}-{max(params, default=0):.2f} M params; on and off: {', '.join(both)}")
    return [[f"full-space sampling ({plan.sampled_configs} by TPE, seed 0)", result,
             "ok" if built else "FAIL: nothing could be built"]]


def check_latency(target: Target, plan: Plan) -> list[Row]:
    from ehrsr.profiling import profile_model

    model = build_model(CONFIGS["all modules"]).to(target.device).eval()
    rows = []
    for dtype in plan.dtypes:
        prof = profile_model(model, (1, 3, plan.latency_hw, plan.latency_hw), device=target.device, dtype=dtype,
                             channels_last=True, latency_budget_s=0.5 if target.cuda else 0.05)
        rows.append([f"latency {dtype}, channels_last (all modules, {plan.latency_hw} px)",
                     f"{prof.latency_ms:.2f} ms (p10 {prof.latency_ms_p10:.2f}, p90 {prof.latency_ms_p90:.2f}, "
                     f"{prof.repeats} runs); peak {prof.peak_memory_mb:.1f} MiB", "ok"])
    return rows


def check_training(target: Target, plan: Plan, train_set: Any) -> list[Row]:
    from ehrsr.training import TrainSettings, train

    settings = TrainSettings(steps=plan.train_steps, lr=1e-4, batch_size=plan.batch, patch_size=plan.patch)
    warmup = TrainSettings(steps=plan.warmup_steps, lr=1e-4, batch_size=plan.batch, patch_size=plan.patch)
    rows = []
    target.reset_peak_memory()
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = build_model(config)
        train(model, train_set, warmup, device=target.device, amp=True, channels_last=True)
        result = train(model, train_set, settings, device=target.device, amp=True, channels_last=True)
        rate = result.steps_done / result.train_seconds
        rows.append([f"AMP training {name} (bf16 autocast, channels_last, batch {plan.batch}, LR patch {plan.patch})",
                     f"{rate:.1f} steps/s, {rate * plan.batch:.0f} patches/s, loss {result.final_loss:.4f}",
                     "ok" if result.steps_done == plan.train_steps else f"FAIL: {result.steps_done} steps done"])
    rows.append(["peak memory of the training runs", target.peak_memory(), "ok"])
    return rows


def check_data(target: Target, plan: Plan, train_set: Any) -> list[Row]:
    device = target.device
    generator = torch.Generator(device=device).manual_seed(0)
    sample_ms = target.median_ms(lambda: train_set.sample(plan.batch, plan.patch, generator))
    model = build_model(CONFIGS["conv-only"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr, hr = train_set.sample(plan.batch, plan.patch, generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = (model(lr) - hr).abs().mean()
        loss.backward()
        optimizer.step()

    step_ms = target.median_ms(step)
    where = f"sample {sample_ms:.2f} ms, step {step_ms:.2f} ms ({sample_ms / step_ms:.0%})"
    if target.cuda:
        on_gpu = lr.is_cuda and train_set.hr.buffer.is_cuda
        return [["uint8-on-GPU patch sampling vs a conv-only step", where,
                 "ok" if on_gpu else "FAIL: patches or images not on the GPU"]]
    # the CPU cuts patches one by one (crop_loop); the GPU gathers them in one kernel (gather):
    # the same crops, which the GPU path's code shows here on CPU tensors
    bank = train_set.hr
    index = torch.randint(0, len(bank.names), (plan.batch,), generator=generator)
    size = plan.patch * train_set.scale
    shapes = bank.shapes[index]
    top = (torch.rand(plan.batch, generator=generator) * (shapes[:, 0] - size + 1)).long()
    left = (torch.rand(plan.batch, generator=generator) * (shapes[:, 1] - size + 1)).long()
    transform = torch.arange(plan.batch) % 8
    gathered = bank.gather(index, top, left, size, transform)
    looped = bank.crop_loop(index, top, left, size, transform, torch.empty_like(gathered))
    same = torch.equal(gathered, looped)
    return [["patch sampling in CPU memory (not pinned) vs a conv-only step; GPU crop code", where,
             "ok" if same else "FAIL: ImageBank.gather and crop_loop cut different patches"]]


def check_scan(target: Target, plan: Plan) -> list[Row]:
    from ehrsr.blocks import ssm

    torch.manual_seed(0)
    b, groups, d, n, length = 2, 4, 64, 16, plan.scan_length
    inputs = [
        torch.randn(b, d, length), torch.nn.functional.softplus(torch.randn(b, d, length)) * 0.1,
        -torch.rand(d, n) - 0.5, torch.randn(b, groups, n, length), torch.randn(b, groups, n, length), torch.randn(d),
    ]
    kernel = ssm.mamba_kernel() if target.cuda else None  # mamba_ssm's kernel exists for CUDA only
    ours = [t.to(target.device).requires_grad_() for t in inputs]
    y_ours = torch.ops.ehrsr.selective_scan(*ours)
    weight = torch.randn_like(y_ours)
    (y_ours * weight).sum().backward()
    ms_ours = target.median_ms(lambda: torch.ops.ehrsr.selective_scan(*ours).mul(weight).sum().backward(), 5)
    if kernel is None:
        auto = ssm.selective_scan(*[t.detach() for t in ours], impl="auto")
        same = torch.allclose(auto, y_ours.detach(), rtol=1e-6, atol=1e-6)
        why = "mamba_ssm not importable" if target.cuda else "mamba_ssm is CUDA-only"
        return [[f"scan: {why}", f"fallback custom op fwd+bwd {ms_ours:.2f} ms at L={length}",
                 "ok (fallback used)" if same else "FAIL: auto did not use the fallback"]]
    theirs = [t.to(target.device).requires_grad_() for t in inputs]
    y_theirs = ssm.selective_scan(*theirs, impl="auto")
    (y_theirs * weight).sum().backward()
    ms_theirs = target.median_ms(lambda: ssm.selective_scan(*theirs, impl="auto").mul(weight).sum().backward(), 5)
    errors = {"y": _rel(y_theirs, y_ours)} | {
        f"d{name}": _rel(t.grad, o.grad) for name, t, o in zip(("u", "delta", "A", "B", "C", "D"), theirs, ours)
    }
    worst = max(errors, key=errors.get)
    status = "ok" if errors[worst] < 1e-3 else f"FAIL: {worst} differs by {errors[worst]:.1e} (relative)"
    return [["scan: mamba_ssm kernel vs ehrsr op (fp32)",
             f"max rel. diff {errors[worst]:.1e} ({worst}); fwd+bwd {ms_theirs:.2f} vs {ms_ours:.2f} ms", status]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def short_space(folder: Path, plan: Plan = REAL) -> Path:
    """The ``full`` space with its fidelity cut to ``plan``'s steps, patch and batch, so its trials
    take seconds; every model parameter stays as it is."""
    from ehrsr.resources import space_file

    text = space_file("full").read_text()
    min_steps, max_steps = plan.search_steps
    for key, value in (("min_steps", min_steps), ("max_steps", max_steps), ("seconds_per_trial_estimate", 30),
                       ("patch_size", plan.search_patch), ("batch_size", plan.search_batch)):
        text, count = re.subn(rf"^(\s*{key}:)\s*[^#\n]+", rf"\g<1> {value}  ", text, count=1, flags=re.M)
        if count != 1:
            raise ValueError(f"ehrsr/search_spaces/full.yaml has no '{key}:' line to shorten")
    path = folder / "full_short.yaml"
    path.write_text(text)
    return path


def run_command(arguments: list[str], timeout_s: int) -> tuple[int | None, str, float]:
    """``run_search.py ARGUMENTS`` in a child process: (exit status or None on timeout, its last
    output line, seconds)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(ROOT / "run_search.py"), *arguments], capture_output=True,
                              text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"no result in {timeout_s} s", time.perf_counter() - start
    lines = (done.stdout + done.stderr).strip().splitlines() or ["(no output)"]
    return done.returncode, lines[-1][:100], time.perf_counter() - start


def check_search(target: Target, plan: Plan, folder: Path, extra: list[str], label: str) -> list[Row]:
    """A ``plan.search_trials``-trial search on the shortened full space; its study stays in ``folder``."""
    import optuna
    from optuna.trial import TrialState

    from ehrsr.search.study import load_study

    folder.mkdir(parents=True, exist_ok=True)
    space = short_space(folder, plan)
    code, last, seconds = run_command(
        ["--budget", f"trials={plan.search_trials}", "--space", str(space), "--device", str(target.device),
         "--out-dir", str(folder), "--study-name", STUDY, "--ablation-share", "0", "--no-report",
         "--profile-size", str(plan.profile_size), *extra], plan.timeout_s)
    if code is None:
        return [[label, last, "FAIL: timeout"]]
    if code != 0:
        return [[label, last, f"FAIL: exit status {code}"]]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, _, _ = load_study(STUDY, None, folder)
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    left = sum(t.state == TrialState.RUNNING for t in trials)
    psnr = [t.user_attrs["metrics"]["psnr"] for t in trials if "psnr" in (t.user_attrs.get("metrics") or {})]
    result = (f"{seconds:.0f} s; {complete + pruned} of {plan.search_trials} trials finished ({pruned} stopped "
              f"early), best PSNR {max(psnr, default=float('nan')):.2f} dB")
    status = "ok" if complete + pruned == plan.search_trials and not failed and not left else (
        f"FAIL: {failed} failed, {left} left running; {last[:60]}")
    return [[label, result, status]]


def check_deploy(target: Target, plan: Plan, folder: Path) -> list[Row]:
    """``deploy --onnx`` of the study the first search left in ``folder``, for a profile of this device."""
    label = f"deploy --onnx: full-space pick, {target.device.type} {plan.deploy_dtype} {plan.deploy_hw} px"
    if not (folder / STUDY).is_dir():
        return [[label, "", "FAIL: the search left no study to deploy"]]
    devices = folder / "devices.yaml"
    devices.write_text(f"profiles:\n  {PROFILE}:\n    kind: {target.device.type}\n    dtype: {plan.deploy_dtype}\n"
                       f"    input_size: [{plan.deploy_hw}, {plan.deploy_hw}]\n")
    code, last, seconds = run_command(["deploy", "--study-name", STUDY, "--out-dir", str(folder), "--device-profile",
                                       PROFILE, "--devices-file", str(devices), "--onnx"], plan.timeout_s)
    if code is None:
        return [[label, last, "FAIL: timeout"]]
    if code != 0:
        return [[label, last, f"FAIL: exit status {code}"]]
    pick = json.loads((folder / STUDY / "deploy" / f"{PROFILE}.json").read_text())
    onnx = pick.get("onnx") or {}
    size = "dynamic sizes" if onnx.get("dynamic") else f"fixed size ({onnx.get('problem')})"
    result = (f"{seconds:.0f} s; trial {pick['trial']}, {pick['measured']['latency_ms']:.2f} ms; ONNX {size}, "
              f"max abs diff {onnx.get('max_abs_diff', float('nan')):.1e}")
    return [[label, result, "ok" if onnx.get("passed") else "FAIL: the ONNX export did not pass its check"]]


def run_section(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one section; an exception becomes a FAIL row naming it instead of ending the script."""
    print(f"  {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # every failure is a result here
        return [[name, "", f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]]]
    finally:
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-search", action="store_true", help="leave out the run_search.py sections")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every step on the CPU at reduced sizes (no GPU needed)")
    args = parse_args(parser, argv, smoke={"skip_search": True})
    rehearse = args.rehearse or (args.smoke and not torch.cuda.is_available())
    if not rehearse and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check "
              "(--rehearse runs the check on the CPU)", file=sys.stderr)
        return 2
    target = Target(torch.device("cpu" if rehearse else args.device))
    plan = REHEARSAL if rehearse or args.smoke else REAL
    from ehrsr.data import TaskConfig, prepare_data

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_set, _ = prepare_data(TaskConfig(scale=4), cache_dir=work / "cache", progress=False)
        train_set.to(target.device)
        sections: list[tuple[str, Callable[[], list[Row]]]] = [
            ("full-space sampling", lambda: check_sampling(target, plan)),
            ("latency and memory", lambda: check_latency(target, plan)),
            ("AMP training", lambda: check_training(target, plan, train_set)),
            ("data pipeline", lambda: check_data(target, plan, train_set)),
            ("selective scan", lambda: check_scan(target, plan)),
        ]
        if not args.skip_search:
            trials = f"{plan.search_trials}-trial search, full space"
            sections += [
                ("search --isolate", lambda: check_search(target, plan, work / "isolate", ["--isolate"],
                                                          f"{trials}, --isolate")),
                ("search --workers auto", lambda: check_search(target, plan, work / "workers", ["--workers", "auto"],
                                                               f"{trials}, --workers auto")),
                ("deploy --onnx", lambda: check_deploy(target, plan, work / "isolate")),
            ]
        rows = [row for name, fn in sections for row in run_section(name, fn)]
    seconds = time.perf_counter() - start
    if target.cuda:
        title = f"GPU check on {target.name} ({seconds:.0f} s)"
    else:
        title = (f"GPU check rehearsed on the CPU ({target.name}, reduced sizes, no CUDA kernels; "
                 f"{seconds:.0f} s)")
    print_table(["check", "result", "status"], rows, title=title)
    return 0 if all(row[2].startswith("ok") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
