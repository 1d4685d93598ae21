"""Command line of ``run_search.py``: ``search`` (the default), ``report``, ``ablate``, ``deploy``,
``train``, ``evaluate`` and ``storage-proxy``.

This module parses arguments and maps errors; the work is ``ehrsr.pipeline``'s. Every problem the
user can fix (bad budget text, unknown key in a YAML file, unreadable image, unreachable storage,
...: an ``ehrsr.errors.UserError`` or one of ``user_errors()``) is printed as one ``error:`` line
and exits with status 2; nothing that is already stored is touched. Any other exception is a
programming error and keeps its traceback. Passwords in storage URLs are masked everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ehrsr.errors import UserError
from ehrsr.interrupts import exit_status, interrupt_name, sigterm_as_interrupt

__all__ = ["main", "user_errors"]

SUBCOMMANDS = ("search", "report", "ablate", "baselines", "fidelity", "deploy", "calibrate", "train", "evaluate",
               "storage-proxy")
EXIT_USAGE = 2


def parse_si(text: str, what: str) -> float:
    """``1.5M`` -> 1.5e6, ``900k`` -> 9e5, ``2G`` -> 2e9, plain numbers as they are."""
    from ehrsr.study_schema import parse_si as parse_number  # optuna: imported only when used

    try:
        value = parse_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{what}: must be positive, got {text!r}")
    return value


def _positive_float(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{what}: must be a positive finite number, got {text!r}")
        return value

    return parse


def parse_ablation_seeds(text: str) -> int | str:
    """``--ablation-seeds``: ``auto`` or a positive integer."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ablation-seeds: {text!r} is neither 'auto' nor an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--ablation-seeds: must be 'auto' or a positive integer, got {text!r}")
    return value


_SEEDS_HELP = ("seeds per ablation variant: 'auto' (default: 2, then more, up to 6, for variants whose "
               "interval still contains zero while the budget lasts) or a fixed number")


