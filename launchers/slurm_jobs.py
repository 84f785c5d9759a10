"""Talking to a Slurm cluster through a NeMo-Run tunnel: pre-submission checks,
submission, and waiting for a job (squeue / scontrol only: `sacct` needs accounting,
which many clusters, and the test cluster, do not run)."""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from falcon_h1.errors import ConfigValueError
from launchers.nemo import nemo_run
from launchers.result import ClusterError

# torchrun's own failure report is about 40 lines; keep the worker's last words too.
LOG_TAIL_LINES = 80
BATCH_LOG_TAIL_LINES = 15
# States after which the job will not run again (PREEMPTED only when not requeued).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
    "SPECIAL_EXIT",
    "REVOKED",
}


def _local_tunnel():
    run = nemo_run()

    return run.LocalTunnel(job_dir="")


def _run(tunnel, command: str):
    """Run a command on the login node; never raises for a non-zero exit. Standard input
    is not forwarded (invoke would otherwise read ours, which may be closed or captured)."""
    return tunnel.run(command, hide=True, warn=True, in_stream=False)


def _where(tunnel) -> str:
    host = getattr(tunnel, "host", "localhost")
    if host != "localhost":
        return f"from {host}"
    return f"from this machine (SLURM_CONF={os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf')})"


def _one_paragraph(text: str) -> str:
    # scontrol frames "DOWN" with a banner of asterisks; keep the words.
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("*")]
    return " ".join(lines) or "(nothing)"


def check_cluster(tunnel, partition: Optional[str]) -> None:
    """Fail, before anything is submitted, when the controller is unreachable or the
    partition does not exist."""
    ping = _run(tunnel, "scontrol ping")
    text = _one_paragraph(ping.stdout + ping.stderr)
    controllers = re.findall(r"at (\S+) is (UP|DOWN)", text)
    if ping.return_code == 127 or "command not found" in text:
        raise ClusterError(
            f"`scontrol` was not found {_where(tunnel)}: Slurm's client commands must be installed where jobs are "
            "submitted (a login node); check executor.slurm.tunnel / executor.slurm.ssh_host."
        )
    if ping.return_code != 0 or not any(state == "UP" for _, state in controllers):
        names = ", ".join(host for host, _ in controllers) or "(not named in the output)"
        raise ClusterError(
            f"The Slurm controller {names} is not reachable {_where(tunnel)}: `scontrol ping` exited with "
            f"{ping.return_code} and printed: {text}. Nothing was submitted; check that slurmctld "
            "is running and that SlurmctldHost/SlurmctldPort in slurm.conf point at it."
        )
    listing = _run(tunnel, "sinfo -h -o %P")
    if listing.return_code != 0:
        raise ClusterError(
            f"`sinfo -h -o %P` failed {_where(tunnel)} (exit {listing.return_code}): "
            f"{_one_paragraph(listing.stdout + listing.stderr)}. Nothing was submitted."
        )
    partitions = [name.rstrip("*") for name in listing.stdout.split()]
    if partition is not None and partition not in partitions:
        raise ConfigValueError(
            "executor.slurm.partition", partition, f"one of {', '.join(partitions) or 'none'}, or null",
            message=f"executor.slurm.partition = {partition!r} is not a partition of this cluster: `sinfo -h -o %P` "
            f"lists {', '.join(partitions) or 'none'}. Set executor.slurm.partition to one of them, or to null "
            "for the cluster's default partition. Nothing was submitted.",
        )


def _write(tunnel, path: str, text: str) -> None:
    from nemo_run.core.tunnel.client import LocalTunnel

    if isinstance(tunnel, LocalTunnel):
        with open(path, "w") as file:
            file.write(text)
        return
    with tempfile.NamedTemporaryFile("w", suffix=os.path.basename(path), delete=False) as file:
        file.write(text)
    try:
        tunnel.put(file.name, path)
    finally:
        os.unlink(file.name)


def submit(plan) -> str:
    """Write the recipe and sbatch script into the job folder and sbatch it; returns the job id."""
    folder = shlex.quote(plan.folder)
    made = _run(plan.tunnel, f"mkdir -p {folder}/configs {folder}/code {shlex.quote(plan.run_dir)}")
    if made.return_code != 0:
        raise ClusterError(f"Could not create the job folder {plan.folder}: {(made.stdout + made.stderr).strip()}")
    _write(plan.tunnel, plan.recipe_path, plan.recipe_yaml)
    _write(plan.tunnel, plan.script_path, plan.script)
    submitted = _run(plan.tunnel, f"sbatch --parsable {shlex.quote(plan.script_path)}")
    output = (submitted.stdout + submitted.stderr).strip()
    if submitted.return_code != 0:
        raise ClusterError(
            f"sbatch refused the job (exit {submitted.return_code}): {output}. The script is {plan.script_path}."
        )
    job_id = submitted.stdout.strip().splitlines()[-1].split(";")[0]
    if not job_id.isdigit():
        raise ClusterError(f"sbatch --parsable printed {output!r}, not a job id.")
    return job_id


