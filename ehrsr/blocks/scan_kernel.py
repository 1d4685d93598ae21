"""The SSMB's cross-scan compiled for the CPU: ``scan_kernel.c``, built on first use with the system's C compiler.

Why: on a CPU the PyTorch formulation of the SSMB's scan (``ssm.cross_scan_reference``: scan-order
gathers, the dt projection and softplus, the chunked scan and its autograd backward, the scatter
back) runs hundreds of small kernels per call and copies every input into scan order; at the
sizes EHR-SR trains (a few hundred to a few thousand tokens, 4-16 states) their fixed costs
dominate. The kernel does all of it in one pass per direction and block of channels: it reads the
tokens, the projections and the parameters where they lie (the scan order is computed from the
step, not gathered), and its backward is the reverse-time adjoint giving every input's gradient
in one pass. ``benchmarks/blocks.py`` prints the comparison.

How: the C file ships inside the package. On the first call in a process it is compiled with
``$CC`` (default ``cc``), ``-O3 -march=native -ffp-contract=fast -pthread`` (without
``-march=native`` where the compiler refuses it), into ``<cache>/kernels/scan-<hash>.so``
(``<cache>``: ``$EHRSR_CACHE`` or ``~/.cache/ehrsr``; the hash covers the source, the flags, the
compiler's version and the instruction sets ``-march=native`` enables, so a changed file or another
CPU gets its own build and a built one is reused by every later process) and loaded with
``ctypes`` (which releases the GIL during the call). It runs with PyTorch's intra-op thread count,
so the profiler's fixed threads hold for it too; each call starts and joins its own threads (no
pool survives a call, so forked processes are safe). Nothing is needed at install time.

When it cannot be used (no C compiler, a failed build, an unwritable cache, or
``EHRSR_SCAN_KERNEL=torch`` in the environment) the SSMB falls back to the PyTorch formulation
with the same results; ``reason()`` says why, and so does the log for a missing compiler or a
failed build. Float32 and float64 on the CPU only; CUDA has ``mamba_ssm`` or the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

from ehrsr.resources import default_cache_dir

__all__ = ["available", "backward", "buildable_here", "forward", "reason", "segment_steps", "supports"]

log = logging.getLogger(__name__)

ENV_SWITCH = "EHRSR_SCAN_KERNEL"  # "torch": never compile or use the kernel
# -ffp-contract=fast: fused multiply-adds (ISO C mode, -std=c11, turns contraction off in GCC)
FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=fast", "-pthread", "-fPIC", "-shared", "-std=c11")
NATIVE = ("-march=native",)  # the SIMD of the CPU that builds it (the kernel is built where it runs)
MAX_STATE = 64  # d_state and dt_rank the kernel's fixed-size lane buffers hold (scan_kernel.c)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernel is not used (None: not tried yet, or loaded)
_tried = False


def _source() -> str:
    return resources.files("ehrsr.blocks").joinpath("scan_kernel.c").read_text()


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def _native_target(cc: str) -> str | None:
    """The macros ``-march=native`` defines (they name the instruction sets the build will use), or
    None when the compiler does not take the flag."""
    try:
        out = subprocess.run([cc, *NATIVE, "-E", "-dM", "-x", "c", os.devnull], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 and out.stdout else None


def _build(source: str, cc: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (a temporary file renamed over it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as folder:
        c_file = Path(folder) / "scan_kernel.c"
        c_file.write_text(source)
        built = Path(folder) / target.name
        result = subprocess.run([cc, *flags, str(c_file), "-o", str(built), "-lm"], capture_output=True, text=True,
                                timeout=300, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} failed: {detail[0] if detail else f'exit {result.returncode}'}")
        os.replace(built, target)


def _declare(library: ctypes.CDLL) -> None:
    i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        fwd = getattr(library, f"cross_scan_forward_{suffix}")
        fwd.argtypes = [ptr] * 7 + [i64] * 7 + [c_int]
        fwd.restype = c_int
        bwd = getattr(library, f"cross_scan_backward_{suffix}")
        bwd.argtypes = [ptr] * 13 + [i64] * 7 + [c_int]
        bwd.restype = c_int
        segment = getattr(library, f"cross_scan_segment_{suffix}")
        segment.argtypes = [i64]
        segment.restype = i64


def _load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None (and ``_reason`` set) when unavailable."""
    global _library, _reason, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get(ENV_SWITCH, "").strip().lower() == "torch":
            _reason = f"{ENV_SWITCH}=torch"
            return None
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            _reason = f"no C compiler ({cc!r} not found; set CC or install gcc)"
            log.info("selective scan: %s; using the PyTorch scan", _reason)
            return None
        source, version = _source(), _compiler_version(cc)
        native = _native_target(cc)
        # with -march=native first; a compiler that takes the flag but fails with it gets a portable build
        attempts = ([(FLAGS + NATIVE, native)] if native is not None else []) + [(FLAGS, "")]
        failure = None
        for flags, target_macros in attempts:
            key = "\0".join([source, " ".join(flags), version, target_macros])
            target = default_cache_dir() / "kernels" / f"scan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            try:
                if not target.exists():
                    log.info("selective scan: compiling the CPU kernel into %s", target)
                    _build(source, cc, flags, target)
                library = ctypes.CDLL(str(target))
                _declare(library)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                failure = failure or exc
                continue
            _library = library
            return library
        _reason = f"the CPU kernel could not be built or loaded ({failure})"
        log.warning("selective scan: %s; using the PyTorch scan", _reason)
        return None