def parse_size(text: str) -> tuple[int, int]:
    """``256`` or ``256x320`` (height x width of the LR input)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--profile-size: {text!r} is not SIZE or HEIGHTxWIDTH (e.g. 256 or 270x480)")
    height = int(match[1])
    width = int(match[2]) if match[2] else height
    if height < 8 or width < 8:
        raise argparse.ArgumentTypeError(f"--profile-size: {text!r} is too small (at least 8x8)")
    return height, width


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit status 2 (its default status too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study-name", help="study to use (default for search: derived from space and task)")
    parser.add_argument("--storage", help="Optuna storage URL (default: reports/<study>/study.db); "
                        "postgresql://..., mysql://..., sqlite:///PATH or journal:PATH")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="reports folder (default: reports)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    verbosity.add_argument("--verbose", "-v", action="store_true", help="print more detail")


def build_parser() -> dict[str, argparse.ArgumentParser]:
    search = _Parser(
        prog="run_search.py",
        description="Hardware-aware multi-objective architecture search over EHR-SR. "
        "Subcommands: report, ablate, baselines, fidelity, deploy, train, evaluate, storage-proxy (run_search.py SUBCOMMAND --help).",
    )
    search.add_argument("--budget", help="gpu-hours=48, cpu-hours=2, hours=1.5, minutes=10, trials=30, or several "
                        "joined by commas (default: gpu-hours=1 with CUDA, minutes=10 without)")
    search.add_argument("--space", help="search space: tiny, full, or a YAML file (default: full with CUDA, else tiny)")
    search.add_argument("--objectives", default="psnr,latency",
                        help="comma list of psnr, ssim, lpips, latency, macs, params, memory, and latency@PROFILE "
                             "(predicted by that device profile's latency model) (default: psnr,latency)")
    search.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    search.add_argument("--profile-size", type=parse_size, default=(256, 256),
                        help="LR input size for latency/memory/MACs (default 256, the NTIRE convention)")
    search.add_argument("--profile-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    search.add_argument("--profile-seconds", type=_positive_float("--profile-seconds"),
                        help="seconds of timed passes per latency measurement, at least 5 passes "
                             "(default 0.25: a ranking signal; deploy re-measures with 1 s)")
    search.add_argument("--threads", type=int, help="CPU threads for training and timing (default: torch's)")
    search.add_argument("--max-params", type=lambda t: parse_si(t, "--max-params"), help="e.g. 500k, 1.5M")
    search.add_argument("--max-macs", type=lambda t: parse_si(t, "--max-macs"), help="at the profile size, e.g. 20G")
    search.add_argument("--max-latency-ms", action="append", metavar="[PROFILE=]MS",
                        help="latency limit on this machine (MS), or on a device profile, predicted "
                             "(PROFILE=MS, repeatable); over-limit predictions are refused before training")
    search.add_argument("--devices-file", help="device profiles YAML for latency@PROFILE "
                        "(default: the shipped ehrsr/search_spaces/devices.yaml)")
    search.add_argument("--max-memory-mb", type=_positive_float("--max-memory-mb"))
    search.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2", "nsga3", "gp", "random"))
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--workers", default="1", help="worker processes on this machine, or 'auto' (one per GPU)")
    search.add_argument("--train-data", help="HR training images folder (default: built-in sample images)")
    search.add_argument("--val-data", help="HR validation images folder (default: built-in sample images)")
    search.add_argument("--task", default="sr", choices=("sr", "denoise", "deblur", "jpeg"))
    search.add_argument("--scale", type=int, help="SR scale 2-4, or 1 for restoration (default: 4 for sr, else 1)")
    search.add_argument("--noise-sigma", type=float, help="Gaussian noise std, 0-255 units")
    search.add_argument("--blur-sigma", type=float, help="Gaussian blur std in HR pixels")
    search.add_argument("--jpeg-quality", type=int, help="JPEG quality 1-100")
    search.add_argument("--cache-dir", help="prepared-data cache (default: $EHRSR_CACHE or ~/.cache/ehrsr)")
    search.add_argument("--lpips-weights", help="local LPIPS weights file or folder (offline machines)")
    search.add_argument("--no-early-stopping", action="store_true", help="train every trial at full fidelity")
    search.add_argument("--allow-repeats", action="store_true",
                        help="train a proposal that repeats a finished configuration (default: record "
                             "the earlier result, no training, no budget)")
    search.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each trial in a child process (default: on with CUDA)")
    search.add_argument("--ablation-share", type=float, default=0.15,
                        help="share of the budget kept for the controlled ablation (default 0.15; 0 = none)")
    search.add_argument("--ablation-seeds", type=parse_ablation_seeds, default="auto", help=_SEEDS_HELP)
    search.add_argument("--baselines", help="hand-designed baselines trained after the search with its trial "
                        "protocol: comma list (SPAN,SAFMN,PLKSR,RLFN,OmniSR,DITN; NAME-skip drops the bicubic skip), "
                        "'none', or default: every available one with the bicubic skip")
    search.add_argument("--baselines-share", type=float, default=0.10,
                        help="share of the budget kept for the baselines (default 0.10)")
    search.add_argument("--fidelity-share", type=float, default=0.10,
                        help="share of the budget kept for the proxy-fidelity check (default 0.10; 0 = none)")
    search.add_argument("--fidelity-configs", type=int, default=8, help="configurations retrained (default 8, min 4)")
    search.add_argument("--fidelity-factor", type=float, default=4.0,
                        help="long retrain = this many times a trial's steps (default 4)")
    search.add_argument("--no-report", action="store_true", help="do not write reports at the end")
    _no_html(search)
    _common(search)

    report = _Parser(prog="run_search.py report", description="Regenerate reports/<study>/ from the storage alone.")
    _no_html(report)
    _common(report)

    ablate = _Parser(prog="run_search.py ablate", description="Run the controlled ablation of a finished search.")
    ablate.add_argument("--reference", type=int, help="trial number of the reference (default: the Pareto knee)")
    ablate.add_argument("--ablation-seeds", type=parse_ablation_seeds, help=_SEEDS_HELP + " (default: the study's)")
    ablate.add_argument("--budget", help="time for the ablation (hours=, minutes=); default: unlimited")
    ablate.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    ablate.add_argument("--lpips-weights")
    _common(ablate)

    baselines = _Parser(prog="run_search.py baselines",
                        description="Train the hand-designed baselines with a finished study's trial protocol.")
    baselines.add_argument("--baselines", help="comma list or 'default' (see run_search.py --help; default: the "
                           "study's --baselines)")
    _side_options(baselines)
    _common(baselines)

    fidelity = _Parser(prog="run_search.py fidelity",
                       description="Proxy fidelity: retrain K configurations F times longer and compare the rankings.")
    fidelity.add_argument("--configs", type=int,
                          help="configurations to retrain (default: the study's --fidelity-configs; min 4)")
    fidelity.add_argument("--factor", type=_positive_float("--factor"),
                          help="long retrain = this many times a trial's steps (default: the study's --fidelity-factor)")
    _side_options(fidelity)
    _common(fidelity)

    deploy = _Parser(prog="run_search.py deploy", description="Re-profile the Pareto set here and pick per device profile.")
    deploy.add_argument("--device-profile", required=True, action="append",
                        help="profile name from the shipped ehrsr/search_spaces/devices.yaml (repeatable)")
    deploy.add_argument("--devices-file", help="device profiles YAML (default: the shipped ehrsr/search_spaces/devices.yaml)")
    deploy.add_argument("--onnx", action="store_true", help="also export ONNX, checked against PyTorch")
    _common(deploy)
    calibrate = _Parser(prog="run_search.py calibrate",
                        description="Calibrate a device profile's latency model on this machine (the target device).")
    calibrate.add_argument("--device-profile", required=True, help="profile name in the devices file")
    calibrate.add_argument("--space", required=True, help="search space: tiny, full, or a YAML file")
    calibrate.add_argument("--out", type=Path, help="output file (default: latency_models/<profile>.<space>.latency.json)")
    calibrate.add_argument("--devices-file", help="device profiles YAML (default: the shipped devices.yaml)")
    calibrate.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                           help="wall clock (default), or process CPU time (one thread; shared machines)")
    calibrate.add_argument("--unit-timing", choices=("isolated", "graph"), default="isolated",
                           help="isolated: each unit exported and timed alone (default); graph (onnxruntime): whole "
                                "networks profiled, node times charged to their units (docs/latency_models.md)")
    calibrate.add_argument("--no-resume", action="store_true", help="start over instead of continuing an unfinished file")
    calibrate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    from ehrsr.fulltrain import add_evaluate_parser, add_train_parser
    from ehrsr.search.proxy import storage_proxy_parser

    holder = _Parser(prog="run_search.py").add_subparsers(parser_class=_Parser)
    return {"search": search, "report": report, "ablate": ablate, "baselines": baselines, "fidelity": fidelity,
            "deploy": deploy, "calibrate": calibrate,
            "train": add_train_parser(holder), "evaluate": add_evaluate_parser(holder),
            "storage-proxy": storage_proxy_parser(_Parser)}


def _no_html(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-html", action="store_true",
                        help="write report.md without report.html (the interactive page; an older one is removed)")


def _side_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", help="time for these runs (hours=, minutes=); default: unlimited")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--lpips-weights")


def _verbosity(args: argparse.Namespace) -> int:
    return 0 if args.quiet else 2 if args.verbose else 1


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', printed as one line with exit 2:
    ``UserError`` (SearchError, StorageError, AblationError, DeploymentError, DeviceProfileError,
    ConfigError, ...) and the user-input errors of modules that do not derive from it yet."""
    from ehrsr.data import ImageReadError
    from ehrsr.search.budget import BudgetError
    from ehrsr.search.space import SearchSpaceError

    return (UserError, BudgetError, SearchSpaceError, ImageReadError)


