"""deploy/cluster/: the Slurm job-array script and the Kubernetes Indexed Job launch exactly the
worker command that tests/test_search_cluster.py runs against a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import MICRO, REPO, micro_extra, worker_argv

SLURM = REPO / "deploy" / "cluster" / "slurm_array.sh"
K8S = REPO / "deploy" / "cluster" / "k8s_indexed_job.yaml"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def test_the_slurm_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        if IN_CI:
            pytest.fail("shellcheck is missing in CI (.ci/run installs it with apt-get)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(SLURM)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _run_slurm_script(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the batch script with a stand-in ``srun`` that records the command it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {record}\n")
    (bin_dir / "srun").chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "2", "SLURM_NTASKS": "4"}
    result = subprocess.run(["bash", str(SLURM)], capture_output=True, text=True, env={**base, **env}, cwd=tmp_path)
    args = record.read_text().split("\0")[:-1] if record.exists() else []
    return result, args


def test_the_slurm_script_launches_the_tested_worker_command(tmp_path: Path) -> None:
    storage = "postgresql://postgres@127.0.0.1:5432/ehrsr"
    extra = micro_extra(tmp_path / "cache")
    result, args = _run_slurm_script(tmp_path, {
        "EHRSR_STORAGE": storage, "EHRSR_SPACE": MICRO, "EHRSR_STUDY": "pg3", "EHRSR_BUDGET": "trials=7",
        "EHRSR_OUT": "reports", "EHRSR_WORKER_ARGS": " ".join(extra), "PYTHON": "python3",
    })
    assert result.returncode == 0, result.stderr
    assert "array task 2" in result.stdout and "4 workers" in result.stdout
    # one srun task per GPU, and a worker's end does not kill the others
    assert args[:2] == ["--kill-on-bad-exit=0", "--gpus-per-task=1"] and args[2] == "python3"
    assert args[3:] == worker_argv(space=MICRO, storage=storage, study="pg3", budget="trials=7",
                                   out_dir="reports", extra=extra)


def test_the_slurm_script_defaults_and_its_one_required_variable(tmp_path: Path) -> None:
    result, args = _run_slurm_script(tmp_path, {})
    assert result.returncode != 0 and not args
    assert "EHRSR_STORAGE" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "again").mkdir()
    result, args = _run_slurm_script(tmp_path / "again", {"EHRSR_STORAGE": "postgresql://u@h/db"})
    assert result.returncode == 0, result.stderr
    assert args[3:] == worker_argv(space="full", storage="postgresql://u@h/db", study="ehrsr-full-sr-x4",
                                   budget="gpu-hours=48", out_dir="reports", extra=[])
    header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --gpus-per-task=1" in header and any(line.startswith("#SBATCH --array=") for line in header)


def test_the_kubernetes_manifest_is_an_indexed_job_running_the_worker_command() -> None:
    manifest = yaml.safe_load(K8S.read_text())
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] >= 1 and spec["completions"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    command = container["command"]
    assert command[0] == "python"
    # Kubernetes fills $(NAME) from the container's env: every one used is defined there
    assert command[1:] == worker_argv(space="$(EHRSR_SPACE)", storage="$(EHRSR_STORAGE)", study="$(EHRSR_STUDY)",
                                      budget="$(EHRSR_BUDGET)", out_dir="$(EHRSR_OUT)", extra=[])
    env = {item["name"]: item for item in container["env"]}
    assert set(env) == {"EHRSR_STORAGE", "EHRSR_SPACE", "EHRSR_STUDY", "EHRSR_BUDGET", "EHRSR_OUT"}
    assert "secretKeyRef" in env["EHRSR_STORAGE"]["valueFrom"]  # the password lives in a Secret
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["EHRSR_OUT"]["value"] in mounts  # every pod writes weights to the shared volume


def test_the_kubernetes_manifest_validates_against_the_kubernetes_schema() -> None:
    # kubernetes-validate ships the API's JSON schemas (1.25 to 1.37 in 1.37.0) and runs offline
    try:
        import kubernetes_validate
    except ImportError:
        if IN_CI:
            pytest.fail("kubernetes-validate is missing in CI (the test extra installs it)")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    manifest = yaml.safe_load(K8S.read_text())
    # strict: an unknown field is an error too; backoffLimitPerIndex is on by default from 1.29
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(manifest, version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError, match="backoffLimitPerIndex"):
        kubernetes_validate.validate(manifest, "1.27", strict=True)  # the field came in 1.28
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    container["resource"] = container.pop("resources")  # a typo the YAML-level test above would not see
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
