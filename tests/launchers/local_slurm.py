"""A throw-away one-node Slurm cluster on localhost for the launcher tests.

Everything lives in one temporary directory (munge key and socket, slurm.conf,
state, spool, logs), the daemons listen on free non-default ports and run in the
foreground as children of this process, so `stop()` ends exactly the processes
`start()` began and nothing of a system-wide Slurm or munge is touched.
Works with Debian 12's Slurm 22.05 and munge 0.5, run as root.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SLURM_BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun", "munged"]
PARTITION = "debug"


def missing_binaries() -> list[str]:
    return [name for name in SLURM_BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def install_with_apt() -> str | None:
    """Install Slurm + munge from Debian packages; returns why it could not, or None."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install slurmctld/slurmd/slurm-client/munge"
    if shutil.which("apt-get") is None:
        return "apt-get is not available to install slurmctld/slurmd/slurm-client/munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"apt-get install {' '.join(SLURM_PACKAGES)} failed: {done.stderr.strip()[-800:]}"
    return None


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+), where srun and the kernel
    pick their own ports, so nothing grabs it between this check and its use."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found in 20000-32000")


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _node_line(hostname: str) -> str:
    """The node's hardware as slurmd itself detects it, so the node is not drained for a mismatch."""
    detected = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True)
    first = detected.stdout.splitlines()[0].split()
    hardware = [word for word in first if not word.startswith("NodeName=")]
    return f"NodeName={hostname} NodeAddr=127.0.0.1 {' '.join(hardware)} State=UNKNOWN"


@dataclass
class LocalSlurmCluster:
    root: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: list[subprocess.Popen] = field(default_factory=list)
    controller_port: int = 0  # set by write_config
    slurmd_port: int = 0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> Path:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        self.controller_port = free_port()
        self.slurmd_port = free_port()
        lines = [
            "ClusterName=falcontest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s).
            f"AuthInfo=socket={self.root / 'munge.socket'},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={self.controller_port}",
            f"SlurmdPort={self.slurmd_port}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Start jobs (and requeued jobs, once eligible) within a second or two
            # instead of the default 30-60 s scheduling cycles.
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=5",
            "KillWait=5",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
            _node_line(self.hostname),
            f"PartitionName={PARTITION} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            [
                _binary("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.root / 'munge.socket'}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            "munged.out",
        )
        self._wait_for(lambda: (self.root / "munge.socket").exists(), timeout, "munged socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait_for(self._controller_is_up, timeout, "slurmctld")
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname], "slurmd.out")
        self._wait_for(self._node_is_idle, timeout, "slurmd to register the node as idle")

    def stop(self) -> None:
        """End the daemons this object started, newest first, and nothing else."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.processes.clear()

    def logs(self) -> str:
        parts = []
        for name in ["slurmctld.log", "slurmd.log", "munged.log", "slurmctld.out", "slurmd.out", "munged.out"]:
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)

    def _spawn(self, command: list[str], output_name: str) -> None:
        with open(self.root / output_name, "w") as output:  # the daemon keeps its own copy
            self.processes.append(
                subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            )

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=30)

    def _controller_is_up(self) -> bool:
        ping = self._run("scontrol", "ping")
        return ping.returncode == 0 and " is UP" in ping.stdout

    def _node_is_idle(self) -> bool:
        state = self._run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
        return state.startswith("idle")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited with {process.returncode} while waiting for {what}\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
