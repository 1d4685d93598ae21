"""The selective scan compiled for the CPU: ``scan_kernel.c``, built on first use with the system's C compiler.

Why: on a CPU the PyTorch formulations of the scan (``ssm.selective_scan_parallel`` and its
autograd backward) run hundreds of small element-wise kernels per call, and at the sizes EHR-SR
trains (a few thousand tokens, 8-16 states) their fixed cost per kernel dominates: an SSMB
forward+backward cost 13-40x a NAF block's. The same recurrence as two plain loops (forward, and
the reverse-time adjoint for every gradient in one pass) does the same arithmetic without that
overhead; ``benchmarks/blocks.py`` prints the comparison.

How: the C file ships inside the package. On the first call in a process it is compiled with
``$CC`` (default ``cc``), ``-O3 -pthread``, into ``<cache>/kernels/scan-<hash>.so`` (``<cache>``:
``$EHRSR_CACHE`` or ``~/.cache/ehrsr``; the hash covers the source, the flags and the compiler's
version, so a changed file is rebuilt and a built one is reused by every later process) and
loaded with ``ctypes`` (which releases the GIL during the call). It runs with PyTorch's intra-op
thread count, so the profiler's fixed threads hold for it too; each call starts and joins its own
threads (no pool survives a call, so forked processes are safe). Nothing is needed at install time.

When it cannot be used (no C compiler, a failed build, an unwritable cache, or
``EHRSR_SCAN_KERNEL=torch`` in the environment) the scan falls back to the PyTorch formulation
with the same results; ``reason()`` says why, and so does the log for a missing compiler or a
failed build. Float32 and float64 on the CPU
only; CUDA has ``mamba_ssm`` or the PyTorch path.
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

__all__ = ["available", "backward", "buildable_here", "forward", "reason", "supports"]

log = logging.getLogger(__name__)

ENV_SWITCH = "EHRSR_SCAN_KERNEL"  # "torch": never compile or use the kernel
FLAGS = ("-O3", "-fno-math-errno", "-pthread", "-fPIC", "-shared", "-std=c11")
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


def _build(source: str, cc: str, target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (a temporary file renamed over it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as folder:
        c_file = Path(folder) / "scan_kernel.c"
        c_file.write_text(source)
        built = Path(folder) / target.name
        result = subprocess.run([cc, *FLAGS, str(c_file), "-o", str(built), "-lm"], capture_output=True, text=True,
                                timeout=300, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} failed: {detail[0] if detail else f'exit {result.returncode}'}")
        os.replace(built, target)


def _declare(library: ctypes.CDLL) -> None:
    i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        fwd = getattr(library, f"scan_forward_{suffix}")
        fwd.argtypes = [ptr] * 7 + [i64] * 5 + [c_int]
        fwd.restype = c_int
        bwd = getattr(library, f"scan_backward_{suffix}")
        bwd.argtypes = [ptr] * 13 + [i64] * 5 + [c_int]
        bwd.restype = c_int


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
        source = _source()
        digest = hashlib.sha256("\0".join([source, " ".join(FLAGS), _compiler_version(cc)]).encode()).hexdigest()
        target = default_cache_dir() / "kernels" / f"scan-{digest[:16]}.so"
        try:
            if not target.exists():
                log.info("selective scan: compiling the CPU kernel into %s", target)
                _build(source, cc, target)
            library = ctypes.CDLL(str(target))
            _declare(library)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            _reason = f"the CPU kernel could not be built or loaded ({exc})"
            log.warning("selective scan: %s; using the PyTorch scan", _reason)
            return None
        _library = library
        return library


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


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can run on these tensors: CPU, all float32 or all float64, kernel loaded."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return available()


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _time_major(B: torch.Tensor) -> torch.Tensor:
    """``(b, n, L)`` or ``(b, g, n, L)`` -> contiguous ``(b, g, L, n)``."""
    grouped = B if B.dim() == 4 else B[:, None]
    return grouped.transpose(-1, -2).contiguous()


def _call(name: str, u: torch.Tensor, *pointers_of: torch.Tensor, sizes: tuple[int, ...]) -> None:
    """Run ``scan_<name>_<dtype>`` of the library on the tensors' data and the sizes."""
    library = _load()
    assert library is not None, "call supports() first"
    status = getattr(library, f"scan_{name}_{_SUFFIX[u.dtype]}")(
        *map(_pointer, pointers_of), *sizes, torch.get_num_threads()
    )
    if status:
        raise MemoryError("selective scan kernel: out of memory for its per-thread buffers")


def _prepared(u, delta, A, B, C, D):
    """Contiguous inputs in the kernel's layouts, and the sizes ``(b, d, L, n, groups)``."""
    bsz, d, length = u.shape
    sizes = (bsz, d, length, A.shape[1], B.shape[1] if B.dim() == 4 else 1)
    u, delta, A, D = (t.contiguous() for t in (u, delta, A, D))
    return (u, delta, A, _time_major(B), _time_major(C), D), sizes


def forward(u, delta, A, B, C, D) -> torch.Tensor:
    """The scan's output ``y`` (shapes as ``ssm.selective_scan_sequential``); call ``supports`` first."""
    inputs, sizes = _prepared(u, delta, A, B, C, D)
    y = torch.empty_like(inputs[0])
    if y.numel():
        _call("forward", y, *inputs, y, sizes=sizes)
    return y


def backward(u, delta, A, B, C, D, grad_y):
    """Gradients of the scan for ``(u, delta, A, B, C, D)`` given ``grad_y`` (the adjoint in one pass)."""
    inputs, sizes = _prepared(u, delta, A, B, C, D)
    bsz, d, _, n, _ = sizes
    u_c, _, _, b_t, c_t, _ = inputs
    grad_u, grad_delta = torch.empty_like(u_c), torch.empty_like(u_c)
    grad_a, grad_d = u_c.new_zeros(bsz, d, n), u_c.new_zeros(bsz, d)
    grad_b, grad_c = torch.zeros_like(b_t), torch.zeros_like(c_t)
    if u_c.numel():
        _call("backward", u_c, *inputs, grad_y.contiguous(), grad_u, grad_delta, grad_a, grad_b, grad_c, grad_d,
              sizes=sizes)

    def layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return grad.transpose(-1, -2).reshape(like.shape)

    return grad_u, grad_delta, grad_a.sum(0), layout(grad_b, B), layout(grad_c, C), grad_d.sum(0)
