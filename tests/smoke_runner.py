"""Run benchmark scripts with ``--smoke``, one after another in this process, so torch and ehrsr are
imported once: each script's module is imported and its ``main(["--smoke"])`` called, which is what
``python benchmarks/NAME.py --smoke`` runs. Writes a JSON list to OUT, one object per script (exit
status, seconds, CPU seconds, what it printed, and the traceback of an exception).

    python -m tests.smoke_runner OUT.json CLAIMS_DIR benchmarks/blocks.py benchmarks/revisits.py ...

Several runners given the same scripts and CLAIMS_DIR share the work: a runner takes the next
script nobody has claimed (by creating ``CLAIMS_DIR/<script>`` exclusively), so the list's order is
the order of work and no script runs twice.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_script(path: Path, package: str = "benchmarks") -> dict[str, object]:
    """Import ``<package>.<stem>`` and call its ``main(["--smoke"])``; what happened, as a dict.
    torch's thread count is restored afterwards, so one script's setting does not leak into the next."""
    import torch

    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    status, error = 0, None
    start, start_cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            module = importlib.import_module(f"{package}.{path.stem}")
            code = module.main(["--smoke"])
            status = code if isinstance(code, int) else 0
        except SystemExit as exc:  # argparse errors, and scripts that stop with a message
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            error = None if exc.code in (None, 0) else f"SystemExit: {exc.code}"
        except BaseException:  # a broken script is a result here, not the end of the run
            status, error = 1, traceback.format_exc()
        finally:
            torch.set_num_threads(threads)
    return {
        "script": path.name,
        "status": status,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - start_cpu,
        "stdout": stdout.getvalue(),
        "stderr_tail": stderr.getvalue()[-3000:],
        "error": error,
    }


def claim(folder: Path, script: Path) -> bool:
    """Whether this runner is the first to take ``script``."""
    try:
        os.close(os.open(folder / script.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(argv: list[str]) -> int:
    out, claims, scripts = Path(argv[0]), Path(argv[1]), [Path(a) for a in argv[2:]]
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    claims.mkdir(parents=True, exist_ok=True)
    results = []
    out.write_text("[]")
    for script in scripts:
        if not claim(claims, script):
            continue
        results.append(run_script(script))
        out.write_text(json.dumps(results))  # what ran so far survives a crash of the process
        print(f"{script.name}: status {results[-1]['status']}, {results[-1]['seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
