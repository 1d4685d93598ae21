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
from typing import Any

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

__all__ = [
    "CLOCKS",
    "RUNTIMES",
    "check_timing_settings",
    "export_for_timing",
    "onnxruntime_version",
    "runtime_versions",
    "time_model",
    "time_onnx",
]

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


def check_timing_settings(
    runtime: str,
    *,
    clock: str = "wall",
    threads: int | None = None,
    kind: str = "cpu",
    dtype: str = "float32",
) -> None:
    """Refuse settings no runtime here can time, with one line saying why (``ValueError``).

    The one place these rules live: timing (``time_model``), latency targets and calibration
    (``ehrsr.profiling.latency_model``), device profiles and the ``calibrate`` command (``deploy``)
    all call it and add their own context to the message.

    - ``runtime`` is one of ``RUNTIMES``; onnxruntime is the CPU execution provider in float32;
    - ``clock`` is one of ``CLOCKS``; the CPU clock (process CPU time) is a latency only with one
      thread (the CPU times of several threads add up), and only for torch: onnxruntime's passes
      timed in CPU time did not repeat (Spearman 0.37 between two passes over 100 networks, against
      0.93 for torch; docs/latency_models.md).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime" and (kind != "cpu" or dtype != "float32"):
        raise ValueError(
            "runtime onnxruntime is the CPU execution provider in float32: needs kind cpu and dtype float32 "
            f"(got kind {kind}, dtype {dtype})"
        )
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock 'cpu' measures latency with one thread only, got threads={threads!r}")
    if clock == "cpu" and runtime != "torch":
        raise ValueError("clock 'cpu' is for the torch runtime only; time onnxruntime with the wall clock")


def require_runtime(runtime: str) -> None:
    if runtime == "onnxruntime" and onnxruntime_version() is None:
        raise ValueError("runtime 'onnxruntime' needs the onnxruntime package (pip install 'ehrsr[onnx]')")


def as_shapes(input_shapes: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """One shape or several: ``(1, 3, 64, 64)`` or ``[(1, 8, 32, 32), (1, 8, 32, 32)]``."""
    if input_shapes and all(isinstance(v, int) for v in input_shapes):
        return [tuple(input_shapes)]  # type: ignore[arg-type]
    return [tuple(s) for s in input_shapes]  # type: ignore[union-attr]


def example_inputs(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
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
    inputs = tuple(example_inputs(as_shapes(input_shapes)))
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
            if dynamo:
                _scope_node_names(path)
            return path
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {first[:200]}")
            path.unlink(missing_ok=True)
    raise RuntimeError(f"ONNX export of {type(model).__name__} failed: {'; '.join(errors)}")


def _scope_node_names(path: Path) -> None:
    """Name each node of a dynamo export after its module scope, as the TorchScript exporter does
    (``/encoders.0/encoders.0.0/conv1/conv2d``), from the ``pkg.torch.onnx.name_scopes`` metadata
    the dynamo exporter stores: onnxruntime's profiler reports node names only, and
    ``ehrsr.profiling.onnx_graph`` maps them back to modules."""
    import ast

    import onnx

    model = onnx.load(str(path))
    seen: dict[str, int] = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        parts = [str(part) for part in ast.literal_eval(scopes) if part]
        name = "/" + "/".join(parts) if parts else node.name
        seen[name] = seen.get(name, 0) + 1
        node.name = name if seen[name] == 1 else f"{name}_{seen[name] - 1}"  # one fx node, several ONNX nodes
    onnx.save(model, str(path))


def onnx_session(path: Path, threads: int | None, *, profile_prefix: Path | None = None,
                 optimized_path: Path | None = None) -> Any:
    """An onnxruntime CPU session; ``profile_prefix`` switches on onnxruntime's per-node profiler,
    ``optimized_path`` saves the graph it runs (after its fusions and layout changes)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one pass at a time, like PyTorch eager
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def session_feeds(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """The inputs ``session`` takes: the exporter drops an input the graph does not use."""
    return {name: feeds[name] for name in (i.name for i in session.get_inputs())}


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
    dtype_name, torch_dtype = parse_dtype(dtype)
    check_timing_settings(runtime, clock=clock, threads=threads, dtype=dtype_name)
    require_runtime(runtime)
    resolve_budget("cpu", budget_s)
    shapes = as_shapes(input_shapes)
    model = model.to("cpu").eval()
    if runtime == "onnxruntime":
        with tempfile.TemporaryDirectory(prefix="ehrsr-onnx-") as folder:
            path = export_for_timing(model, shapes, Path(folder) / "model.onnx")
            return time_onnx(path, shapes, threads, warmup=warmup, repeats=repeats, budget_s=budget_s)
    inputs = example_inputs(shapes)
    timer = PerfCounterClock() if clock == "wall" else _ProcessTimeClock()
    autocast = torch.autocast("cpu", dtype=torch_dtype) if torch_dtype != torch.float32 else contextlib.nullcontext()

    def run_torch() -> object:
        with autocast:
            return model(*inputs)

    with torch.inference_mode(), cpu_threads(threads) as n_threads:
        samples, warmup_done, repeats_done = run_timed(run_torch, timer, "cpu", warmup, repeats, budget_s)
    return stats_from_samples(samples, warmup_done, repeats_done, dtype_name,
                              f"{device_name('cpu', n_threads)} [torch{', cpu clock' if clock == 'cpu' else ''}]")


def time_onnx(
    path: str | Path,
    input_shapes: Sequence[int] | Sequence[Sequence[int]],
    threads: int | None = None,
    *,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> LatencyStats:
    """``time_model``'s onnxruntime timing of a file ``export_for_timing`` wrote (float32, its
    inputs named ``input0``, ``input1``...): export once, time as often as needed."""
    require_runtime("onnxruntime")
    resolve_budget("cpu", budget_s)
    inputs = example_inputs(as_shapes(input_shapes))
    session = onnx_session(Path(path), threads)
    feeds = session_feeds(session, {f"input{i}": x.numpy() for i, x in enumerate(inputs)})
    samples, warmup_done, repeats_done = run_timed(lambda: session.run(None, feeds), PerfCounterClock(), "cpu",
                                                    warmup, repeats, budget_s)
    n_threads = threads if threads is not None else torch.get_num_threads()
    return stats_from_samples(samples, warmup_done, repeats_done, "float32",
                              f"{device_name('cpu', n_threads)} [onnxruntime]")
