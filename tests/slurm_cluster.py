"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd started on this machine without systemd,
with every state, spool, pid and log file under one folder, and stopped again by the pids in their pid files.

Needs root and Debian's packages (`make system-deps` installs slurmctld slurmd slurm-client munge). The cluster has
one partition, `debug`, made of this machine (its CPUs and memory as `slurmd -C` reports them), no GPUs, no
accounting (so no `sacct`: every wait on a job here has a timeout). Its munged is its own, on its own socket
(slurm.conf's AuthInfo): a cluster of another test session on the same machine, started or stopped meanwhile,
cannot take the authentication away from this one's daemons, which would silently stop signals and time limits.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

SBIN = ("/usr/sbin", "/usr/bin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "munge", "unmunge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def find_program(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def why_unavailable() -> Optional[str]:
    """The reason a cluster cannot be brought up here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a SLURM cluster needs root (its daemons run as root here)"
    missing = [name for name in DAEMONS + CLIENTS if find_program(name) is None]
    if missing:
        return f"SLURM/munge programs missing ({', '.join(missing)}): make system-deps installs them on Debian"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """`start()` brings the cluster up (about a second), `stop()` ends every daemon it started, by pid."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.started: List[Path] = []  # pid files of the daemons this cluster started, stopped in reverse order
        self.env: Dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge_dir: Optional[Path] = None  # outside the test's folder: the munge user must reach it

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_munge(timeout_s)
        self._write_conf()
        self._daemon([find_program("slurmctld"), "-c", "-f", str(self.conf)], self.folder / "slurmctld.pid")
        self._daemon([find_program("slurmd"), "-f", str(self.conf)], self.folder / "slurmd.pid")
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle", timeout_s,
                   "the node to be idle")
        return self

    def stop(self, timeout_s: float = 30) -> None:
        for pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def run(self, command: List[str], check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run([find_program(command[0]), *command[1:]], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout_s)

    def jobs(self) -> List[Dict[str, str]]:
        """Every job the controller knows, as scontrol shows it (JobId, ArrayJobId, JobState, Reason, ...)."""
        shown = self.run(["scontrol", "show", "job", "-o"], check=False).stdout
        jobs = []
        for line in shown.splitlines():
            if "JobId=" not in line:
                continue
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            jobs.append(fields)
        return jobs

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_munge(self, timeout_s: float) -> None:
        if not MUNGE_KEY.exists():
            subprocess.run([find_program("mungekey"), "-c", "-f", "-k", str(MUNGE_KEY)], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        self.munge_dir = Path(tempfile.mkdtemp(prefix="reportgen-test-munge-", dir="/run"))
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)  # every client (slurmstepd, srun, sbatch) reaches the socket
        pid_file = self.munge_dir / "munged.pid"
        options = [f"--socket={self.munge_socket}", f"--pid-file={pid_file}",
                   f"--log-file={self.munge_dir / 'munged.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}"]
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", " ".join([find_program("munged"), *options])],
                       check=True, timeout=30)
        self.started.append(pid_file)
        self._wait(self._munge_works, timeout_s, "munge to answer")

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _munge_works(self) -> bool:
        socket_option = f"--socket={self.munge_socket}"
        try:
            encoded = subprocess.run([find_program("munge"), "-n", socket_option], capture_output=True, check=True,
                                     timeout=10)
            decoded = subprocess.run([find_program("unmunge"), socket_option], input=encoded.stdout,
                                     capture_output=True, timeout=10)
        except (subprocess.SubprocessError, OSError):
            return False
        return b"Success" in decoded.stdout

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        node = subprocess.run([find_program("slurmd"), "-C"], capture_output=True, text=True, check=True)
        node_line = next(line for line in node.stdout.splitlines() if line.startswith("NodeName="))
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=reportgen-test",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SchedulerType=sched/backfill",
            "KillWait=10",
            "MinJobAge=600",
            f"StateSaveLocation={self.folder / 'state'}",
            f"SlurmdSpoolDir={self.folder / 'spool'}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
            f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            node_line.replace(f"NodeName={node_line.split()[0].split('=')[1]}", f"NodeName={host}") + " State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _daemon(self, command: List[str], pid_file: Path) -> None:
        subprocess.run(command, env=self.env, check=True, timeout=60)  # daemonizes, writes its pid file
        self.started.append(pid_file)
        self._wait(pid_file.exists, 30, f"{pid_file.name}")

    @staticmethod
    def _wait(ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