@dataclass
class JobOutcome:
    job_id: str
    state: str
    exit_code: Optional[int]
    signal: Optional[int]
    log_path: Optional[str]
    log_tail: str
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0

    def describe(self) -> str:
        if self.timed_out:
            head = f"Slurm job {self.job_id} is still {self.state} after the wait timed out."
        else:
            head = f"Slurm job {self.job_id} ended {self.state} with exit code {self.exit_code}"
            head += f" (signal {self.signal})." if self.signal else "."
        if self.succeeded or not self.log_tail:
            return head
        return f"{head} Last lines of {self.log_path}:\n{self.log_tail}"


def _job_fields(tunnel, job_id: str) -> Optional[dict[str, str]]:
    shown = _run(tunnel, f"scontrol show job -o {shlex.quote(job_id)}")
    if shown.return_code != 0 or "JobState=" not in shown.stdout:
        return None  # unknown or already purged (older than MinJobAge)
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", shown.stdout))


def _queued_state(tunnel, job_id: str) -> str:
    listed = _run(tunnel, f"squeue -h -j {shlex.quote(job_id)} -o %T")
    return listed.stdout.strip().splitlines()[0].strip() if listed.return_code == 0 and listed.stdout.strip() else ""


def _is_final(fields: dict[str, str]) -> bool:
    state = fields.get("JobState", "")
    return state in FINAL_STATES or (state == "PREEMPTED" and fields.get("Requeue") == "0")


def _latest(tunnel, pattern: str) -> Optional[str]:
    """Newest file matching a pattern with `*` wildcards (every other part is quoted)."""
    quoted = "*".join(shlex.quote(part) if part else "" for part in pattern.split("*"))
    found = _run(tunnel, f"ls -1t {quoted} 2>/dev/null | head -n 1")
    path = found.stdout.strip()
    return path or None


def _tail(tunnel, path: Optional[str], lines: int) -> str:
    if not path:
        return ""
    tail = _run(tunnel, f"tail -n {lines} {shlex.quote(path)}")
    return tail.stdout.rstrip() if tail.return_code == 0 else ""


def wait_for_job(
    job_id: str,
    timeout: float,
    *,
    log_path: Optional[str] = None,
    batch_log_path: Optional[str] = None,
    tunnel: Any = None,
    poll_interval: float = 2.0,
    tail_lines: int = LOG_TAIL_LINES,
) -> JobOutcome:
    """Poll squeue / scontrol until the job ends or `timeout` seconds pass.

    `log_path` may hold `*` (one file per requeue attempt; the newest is read). Without
    it, the job's StdOut from `scontrol show job` is read. A job that did not succeed
    comes back with its exit code and the last `tail_lines` lines of its log (plus the
    end of the batch script's log, which says why srun or the container failed).
    """
    tunnel = tunnel or _local_tunnel()
    deadline = time.monotonic() + timeout
    fields: Optional[dict[str, str]] = None
    while True:
        queued = _queued_state(tunnel, job_id)
        if not queued or queued in FINAL_STATES or queued == "PREEMPTED":
            fields = _job_fields(tunnel, job_id) or fields
            if fields is None or _is_final(fields):
                break
        if time.monotonic() > deadline:
            state = queued or (fields or {}).get("JobState", "UNKNOWN")
            return JobOutcome(job_id, state, None, None, None, "", timed_out=True)
        time.sleep(poll_interval)

    if fields is None:
        return JobOutcome(job_id, "UNKNOWN", None, None, log_path, "")
    exit_code, _, signal = fields.get("ExitCode", "").partition(":")
    outcome = JobOutcome(
        job_id=job_id,
        state=fields["JobState"],
        exit_code=int(exit_code) if exit_code.isdigit() else None,
        signal=int(signal) if signal.isdigit() else None,
        log_path=None,
        log_tail="",
    )
    batch_log = batch_log_path or fields.get("StdOut")
    worker_log = _latest(tunnel, log_path) if log_path else batch_log
    outcome.log_path = worker_log
    if not outcome.succeeded:
        parts = [_tail(tunnel, worker_log, tail_lines)]
        if batch_log and batch_log != worker_log:
            batch_tail = _tail(tunnel, batch_log, BATCH_LOG_TAIL_LINES)
            if batch_tail:
                parts.append(f"--- end of the batch script's log {batch_log} ---\n{batch_tail}")
        outcome.log_tail = "\n".join(part for part in parts if part)
    return outcome
