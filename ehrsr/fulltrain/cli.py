"""``run_search.py train`` and ``run_search.py evaluate``: argument parsers and handlers.

``add_train_parser`` / ``add_evaluate_parser`` add the subcommands to an ``argparse`` subparsers
object; ``run_train`` / ``run_evaluate`` run them and return the exit status. Bad input
(``FullTrainError`` and every other ``UserError``, unreadable images) is printed as one ``error:`` line with status 2;
programming errors keep their traceback. ``train`` stopped by Ctrl-C or SIGTERM writes a
checkpoint, says so in one line and exits with 130 or 143 (``ehrsr.interrupts``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ehrsr.errors import UserError
from ehrsr.fulltrain.recipe import RECIPE_KEYS, FullTrainError, Recipe, load_recipe_file, parse_overrides

if TYPE_CHECKING:
    from ehrsr.fulltrain.loop import FullTrainResult

__all__ = ["EXIT_USAGE", "add_evaluate_parser", "add_train_parser", "run_evaluate", "run_train"]

EXIT_USAGE = 2


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train one configuration fully (EMA, checkpoints, resume, model card)",
        description="Full training of a deployment pick, a configuration file or a study trial.",
    )
    source = parser.add_argument_group("configuration (exactly one)")
    source.add_argument("--pick", type=Path, help="deployment pick reports/<study>/deploy/<profile>.json")
    source.add_argument("--config", type=Path, help="EHR-SR configuration file (JSON or YAML)")
    source.add_argument("--study-name", help="study holding the trial (with --trial)")
    source.add_argument("--trial", type=int, help="trial number in --study-name")
    source.add_argument("--storage", help="Optuna storage URL of the study (default: reports/<study>/study.db)")
    source.add_argument("--reports-dir", type=Path, default=Path("reports"), help="reports folder of the study")
    parser.add_argument("--train-data", type=Path, help="folder of HR training images (default: built-in samples)")
    parser.add_argument("--val-data", action="append", metavar="NAME=HR_DIR[,LR_DIR]",
                        help="validation set; repeat for several (default: built-in samples)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config source name>)")
    parser.add_argument("--steps", type=int, help="training steps (recipe key 'steps')")
    parser.add_argument("--recipe", type=Path, help="YAML/JSON file of recipe overrides")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override one recipe key; keys: {', '.join(RECIPE_KEYS)}")
    parser.add_argument("--scale", type=int, help="scale of the data; must equal the configuration's")
    parser.add_argument("--task", choices=["sr", "denoise", "deblur", "jpeg"], help="data task (default: sr)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (it must hold a checkpoint)")
    parser.add_argument("--onnx", action="store_true", help="also export ONNX (dynamic sizes where possible)")
    parser.add_argument("--cache-dir", type=Path, help="data cache folder")
    parser.add_argument("--lpips-weights", type=Path, help="LPIPS weight files (with --set lpips=true)")
    parser.add_argument("--log-every", type=int, default=100, metavar="N",
                        help="steps between TensorBoard points (default 100; every checkpoint adds one)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train)
    return parser


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="PSNR/SSIM of saved weights on benchmark folders (EHR-SR or spandrel architectures)",
        description="Evaluate EHR-SR weights (safetensors + config, or a pick JSON) or any spandrel-readable "
                    "checkpoint on benchmark folders: PSNR/SSIM on Y, crop = scale, MATLAB bicubic LR.",
    )
    parser.add_argument("--weights", type=Path, required=True, help="safetensors / .pth / pick JSON")
    parser.add_argument("--config", type=Path, help="EHR-SR configuration (default: metadata or config.json beside)")
    parser.add_argument("--val-data", action="append", metavar="NAME=HR_DIR[,LR_DIR]",
                        help="benchmark folder; repeat for several (default: built-in samples)")
    parser.add_argument("--scale", type=int, help="scale of the data; must equal the model's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, help="data cache folder")
    parser.set_defaults(handler=run_evaluate)
    return parser


def _fail(exc: BaseException) -> int:
    text = str(exc).strip()
    print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
    return EXIT_USAGE


def _task(scale: int, task_name: str | None, flag_scale: int | None):
    from ehrsr.data import TaskConfig

    if flag_scale is not None and flag_scale != scale:
        raise FullTrainError(f"--scale {flag_scale}: the configuration is x{scale}; train a x{flag_scale} configuration instead")
    name = task_name or ("sr" if scale > 1 else None)
    if name is None:
        raise FullTrainError("the configuration is x1 (restoration): give --task denoise, deblur or jpeg")
    try:
        return TaskConfig(task=name, scale=scale)
    except ValueError as exc:
        raise FullTrainError(f"--task {name}: {exc}") from None


def run_train(args: argparse.Namespace) -> int:
    from ehrsr.data import ImageReadError
    from ehrsr.fulltrain.data import parse_val_data
    from ehrsr.fulltrain.loop import FullTrainSettings, full_train
    from ehrsr.fulltrain.source import resolve_config
    from ehrsr.search.storage import mask_url
    from ehrsr.training import TrainingError

    try:
        source = resolve_config(pick=args.pick, config=args.config, study_name=args.study_name, trial=args.trial,
                                storage=args.storage, out_dir=args.reports_dir)
        overrides = load_recipe_file(args.recipe) if args.recipe else {}
        overrides.update(parse_overrides(args.set))
        if args.steps is not None:
            overrides["steps"] = args.steps
        recipe = Recipe.from_dict(overrides)
        task = _task(source.config.scale, args.task, args.scale)
        default_name = (args.pick or args.config or Path(f"{args.study_name}-trial{args.trial}")).stem
        settings = FullTrainSettings(
            config=source.config, recipe=recipe, out_dir=args.out or Path("runs") / default_name,
            train_data=args.train_data, val_data=parse_val_data(args.val_data), task=task, device=args.device,
            resume=args.resume, onnx=args.onnx, source=mask_url(source.description), cache_dir=args.cache_dir,
            lpips_weights=args.lpips_weights, progress=not args.quiet, log_every=args.log_every,
        )
        result = full_train(settings)
    except (UserError, ImageReadError) as exc:
        return _fail(exc)
    except TrainingError as exc:  # diverged or out of memory: the last checkpoint stays in --out
        print(f"error: {exc}; the last checkpoint is kept in {settings.out_dir}", file=sys.stderr)
        return 1
    if result.interrupted_by is not None:
        return _say_interrupted(result)
    numbers = ", ".join(f"{name} {s['psnr']:.2f} dB / {s['ssim']:.4f} (bicubic {s['bicubic']['psnr']:.2f})"
                        for name, s in result.evaluation.get("sets", {}).items())
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    print(f"trained {result.steps_done} steps ({result.steps_per_second:.2f} steps/s{resumed}); {numbers}; "
          f"best {result.best_psnr:.2f} dB at step {result.best_step}; card: {result.card_path}")
    return 0


def _say_interrupted(result: FullTrainResult) -> int:
    """One line on where a run stopped by Ctrl-C or SIGTERM stands; its exit status."""
    from ehrsr.fulltrain.loop import CHECKPOINT_NAME
    from ehrsr.interrupts import exit_status

    name = result.interrupted_by
    assert name is not None
    checkpoint = result.out_dir / CHECKPOINT_NAME
    if checkpoint.exists():
        print(f"interrupted ({name}): checkpoint at step {result.steps_done} in {checkpoint}; "
              "run the same command again to resume", file=sys.stderr)
    else:
        print(f"interrupted ({name}) before the first step: nothing trained", file=sys.stderr)
    return exit_status(name)


def run_evaluate(args: argparse.Namespace) -> int:
    from ehrsr.data import ImageReadError
    from ehrsr.fulltrain.data import parse_val_data, prepare_sets
    from ehrsr.fulltrain.evaluate import evaluate_model, format_table, load_model

    try:
        loaded = load_model(args.weights, args.config)
        if args.scale is not None and args.scale != loaded.scale:
            raise FullTrainError(f"--scale {args.scale}: the model {args.weights} is x{loaded.scale}")
        task = _task(loaded.scale, None, None) if loaded.scale > 1 else None
        if task is None:
            raise FullTrainError(f"{args.weights} is a x1 model; evaluate handles SR models (scale 2-4)")
        _, val_sets = prepare_sets(task, None, parse_val_data(args.val_data), cache_dir=args.cache_dir)
        table = evaluate_model(loaded, val_sets, device=args.device)
    except (UserError, ImageReadError) as exc:
        return _fail(exc)
    print(f"{loaded.description}")
    print(format_table(table))
    return 0