def available() -> bool:
    """Whether the compiled kernel is loaded (compiling it on the first call)."""
    return _load() is not None


def buildable_here() -> bool:
    """Whether this environment is expected to build the kernel: not switched off, a C compiler
    found. When it is and ``available()`` is still False, the build itself is broken."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "torch":
        return False
    return shutil.which(os.environ.get("CC") or "cc") is not None


def reason() -> str | None:
    """Why the kernel is not used (None when it is, or before the first ``available()``)."""
    return _reason


def supports(tokens: torch.Tensor, proj: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor,
             A: torch.Tensor, D: torch.Tensor) -> bool:
    """Whether the kernel can run the cross-scan of these tensors (shapes as ``ssm.cross_scan``): CPU,
    all float32 or all float64, at most 4 directions and ``MAX_STATE`` states and dt rank, kernel loaded."""
    tensors = (tokens, proj, dt_weight, dt_bias, A, D)
    dtype = tokens.dtype
    if dtype not in _SUFFIX or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    directions, _, d_state = A.shape
    if directions > 4 or d_state > MAX_STATE or dt_weight.shape[-1] > MAX_STATE:
        return False
    return available()


def segment_steps(dtype: torch.dtype, d_state: int) -> int:
    """Steps the backward replays at a time (from checkpoints of the state) for ``d_state`` states;
    a sequence no longer than this is replayed in one piece. Needs the kernel loaded."""
    library = _load()
    assert library is not None, "the kernel is not loaded"
    return int(getattr(library, f"cross_scan_segment_{_SUFFIX[dtype]}")(d_state))


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype: torch.dtype, tensors: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> None:
    """Run ``cross_scan_<name>_<dtype>`` of the library on the tensors' data and the sizes."""
    library = _load()
    assert library is not None, "call supports() first"
    status = getattr(library, f"cross_scan_{name}_{_SUFFIX[dtype]}")(
        *map(_pointer, tensors), *sizes, torch.get_num_threads()
    )
    if status:
        raise MemoryError("selective scan kernel: out of memory for its per-thread buffers")


def _prepared(tokens, proj, dt_weight, dt_bias, A, D):
    """Contiguous inputs and the sizes ``(batch, height, width, channels, directions, dt_rank, d_state)``."""
    bsz, height, width, channels = tokens.shape
    directions, _, d_state = A.shape
    sizes = (bsz, height, width, channels, directions, dt_weight.shape[-1], d_state)
    return tuple(t.contiguous() for t in (tokens, proj, dt_weight, dt_bias, A, D)), sizes


def forward(tokens, proj, dt_weight, dt_bias, A, D) -> torch.Tensor:
    """The cross-scan's output ``(B, H, W, E)`` (shapes as ``ssm.cross_scan``); call ``supports`` first."""
    inputs, sizes = _prepared(tokens, proj, dt_weight, dt_bias, A, D)
    directions = sizes[4]
    y_parts = inputs[0].new_empty(directions, *inputs[0].shape)  # one slab per direction, summed below
    if y_parts.numel():
        _call("forward", tokens.dtype, (*inputs, y_parts), sizes)
    return y_parts[0] if directions == 1 else y_parts.sum(0)


def backward(tokens, proj, dt_weight, dt_bias, A, D, grad_y):
    """Gradients of the cross-scan for ``(tokens, proj, dt_weight, dt_bias, A, D)`` given ``grad_y``
    (the adjoint in one pass)."""
    inputs, sizes = _prepared(tokens, proj, dt_weight, dt_bias, A, D)
    bsz, height, width, channels, directions, rank, d_state = sizes
    blocks = -(-channels // (64 // tokens.element_size()))  # the kernel's blocks of channels (LANES)
    x = inputs[0]
    grad_x = x.new_empty(directions, *x.shape)
    grad_proj = x.new_empty(bsz, blocks, height, width, inputs[1].shape[-1])
    grad_w, grad_a = x.new_empty(bsz, directions, channels, rank), x.new_empty(bsz, directions, channels, d_state)
    grad_b, grad_d = x.new_empty(bsz, directions, channels), x.new_empty(bsz, directions, channels)
    if x.numel():
        _call("backward", tokens.dtype, (*inputs, grad_y.contiguous(), grad_x, grad_proj, grad_w, grad_b, grad_a, grad_d),
              sizes)
    else:
        for grad in (grad_proj, grad_w, grad_a, grad_b, grad_d):
            grad.zero_()
    return (
        grad_x[0] if directions == 1 else grad_x.sum(0),
        grad_proj[:, 0] if blocks == 1 else grad_proj.sum(1),
        grad_w.sum(0), grad_b.sum(0), grad_a.sum(0), grad_d.sum(0),
    )
