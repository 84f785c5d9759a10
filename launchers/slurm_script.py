"""The sbatch script of a Slurm job: #SBATCH flags, the node list, one srun task per node,
the time-limit trap and the requeue of failed workers.

Written here rather than by NeMo-Run's template so that rendering it (a dry run) imports
nothing heavy: `import nemo_run` imports torch and takes seconds. The layout follows
NeMo-Run's slurm.sh.j2 (the job folder, its `code/` working directory, the pyxis container
flags with the job folder mounted at JOB_FOLDER_IN_CONTAINER, one log per attempt).

Time limit and preemption (`executor.slurm.requeue`): `--signal=B:USR1@S` sends SIGUSR1 to
the batch shell S seconds before the time limit (and at preemption where the cluster sets
`PreemptParameters=send_user_signal`). Its trap forwards USR1 to srun, which passes it to
every process of the training step; the training processes finish the step, save a
checkpoint and exit 138 (128 + SIGUSR1), torchrun then ends with 1. The trap waits for that
(at most S - REQUEUE_MARGIN_S seconds), then `scontrol requeue`s the job and the batch shell
exits 0; the requeued job resumes from the checkpoint. torchrun itself ignores USR1 (the
workers have it from Slurm already; torch before 2.9 would die of it and the step's end
would kill the workers mid-save).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Optional

# Inside a container the job folder is mounted here (NeMo-Run's convention, kept so jobs
# submitted before and after read the same paths).
JOB_FOLDER_IN_CONTAINER = "/nemo_run"
# Seconds left between the requeue and the time limit, for `scontrol requeue` itself.
REQUEUE_MARGIN_S = 10


@dataclass(frozen=True)
class BatchScript:
    """What the sbatch script is made of; `render()` gives its text."""

    job_name: str
    folder: str  # the job folder on the cluster: this script, configs/, code/, logs
    flags: dict  # sbatch option -> value (True: a flag without value)
    env_vars: dict  # exported in the batch shell, values already shell-quoted
    worker_command: str  # what each node's srun task runs
    container_image: Optional[str]
    container_mounts: list
    max_retries: int
    warning_seconds: Optional[int]  # --signal=B:USR1@S; None: no trap, no requeue

    @property
    def batch_log(self) -> str:
        return os.path.join(self.folder, f"sbatch_{self.job_name}_%j.out")

    @property
    def worker_log(self) -> str:
        """One file per attempt (SLURM_RESTART_COUNT) of the job."""
        return os.path.join(self.folder, f"log-{self.job_name}_%j_${{SLURM_RESTART_COUNT:-0}}.out")

    def render(self) -> str:
        flags = dict(self.flags, job_name=self.job_name, output=self.batch_log, open_mode="append")
        if self.warning_seconds is not None:
            flags.update(signal=f"B:USR1@{self.warning_seconds}", requeue=True)
        else:
            flags["no_requeue"] = True
        lines = ["#!/bin/bash", f"# falcon-train Slurm job {self.job_name}: sbatch --parsable {self.folder}/sbatch.sh"]
        lines += [_sbatch_flag(key, flags[key]) for key in sorted(flags) if flags[key] is not None]
        lines += ["", "set -evx", "export PYTHONUNBUFFERED=1", "export SLURM_UNBUFFEREDIO=1", "set +e", "",
                  "nodes=( $( scontrol show hostnames $SLURM_JOB_NODELIST ) )", "head_node=${nodes[0]}"]
        lines += [f"export {key}={value}" for key, value in self.env_vars.items()]
        if self.warning_seconds is not None:
            lines += ["", _save_and_requeue_trap(self.warning_seconds - REQUEUE_MARGIN_S)]
        lines += ["", "# One srun task per node, in the background: the batch shell handles signals while it trains.",
                  f"{self._srun()} {self.worker_command} &", "srun_pid=$!", "wait $srun_pid", "exitcode=$?",
                  "set -e", "", _RETRY_ON_FAILURE.format(max_retries=self.max_retries)]
        return "\n".join(lines) + "\n"

    def _srun(self) -> str:
        if self.container_image is None:
            where = ["--chdir", os.path.join(self.folder, "code")]
        else:
            mounts = [*self.container_mounts, f"{self.folder}:{JOB_FOLDER_IN_CONTAINER}"]
            where = ["--container-image", self.container_image, "--container-mounts", ",".join(mounts),
                     "--container-workdir", f"{JOB_FOLDER_IN_CONTAINER}/code"]
        # The log name keeps ${SLURM_RESTART_COUNT:-0} for the batch shell to expand.
        return " ".join(["srun", "--output", self.worker_log, *map(shlex.quote, where), "--wait=60",
                         "--kill-on-bad-exit=1"])


def _sbatch_flag(key: str, value) -> str:
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def _save_and_requeue_trap(grace_seconds: int) -> str:
    return f"""\
# SIGUSR1 before the time limit: the training processes save, then the job is requeued.
save_and_requeue() {{
    echo "SIGUSR1 before the time limit: forwarding it to the training processes, which finish the step and save"
    kill -USR1 "$srun_pid"
    waited=0
    while kill -0 "$srun_pid" 2>/dev/null && [ "$waited" -lt {grace_seconds} ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$srun_pid" 2>/dev/null; then
        echo "the training processes still run after {grace_seconds} s: requeueing anyway (the job resumes from its latest checkpoint)"
    else
        wait "$srun_pid"
        echo "the training processes have ended (srun exit code $?; each worker exits 138 after saving on SIGUSR1)"
    fi
    echo "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}}
trap save_and_requeue USR1"""


# Workers that fail are requeued while SLURM_RESTART_COUNT < executor.slurm.max_retries.
_RETRY_ON_FAILURE = """\
echo "job exited with code $exitcode"
if [ $exitcode -ne 0 ]; then
    if [ {max_retries} -gt "${{SLURM_RESTART_COUNT:-0}}" ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit $exitcode
fi"""
