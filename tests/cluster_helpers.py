"""The worker command the cluster tests run, shared with the checks of deploy/cluster/ scripts.

``worker_argv`` is the one command line of a search worker on a shared storage; the Slurm script
and the Kubernetes manifest must launch exactly this (their variables filled in), which
tests/test_cluster_deploy.py checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")


def worker_argv(*, space: str, storage: str, study: str, budget: str, out_dir: str, extra: list[str]) -> list[str]:
    """``run_search.py`` options of one worker: every worker of a study runs the same line."""
    return ["run_search.py", "--space", space, "--storage", storage, "--study-name", study, "--budget", budget,
            "--out-dir", out_dir, "--no-report", *extra]


def micro_extra(cache_dir: Path) -> list[str]:
    """Test-size options (tiny latency input, one thread, the worker's own data cache)."""
    return ["--profile-size", "32", "--cache-dir", str(cache_dir), "--threads", "1"]


def micro_space_with_steps(folder: Path, max_steps: int) -> str:
    """The micro space with trials of ``max_steps`` training steps (8 in micro.yaml), written into
    ``folder``: long enough to be signalled or cancelled mid-trial."""
    text = Path(MICRO).read_text()
    assert "max_steps: 8\n" in text
    path = folder / f"micro-{max_steps}-steps.yaml"
    path.write_text(text.replace("max_steps: 8\n", f"max_steps: {max_steps}\n"))
    return str(path)


def start_worker(argv: list[str], cwd: Path) -> subprocess.Popen:
    """One worker process, as on its own machine (its own folders, nothing shared but the storage)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    script = str(REPO / argv[0]) if argv[0] == "run_search.py" else argv[0]
    return subprocess.Popen([sys.executable, script, *argv[1:]], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward trials=N: they trained (not waiting, not refused, not a recorded
    repeat of an earlier trial: see ehrsr.search.budget)."""
    return [t for t in study.trials if t.state != TrialState.WAITING and "refused" not in t.user_attrs
            and "repeat_of" not in t.user_attrs]
