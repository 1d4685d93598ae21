"""A real one-node Slurm cluster for the tests, on loopback, started and stopped by the suite.

The daemons are Debian's (``apt-get install slurm-wlm munge``): ``munged`` with a fresh key,
``slurmctld`` and ``slurmd``, each in the foreground under this process, with every file they
write (configuration, key, sockets, state, spool, logs) in one temporary folder. Nothing under
``/etc`` is read or changed: clients find the configuration through ``SLURM_CONF``, the daemons
through ``-f``, and munge through the socket named in ``AuthInfo``. ``slurmd`` must run as root.

The node offers ``cpus`` CPUs and ``gpus`` GPUs. The GPUs are declared, not real (``gres.conf``
binds them to ``/dev/null`` and ``/dev/zero``): deploy/cluster/slurm_array.sh asks for one GPU
per task, and the scheduling path it takes is the one a GPU cluster takes. A task that looks for
CUDA finds none and runs on the CPU.

In CI (``CI=true``) a cluster that cannot start fails the tests; elsewhere a missing package or a
non-root user skips them with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SlurmTestCluster", "start_slurm", "unavailable_reason"]

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue", "sinfo")


def _program(name: str) -> str | None:
    """The program's path; the daemons live in /usr/sbin, which a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [name for name in PROGRAMS if _program(name) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install slurm-wlm munge, as root)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


@dataclass
class SlurmTestCluster:
    """A running cluster: ``env`` for clients (``sbatch`` ...); ``stop()`` ends it and removes its files."""

    root: Path
    node: str
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> str:
        """A client command (``sbatch``, ``scontrol`` ...) against this cluster; its stdout."""
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                                env={**os.environ, **(env or {}), **self.env})
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job_fields(self, job: str) -> dict[str, str]:
        """``scontrol show job`` of one job as a dict (``JobState``, ``ExitCode`` ...)."""
        text = self.run("scontrol", "--oneliner", "show", "job", job)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_until_gone(self, job: str, timeout: float) -> None:
        """Wait until no task of ``job`` (an array's id) is pending or running."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "--noheader", "--array", "--jobs", job).strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still queued after {timeout} s:\n"
                                     + self.run("squeue", "--array", "--jobs", job) + self.logs())
            time.sleep(0.5)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # steps run outside the daemons: end them first
            self.run("scancel", "--full", "--quiet", "--partition", "test")
            deadline = time.monotonic() + 60
            while self.run("squeue", "--noheader").strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(root: Path, node: str, cpus: int, gpus: int) -> str:
    return f"""\
ClusterName=ehrsrtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups, accounting or MPI: nothing outside the temporary folder is needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node is what this file says, whatever the machine has
SlurmdParameters=config_overrides
ReturnToService=2
# scancel: SIGTERM, then SIGKILL after KillWait seconds (Slurm's default, as on a real cluster)
KillWait=30
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm(cpus: int = 4, gpus: int = 2, timeout_s: float = 60.0) -> SlurmTestCluster:
    """munged, slurmctld and slurmd on 127.0.0.1 with a fresh configuration; returns once the
    node is idle."""
    if gpus > 2:
        raise ValueError("the declared GPUs are /dev/null and /dev/zero: at most 2")
    root = Path(tempfile.mkdtemp(prefix="ehrsr-slurm-"))
    node = socket.gethostname().split(".")[0]  # slurmctld checks it runs on SlurmctldHost
    cluster = SlurmTestCluster(root, node)
    try:
        for folder in ("munge", "state", "spool", "log"):
            (root / folder).mkdir()
        root.chmod(0o755)
        (root / "munge").chmod(0o755)  # munged wants its socket's folder reachable by all
        subprocess.run([_program("mungekey") or "mungekey", "--create", f"--keyfile={root / 'munge/munge.key'}"], check=True,
                       capture_output=True, timeout=30)
        (root / "slurm.conf").write_text(_config(root, node, cpus, gpus))
        (root / "gres.conf").write_text("".join(f"NodeName={node} Name=gpu File={device}\n"
                                                for device in ("/dev/null", "/dev/zero")[:gpus]))
        munge = root / "munge"
        cluster.daemons.append(_daemon(root, "munged", [
            _program("munged") or "munged", "--foreground", "--force", f"--key-file={munge / 'munge.key'}",
            f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"]))
        _wait(lambda: (munge / "munge.socket").exists(), timeout_s, "munged did not create its socket", cluster)
        cluster.daemons.append(_daemon(root, "slurmctld", [_program("slurmctld") or "slurmctld", "-D", "-f", str(cluster.conf)]))
        cluster.daemons.append(_daemon(root, "slurmd", [_program("slurmd") or "slurmd", "-D", "-f", str(cluster.conf)]))

        def idle() -> bool:
            try:
                return cluster.run("sinfo", "--noheader", "--format=%T", timeout=10).strip() == "idle"
            except (RuntimeError, subprocess.TimeoutExpired):
                return False

        _wait(idle, timeout_s, "the node did not become idle", cluster)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _daemon(root: Path, name: str, command: list[str]) -> subprocess.Popen:
    output = open(root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 (the daemon holds it)
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=root)


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, cluster: SlurmTestCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for daemon in cluster.daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{daemon.args[0]} exited with {daemon.returncode}:{cluster.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout_s:.0f} s:{cluster.logs()}")
        time.sleep(0.2)
