"""Time a model through one of two runtimes with the project's latency protocol.

``time_model(model, runtime, input_shapes, threads, ...)`` runs PyTorch eager (``runtime="torch"``)
or the model exported to ONNX and run by onnxruntime's CPU execution provider
(``runtime="onnxruntime"``). Both use the same protocol as ``measure_latency``
(``ehrsr.profiling.latency``: a cold pass and a calibration pass, planned warm-up, then the median
and 10th / 90th percentiles of timed passes, a fixed thread count), so a latency model calibrated
with one runtime and a deployed measurement with the same runtime are comparable.

The ONNX export used here (``export_for_timing``) is the tracing (TorchScript) exporter at a fixed
input shape (the dynamo exporter when tracing lacks an operator, such as the FSB's ``rfft2``),
with several inputs allowed and constant folding off, so that work that depends only
on one input (a skip connection given as a second input) is not folded away. It is deliberately
lighter than the deploy export (``export_onnx`` in the deploy code, which also validates the file
and compares it numerically): timing needs a runnable graph, not a release artefact.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ehrsr.profiling.latency import (
    LatencyStats,
    PerfCounterClock,
    cpu_threads,
    device_name,
    parse_dtype,
    resolve_budget,
    run_timed,
    stats_from_samples,
)

__all__ = ["RUNTIMES", "export_for_timing", "onnxruntime_version", "runtime_versions", "time_model"]

RUNTIMES = ("torch", "onnxruntime")
ONNX_OPSET = 17


def onnxruntime_version() -> str | None:
    """The installed onnxruntime version, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def runtime_versions(runtime: str) -> dict[str, str]:
    """Versions that decide the speed of ``runtime`` (recorded in latency model files)."""
    versions = {"torch": torch.__version__}
    if runtime == "onnxruntime":
        versions["onnxruntime"] = onnxruntime_version() or "not installed"
    return versions


class _ProcessTimeClock:
    """CPU time of the process during a pass (``time.process_time``): with one thread it is the
    pass's compute time whether or not other processes preempted it, so a single-thread target
    can be calibrated on a machine that other jobs share. It is not a latency with several
    threads (their CPU times add up), and it leaves out waiting on memory held by others' cache
    misses only partly: a quiet machine's wall clock stays the reference."""

    def time_ms(self, run: Callable[[], object]) -> float:
        start = time.process_time()
        run()
        return 1000.0 * (time.process_time() - start)


CLOCKS = ("wall", "cpu")


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime" and onnxruntime_version() is None:
        raise ValueError("runtime 'onnxruntime' needs the onnxruntime package (pip install 'ehrsr[onnx]')")


def _shapes(input_shapes: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """One shape or several: ``(1, 3, 64, 64)`` or ``[(1, 8, 32, 32), (1, 8, 32, 32)]``."""
    if input_shapes and all(isinstance(v, int) for v in input_shapes):
        return [tuple(input_shapes)]  # type: ignore[arg-type]
    return [tuple(s) for s in input_shapes]  # type: ignore[union-attr]


def _example_inputs(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(shape, generator=generator) for shape in shapes]


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """The exporters print whole graphs from C++ straight to file descriptors 1 and 2: hide them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as devnull:
            for fd in saved:
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def export_for_timing(model: nn.Module, input_shapes: Sequence[int] | Sequence[Sequence[int]], path: str | Path) -> Path:
    """Export ``model`` (float32, CPU, eval) to ONNX at fixed shapes for timing; returns the path.

    Raises ``RuntimeError`` naming the model when the exporter fails.
    """
    path = Path(path)
    inputs = tuple(_example_inputs(_shapes(input_shapes)))
    names = [f"input{i}" for i in range(len(inputs))]
    errors = []
    # the tracing exporter first (fast); the dynamo one for operators it lacks (rfft2 of the FSB)
    for dynamo in (False, True):
        sink = io.StringIO()
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(sink),
                contextlib.redirect_stderr(sink),
                _silenced_output(),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model.eval(),
                    inputs,
                    str(path),
                    dynamo=dynamo,
                    opset_version=18 if dynamo else ONNX_OPSET,
                    input_names=names,
                    do_constant_folding=False,
                    **({"optimize": False} if dynamo else {}),
                )
            return path
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {first[:200]}")
            path.unlink(missing_ok=True)
    raise RuntimeError(f"ONNX export of {type(model).__name__} failed: {'; '.join(errors)}")


def _onnx_session(path: Path, threads: int | None) -> object:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one pass at a time, like PyTorch eager
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_model(
    model: nn.Module,
    runtime: str,
    input_shapes: Sequence[int] | Sequence[Sequence[int]],
    threads: int | None = None,
    *,
    dtype: str = "float32",
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
    clock: str = "wall",
) -> LatencyStats:
    """Latency of ``model(*inputs)`` on the CPU through ``runtime`` (``"torch"`` or ``"onnxruntime"``).

    ``model`` is run as given (pass the deploy form), in eval mode, on seeded random inputs of
    ``input_shapes`` (one shape or a list). ``threads``: PyTorch's intra-op threads, or
    onnxruntime's ``intra_op_num_threads`` (None: the runtime's default). ``warmup`` / ``repeats``
    / ``budget_s`` as in ``measure_latency``. onnxruntime runs float32 only. ``clock``: ``"wall"``
    (the protocol's ``time.perf_counter``) or ``"cpu"`` (process CPU time, one thread only; see
    ``_ProcessTimeClock``).
    """
    _check_runtime(runtime)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock 'cpu' measures latency with one thread only, got threads={threads!r}")
    if clock == "cpu" and runtime != "torch":
        # measured: onnxruntime's passes timed in process CPU time did not repeat (Spearman 0.37
        # between two passes over 100 networks, against 0.93 for torch; docs/latency_models.md)
        raise ValueError("clock 'cpu' is for the torch runtime only; time onnxruntime with the wall clock")
    resolve_budget("cpu", budget_s)
    dtype_name, torch_dtype = parse_dtype(dtype)
    shapes = _shapes(input_shapes)
    inputs = _example_inputs(shapes)
    model = model.to("cpu").eval()
    timer = PerfCounterClock() if clock == "wall" else _ProcessTimeClock()
    if runtime == "torch":
        autocast = (
            torch.autocast("cpu", dtype=torch_dtype) if torch_dtype != torch.float32 else contextlib.nullcontext()
        )

        def run_torch() -> object:
            with autocast:
                return model(*inputs)

        with torch.inference_mode(), cpu_threads(threads) as n_threads:
            samples, warmup_done, repeats_done = run_timed(run_torch, timer, "cpu", warmup, repeats, budget_s)
    else:
        if dtype_name != "float32":
            raise ValueError(f"runtime 'onnxruntime' times float32 models only, got dtype {dtype_name!r}")
        with tempfile.TemporaryDirectory(prefix="ehrsr-onnx-") as folder:
            path = export_for_timing(model, shapes, Path(folder) / "model.onnx")
            session = _onnx_session(path, threads)
        feeds = {f"input{i}": x.numpy() for i, x in enumerate(inputs)}
        feeds = {name: feeds[name] for name in (i.name for i in session.get_inputs())}  # unused inputs are dropped

        def run_onnx() -> object:
            return session.run(None, feeds)

        samples, warmup_done, repeats_done = run_timed(run_onnx, timer, "cpu", warmup, repeats, budget_s)
        n_threads = threads if threads is not None else torch.get_num_threads()
    return stats_from_samples(samples, warmup_done, repeats_done, dtype_name,
                              f"{device_name('cpu', n_threads)} [{runtime}{', cpu clock' if clock == 'cpu' else ''}]")
