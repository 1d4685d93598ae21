"""deploy/cluster/slurm_array.sh under a real Slurm (tests/slurm_cluster.py): submitted with
``sbatch`` as users submit it, an array of two tasks against the test PostgreSQL server, one of
them cancelled with ``scancel`` in the middle of a trial (docs/scaling_out.md, "With a scheduler")."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.search.budget import parse_budget, trial_charge
from ehrsr.search.storage import open_storage
from tests.cluster_helpers import REPO, counted_trials, micro_extra, micro_space_with_steps
from tests.slurm_cluster import SlurmTestCluster, start_slurm, unavailable_reason

SCRIPT = REPO / "deploy" / "cluster" / "slurm_array.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TRIAL_LINE = re.compile(r"^#(\d+)\s", re.MULTILINE)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmTestCluster]:
    reason = unavailable_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"Slurm cannot start in CI: {reason} (.ci/run installs it as root)")
        pytest.skip(f"no Slurm cluster for this test: {reason}")
    cluster = start_slurm(cpus=4, gpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def array_task_of(pid: int) -> tuple[str, str] | None:
    """(array job id, task id) from a worker process's environment, as Slurm set it."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    if "SLURM_ARRAY_TASK_ID" not in values:
        return None
    return values["SLURM_ARRAY_JOB_ID"], values["SLURM_ARRAY_TASK_ID"]


@pytest.mark.slow
def test_the_array_ends_its_study_at_the_budget_and_survives_a_scancel(
        tmp_path: Path, pg_url: str, slurm: SlurmTestCluster) -> None:
    n = 4
    env = {
        "EHRSR_STORAGE": pg_url,
        # trials of 120 steps (a few seconds each): long enough to be cancelled in the middle of one
        "EHRSR_SPACE": micro_space_with_steps(tmp_path, 120),
        "EHRSR_STUDY": "slurm",
        "EHRSR_BUDGET": f"trials={n}",
        "EHRSR_OUT": str(tmp_path / "reports"),
        "EHRSR_WORKER_ARGS": " ".join([*micro_extra(tmp_path / "cache"), "--no-early-stopping"]),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    # as users submit it: from the repository root, the node's shape given on the command line
    # (one task per node here, each with one CPU and one of the node's two declared GPUs)
    job = slurm.run("sbatch", "--parsable", "--array=0-1", "--ntasks-per-node=1", "--cpus-per-task=1",
                    f"--output={tmp_path}/slurm-%A_%a.out", "--export=ALL", str(SCRIPT),
                    env=env, cwd=REPO).strip().split(";")[0]
    storage = open_storage(pg_url)
    cancelled: tuple[str, int] | None = None  # (array task, its trial)
    deadline = time.monotonic() + 240
    while cancelled is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="slurm", storage=storage)
        except KeyError:
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")  # written as the trial starts training
            task = array_task_of(worker["pid"]) if worker else None
            if task is not None and task[0] == job:
                slurm.run("scancel", f"{job}_{task[1]}")
                cancelled = (task[1], trial.number)
                break
    assert cancelled is not None, "no array task was seen training a trial" + slurm.logs()
    slurm.wait_until_gone(job, timeout=240)
    task, trial_number = cancelled
    other = "1" if task == "0" else "0"
    outputs = {t: (tmp_path / f"slurm-{job}_{t}.out").read_text() for t in ("0", "1")}
    assert slurm.job_fields(f"{job}_{task}")["JobState"] == "CANCELLED"
    finished = slurm.job_fields(f"{job}_{other}")
    assert (finished["JobState"], finished["ExitCode"]) == ("COMPLETED", "0:0"), outputs[other][-3000:]

    study = optuna.load_study(study_name="slurm", storage=open_storage(pg_url))
    assert len(counted_trials(study)) == n  # exactly the budget, the cancelled trial included
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    # the cancelled task's worker caught scancel's SIGTERM: it failed its trial and said so
    stopped = study.trials[trial_number]
    assert stopped.state == TrialState.FAIL
    assert (stopped.user_attrs["status"], stopped.user_attrs["reason"]) == ("interrupted", "interrupted (SIGTERM)")
    assert "Search slurm: interrupted (SIGTERM)" in outputs[task], outputs[task][-3000:]
    assert "Exited with exit code 143" in outputs[task]  # srun's report on the worker
    assert f"trials={n} reached" in outputs[other], outputs[other][-3000:]
    # every trial was run by one task only, and every finished one was printed by the task that ran it
    printed = [int(m) for out in outputs.values() for m in TRIAL_LINE.findall(out)]
    assert len(printed) == len(set(printed))
    assert set(printed) == {t.number for t in counted_trials(study) if t.number != trial_number}
    # the budget agrees: n trials spent, none running, each charged (the cancelled one start to end)
    spent = parse_budget(f"trials={n}").spent(study)
    assert (spent.trials, spent.running) == (n, 0)
    assert all(trial_charge(t).seconds > 0 for t in counted_trials(study))