# Where each flag of the search lands in ``SearchSettings`` (a field, or a part of ``limits`` /
# ``task``). On a resume, the study record gives every recorded setting that is not given here
# (ehrsr.search.study.merged_settings); tests/test_study_record.py follows each flag into the record.
SEARCH_FLAG_SETTINGS: dict[str, tuple[str, ...]] = {
    "budget": ("budget",), "space": ("space",), "objectives": ("objectives",), "device": ("device",),
    "profile_size": ("profile_size",), "profile_dtype": ("profile_dtype",), "profile_seconds": ("profile_seconds",),
    "threads": ("threads",), "max_params": ("limits.max_params",), "max_macs": ("limits.max_macs",),
    "max_latency_ms": ("limits.max_latency_ms", "device_latency_limits"), "devices_file": ("devices_file",),
    "max_memory_mb": ("limits.max_memory_mb",), "sampler": ("sampler",), "seed": ("seed",), "workers": ("workers",),
    "train_data": ("train_data",), "val_data": ("val_data",), "task": ("task.task",), "scale": ("task.scale",),
    "noise_sigma": ("task.noise_sigma",), "blur_sigma": ("task.blur_sigma",), "jpeg_quality": ("task.jpeg_quality",),
    "cache_dir": ("cache_dir",), "lpips_weights": ("lpips_weights",), "no_early_stopping": ("early_stopping",),
    "allow_repeats": ("allow_repeats",), "isolate": ("isolate",), "ablation_share": ("ablation_share",),
    "ablation_seeds": ("ablation_seeds",), "baselines": ("baselines",), "baselines_share": ("baselines_share",),
    "fidelity_share": ("fidelity_share",), "fidelity_configs": ("fidelity_configs",),
    "fidelity_factor": ("fidelity_factor",), "no_report": ("write_reports",), "no_html": ("write_html",), "study_name": ("study_name",),
    "storage": ("storage",), "out_dir": ("out_dir",), "quiet": ("verbosity",), "verbose": ("verbosity",),
}


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags ``argv`` gives explicitly (a default is not 'given'): the
    parser runs again with every default suppressed, so abbreviations and ``--flag=value`` count."""
    actions = parser._actions  # argparse has no public list of its actions
    saved = [action.default for action in actions]
    try:
        for action in actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv))) - {"help"}
    finally:
        for action, default in zip(actions, saved):
            action.default = default


def _search(args: argparse.Namespace, given: set[str] | None = None) -> int:
    from ehrsr.ablation.baselines import parse_baselines
    from ehrsr.deploy import load_device_profiles
    from ehrsr.pipeline import run_pipeline
    from ehrsr.search.device_latency import parse_latency_limits
    from ehrsr.search.study import SearchSettings
    from ehrsr.study_schema import CostLimits

    parse_baselines(args.baselines)  # an unknown name is an error before any search is started
    max_latency_ms, device_limits = parse_latency_limits(args.max_latency_ms)
    task: dict[str, Any] = {"task": args.task}
    for key in ("scale", "noise_sigma", "blur_sigma", "jpeg_quality"):
        if getattr(args, key) is not None:
            task[key] = getattr(args, key)
    settings = SearchSettings(
        space=args.space,
        budget=args.budget,
        objectives=args.objectives,
        device=args.device,
        profile_size=args.profile_size,
        profile_dtype=args.profile_dtype,
        **({"profile_seconds": args.profile_seconds} if args.profile_seconds else {}),
        threads=args.threads,
        limits=CostLimits(args.max_params, args.max_macs, max_latency_ms, args.max_memory_mb),
        device_latency_limits=device_limits,
        devices_file=args.devices_file,
        load_device_profiles=load_device_profiles,
        sampler=args.sampler,
        seed=args.seed,
        storage=args.storage,
        study_name=args.study_name,
        out_dir=args.out_dir,
        workers=args.workers,
        train_data=args.train_data,
        val_data=args.val_data,
        task=task,
        cache_dir=args.cache_dir,
        lpips_weights=args.lpips_weights,
        early_stopping=not args.no_early_stopping,
        allow_repeats=args.allow_repeats,
        isolate=args.isolate,
        ablation_share=args.ablation_share,
        ablation_seeds=args.ablation_seeds,
        baselines=args.baselines,
        baselines_share=args.baselines_share,
        fidelity_share=args.fidelity_share,
        fidelity_configs=args.fidelity_configs,
        fidelity_factor=args.fidelity_factor,
        write_reports=not args.no_report,
        write_html=not args.no_html,
        verbosity=_verbosity(args),
        given=None if given is None else frozenset(s for dest in given for s in SEARCH_FLAG_SETTINGS[dest]),
    )
    summary = run_pipeline(settings)
    return exit_status(summary.interrupted_by) if summary.interrupted_by else 0


def _calibrate(args: argparse.Namespace) -> int:
    from ehrsr.deploy.calibrate import calibrate_profile

    result = calibrate_profile(args.device_profile, args.space, args.out, devices_path=args.devices_file,
                               clock=args.clock, resume=not args.no_resume, progress=not args.quiet,
                               unit_timing=args.unit_timing)
    acc = result.accuracy
    accuracy = (f"held-out accuracy on {acc.n} networks: median abs error {acc.median_abs_pct_error:.1f} %, "
                f"p90 {acc.p90_abs_pct_error:.1f} %, Spearman {acc.spearman:.3f}") if acc is not None else "no accuracy stored"
    print(f"latency model for {result.profile} on space {result.space} ({result.units} units) written: {result.path}")
    print(accuracy)
    print(f"use it: set `latency_model: {result.path}` in profile {result.profile} of the devices file "
          "(relative to that file), then --objectives psnr,latency@" + result.profile)
    return 0


class UsageError(UserError):
    """A subcommand is missing something it needs."""


class OutputError(UserError):
    """Writing into the output folder failed on the way (read-only, full)."""


@contextlib.contextmanager
def _writing_to(folder: Path) -> Iterator[None]:
    """``report`` / ``deploy`` write into ``folder``: check it can be written before any work, and
    turn a write failure on the way (``OSError``; safetensors' ``SafetensorError``, which wraps
    the OS error) into one line naming the folder."""
    from safetensors import SafetensorError

    from ehrsr.files import check_writable

    check_writable(folder, create=False)  # a missing folder is the storage's business ("no study ...")
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputError(f"cannot write to {exc.filename or folder}: {exc.strerror}") from None
    except SafetensorError as exc:  # e.g. "Error while serializing: IoError(Os { code: 13, ... })"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "SafetensorError"
        raise OutputError(f"weights file under {folder} failed: {first}") from None


# the folder cannot be written: permission, read-only file system, full disk or quota, a file in the path
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def _need_study(args: argparse.Namespace, command: str) -> None:
    from ehrsr.search.study import check_study_name

    if args.study_name is None:
        raise UsageError(f"{command} needs --study-name NAME (the folder name under {args.out_dir}/)")
    check_study_name(args.study_name)


def _report(args: argparse.Namespace) -> int:
    from ehrsr.pipeline import report_study

    _need_study(args, "report")
    with _writing_to(args.out_dir / args.study_name):
        path = report_study(args.study_name, args.storage, args.out_dir, quiet=args.quiet, html=not args.no_html)
    print(f"report written: {path}" + ("" if args.no_html else f" and {path.with_suffix('.html')}"))
    return 0


def _time_budget_seconds(args: argparse.Namespace, command: str) -> float | None:
    """``--budget`` of a subcommand as device-seconds (time limits only), or None when not given."""
    if not args.budget:
        return None
    from ehrsr.search.budget import parse_budget

    limits = [limit for limit in parse_budget(args.budget).limits if limit.seconds is not None]
    if not limits:
        raise UsageError(f"{command} --budget {args.budget}: give a time (hours=, minutes=, gpu-hours=, cpu-hours=)")
    return min(limit.seconds for limit in limits)


def _baselines(args: argparse.Namespace) -> int:
    from ehrsr.pipeline import run_baselines_for_study

    _need_study(args, "baselines")
    result = run_baselines_for_study(
        args.study_name, args.storage, args.out_dir, baselines=args.baselines, device=args.device,
        budget_seconds=_time_budget_seconds(args, "baselines"), lpips_weights=args.lpips_weights,
        verbosity=_verbosity(args),
    )
    print(f"baselines with the protocol of trial #{result.reference_trial}: {result.runs_run} trained now, "
          f"{result.runs_skipped} already stored, {len(result.planned)} planned"
          + (f"; stopped: {result.stopped}" if result.stopped else ""))
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from ehrsr.pipeline import run_fidelity_for_study

    _need_study(args, "fidelity")
    result = run_fidelity_for_study(
        args.study_name, args.storage, args.out_dir, configs=args.configs, factor=args.factor, device=args.device,
        budget_seconds=_time_budget_seconds(args, "fidelity"), lpips_weights=args.lpips_weights,
        verbosity=_verbosity(args),
    )
    print(f"proxy fidelity: trials {result.sources} retrained x{result.factor:g}: {result.runs_run} now, "
          f"{result.runs_skipped} already stored" + (f"; stopped: {result.stopped}" if result.stopped else "")
          + f"; report: {args.out_dir / args.study_name / 'report.md'}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from ehrsr.pipeline import run_ablation

    _need_study(args, "ablate")
    budget_seconds = _time_budget_seconds(args, "ablate")
    result = run_ablation(
        args.study_name, args.storage, args.out_dir, device=args.device, reference=args.reference,
        seeds=args.ablation_seeds, budget_seconds=budget_seconds, lpips_weights=args.lpips_weights,
        verbosity=_verbosity(args),
    )
    print(f"controlled ablation of trial #{result.reference_trial}: {result.runs_run} runs now, "
          f"{result.runs_skipped} already stored, {result.runs_planned} planned"
          + (f"; stopped: {result.stopped}" if result.stopped else ""))
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from ehrsr.pipeline import deploy_study

    _need_study(args, "deploy")

    def say(name: str, pick: Any) -> None:
        quality = ", ".join(f"{k} {v:.4g}" for k, v in pick.quality.items() if v is not None)
        latency = pick.measured.get("latency_ms")
        where = pick.measured.get("device", "this machine")
        print(f"{name}: trial #{pick.trial} ({quality}; {latency:.1f} ms on {where}) -> {pick.json_path}")
        _say_latency_source(pick.json_path)

    with _writing_to(args.out_dir / args.study_name):
        deploy_study(args.study_name, args.storage, args.out_dir, args.device_profile, onnx=args.onnx,
                     devices_path=args.devices_file, progress=not args.quiet, on_pick=say)
    return 0


def _say_latency_source(json_path: Path) -> None:
    """Whether a pick's latencies were predicted, and on the device whether predictions agreed."""
    import json

    latency = json.loads(Path(json_path).read_text()).get("latency") or {}
    if latency.get("mode") == "predicted":
        print(f"  picked from predicted latencies: {latency['why']}")
    elif "pick_changed" in latency:
        changed = latency["pick_changed"]
        print(f"  measured on the device; the pick from predictions (trial #{latency['pick_from_predictions']}) "
              f"{'differs' if changed else 'is the same'}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "search"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    parser = build_parser()[command]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed in one line)
        return int(exc.code or 0)
    import optuna

    # Optuna's own INFO lines ("A new study created ...") would interleave with ours
    optuna.logging.set_verbosity(optuna.logging.INFO if getattr(args, "verbose", False) else optuna.logging.WARNING)
    from ehrsr.fulltrain import run_evaluate, run_train
    from ehrsr.search.proxy import run_storage_proxy

    handler = {"search": _search, "report": _report, "ablate": _ablate, "baselines": _baselines,
               "fidelity": _fidelity, "deploy": _deploy, "calibrate": _calibrate,
               "train": run_train, "evaluate": run_evaluate, "storage-proxy": run_storage_proxy}[command]
    try:
        with sigterm_as_interrupt():  # a scheduler's stop ends every subcommand as Ctrl-C does
            if command == "search":
                return _search(args, given_flags(parser, argv))
            return handler(args)
    except KeyboardInterrupt as exc:
        name = interrupt_name(exc)
        print(f"interrupted ({name})", file=sys.stderr)
        return exit_status(name)
    except user_errors() as exc:
        from ehrsr.search.storage import mask_url

        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        message = mask_url(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
