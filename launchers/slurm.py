"""executor.kind=slurm: an sbatch job.

The job script comes from `launchers.slurm_script` (its layout follows NeMo-Run's
slurm.sh.j2); commands go through NeMo-Run's `LocalTunnel` (on a login node) or
`SSHTunnel`, imported only when a job is submitted. Each node runs one srun task,
`torchrun`, which starts `processes_per_node` workers (one per GPU):

    torchrun --nnodes=N --nproc-per-node=P --node-rank=$SLURM_NODEID
             --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT -m WORKER_MODULE RECIPE

MASTER_ADDR is the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`. The
worker command is quoted so `$SLURM_NODEID` is read on each node, not in the batch shell.

Preemption and time limits (`executor.slurm.requeue`, on by default; off gives
`--no-requeue` and no trap): the job is submitted with `--requeue`, so Slurm requeues it
after preemption or a node failure; `--signal=B:USR1@S` wakes the batch shell S seconds
before the time limit, its trap forwards USR1 to the training processes, waits for them to
save, and requeues the job (see `launchers.slurm_script`). A requeued job starts the same
command with the same recipe file, and the trainer resumes from the latest checkpoint in
`train.run_dir`. A job whose workers fail is requeued `executor.slurm.max_retries` times
(default 0).

NeMo-Run's Experiment/torchx layer is not used for Slurm: its status polling needs
`sacct` (absent where accounting is off), its torchrun component reads `$SLURM_NODEID`
in the batch shell, and it runs srun in the foreground, where a signal trap cannot fire.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from falcon_h1.errors import ConfigValueError
from launchers.config import ExecutorConfig, SlurmConfig
from launchers.job import MASKED_ENV_VALUE, RECIPE_FILE_NAME, Job
from launchers.result import LaunchResult
from launchers.slurm_script import JOB_FOLDER_IN_CONTAINER, BatchScript

TUNNELS = ("local", "ssh")
MAX_REQUEUE_WARNING_S = 300


def parse_time_limit(text: str) -> int:
    """Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(text)
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # MM or MM:SS


def processes_per_node(executor: ExecutorConfig) -> int:
    """Worker processes torchrun starts on each node: executor.nproc_per_node, or
    executor.slurm.ntasks_per_node when that is the one set above 1 (either spelling works;
    Slurm itself always gets one task per node, the torchrun agent)."""
    slurm_tasks = executor.slurm.ntasks_per_node
    return slurm_tasks if slurm_tasks > 1 else executor.nproc_per_node


def _is_port(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def validate(executor: ExecutorConfig) -> None:
    """Checks that need no cluster; each error names the field, its value and what is allowed."""
    slurm = executor.slurm

    def fail(key: str, value, allowed: str, message: str) -> None:
        raise ConfigValueError(key, value, allowed, message)

    if not isinstance(slurm.nodes, int) or slurm.nodes < 1:
        fail("executor.slurm.nodes", slurm.nodes, "an integer >= 1",
             f"executor.slurm.nodes = {slurm.nodes!r} is not allowed: the number of nodes must be an integer >= 1.")
    counts = {
        "executor.slurm.ntasks_per_node": slurm.ntasks_per_node,
        "executor.nproc_per_node": executor.nproc_per_node,
    }
    for field, value in counts.items():
        if not isinstance(value, int) or value < 1:
            fail(field, value, "an integer >= 1", f"{field} = {value!r} is not allowed: an integer >= 1.")
    if not isinstance(slurm.gpus_per_node, int) or slurm.gpus_per_node < 0:
        fail("executor.slurm.gpus_per_node", slurm.gpus_per_node, "an integer >= 0",
             f"executor.slurm.gpus_per_node = {slurm.gpus_per_node!r} is not allowed: an integer >= 0 (0 = CPU nodes).")
    nproc = executor.nproc_per_node
    if slurm.ntasks_per_node > 1 and nproc > 1 and nproc != slurm.ntasks_per_node:
        fail("executor.nproc_per_node", nproc, f"1 or executor.slurm.ntasks_per_node = {slurm.ntasks_per_node}",
             f"executor.nproc_per_node = {nproc} disagrees with executor.slurm.ntasks_per_node = "
             f"{slurm.ntasks_per_node}: both give the worker processes per node on Slurm; set one of them "
             "(the other at 1) or both to the same value.")
    procs = processes_per_node(executor)
    if slurm.gpus_per_node > 0 and procs != slurm.gpus_per_node:
        fail("executor.nproc_per_node", nproc, f"executor.slurm.gpus_per_node = {slurm.gpus_per_node}",
             f"executor.nproc_per_node = {nproc} / executor.slurm.ntasks_per_node = {slurm.ntasks_per_node} start "
             f"{procs} worker process(es) per node, but executor.slurm.gpus_per_node = {slurm.gpus_per_node}: "
             f"training runs one worker process per GPU, so set executor.nproc_per_node={slurm.gpus_per_node} "
             "(or change gpus_per_node).")
    if slurm.cpus_per_task is not None and (not isinstance(slurm.cpus_per_task, int) or slurm.cpus_per_task < 1):
        fail("executor.slurm.cpus_per_task", slurm.cpus_per_task, "null or an integer >= 1",
             f"executor.slurm.cpus_per_task = {slurm.cpus_per_task!r} is not allowed: "
             "null or an integer >= 1 (CPUs per worker process).")
    try:
        if parse_time_limit(str(slurm.time)) <= 0:
            raise ValueError(slurm.time)
    except ValueError:
        fail("executor.slurm.time", slurm.time, "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
             f"executor.slurm.time = {slurm.time!r} is not a Slurm time limit: use MM, MM:SS, HH:MM:SS, "
             "D-HH, D-HH:MM or D-HH:MM:SS (greater than zero).")
    if not _is_port(slurm.master_port):
        fail("executor.slurm.master_port", slurm.master_port, "1..65535",
             f"executor.slurm.master_port = {slurm.master_port!r} is not a TCP port: use 1..65535.")
    if not isinstance(slurm.max_retries, int) or slurm.max_retries < 0:
        fail("executor.slurm.max_retries", slurm.max_retries, "an integer >= 0",
             f"executor.slurm.max_retries = {slurm.max_retries!r} is not allowed: an integer >= 0 (requeues of a "
             "job whose workers fail).")
    if slurm.tunnel not in TUNNELS:
        fail("executor.slurm.tunnel", slurm.tunnel, ", ".join(TUNNELS),
             f"executor.slurm.tunnel = {slurm.tunnel!r} is not allowed: one of {', '.join(TUNNELS)}.")
    if slurm.tunnel == "ssh":
        if not slurm.ssh_host:
            fail("executor.slurm.ssh_host", slurm.ssh_host, "the login node's host name",
                 "executor.slurm.ssh_host is not set: executor.slurm.tunnel=ssh needs the login node's host name.")
        if not slurm.job_dir or not slurm.job_dir.startswith("/"):
            fail("executor.slurm.job_dir", slurm.job_dir, "an absolute directory",
                 f"executor.slurm.job_dir = {slurm.job_dir!r} is not allowed with executor.slurm.tunnel=ssh: give an "
                 "absolute directory on the cluster's shared file system for job scripts and logs.")
    if slurm.ssh_port is not None and not _is_port(slurm.ssh_port):
        fail("executor.slurm.ssh_port", slurm.ssh_port, "null or 1..65535",
             f"executor.slurm.ssh_port = {slurm.ssh_port!r} is not a TCP port: use 1..65535, or null for ssh's default.")
    for mount in slurm.container_mounts:
        parts = str(mount).split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            fail("executor.slurm.container_mounts", mount, "SOURCE:DESTINATION or SOURCE:DESTINATION:FLAGS",
                 f"executor.slurm.container_mounts entry {mount!r} is not allowed: use SOURCE:DESTINATION "
                 "or SOURCE:DESTINATION:FLAGS (pyxis --container-mounts syntax).")
    for key in slurm.env_vars:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
            fail("executor.slurm.env_vars", key, "environment variable names ([A-Za-z_][A-Za-z0-9_]*)",
                 f"executor.slurm.env_vars key {key!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*).")


def _signal_seconds(time_limit: str) -> int:
    """How long before the time limit the batch shell is warned: 10% of it, 30 s .. 5 min."""
    return max(30, min(MAX_REQUEUE_WARNING_S, parse_time_limit(time_limit) // 10))


def _run_dir_on_cluster(slurm: SlurmConfig, run_dir: str) -> str:
    if os.path.isabs(run_dir):
        return run_dir
    if slurm.tunnel == "ssh":  # relative to the cluster's job directory, not this machine's cwd
        return os.path.join(slurm.job_dir, run_dir)
    return os.path.abspath(run_dir)


def _check_run_dir_is_mounted(slurm: SlurmConfig, run_dir: str) -> None:
    if not slurm.container_image:
        return
    destinations = [str(mount).split(":")[1] for mount in slurm.container_mounts]
    if not any(run_dir == dest or run_dir.startswith(dest.rstrip("/") + "/") for dest in destinations):
        raise ConfigValueError(
            "train.run_dir", run_dir, "a directory inside one of executor.slurm.container_mounts",
            message=f"train.run_dir = {run_dir!r} is not inside any container mount (executor.slurm.container_mounts = "
            f"{list(slurm.container_mounts)}): checkpoints written there would vanish with the container and a "
            "requeued job could not resume. Mount a shared directory and put run_dir under its destination.",
        )


def make_tunnel(slurm: SlurmConfig):
    from launchers.nemo import nemo_run

    run = nemo_run()

    if slurm.tunnel == "ssh":
        return run.SSHTunnel(
            host=slurm.ssh_host,
            user=slurm.ssh_user or os.environ.get("USER", ""),
            identity=slurm.ssh_identity,
            port=slurm.ssh_port,
            job_dir=slurm.job_dir,
        )
    return run.LocalTunnel(job_dir=slurm.job_dir or "")


@dataclass
class SlurmJobPlan:
    """Everything about a job that is decided before the cluster is contacted."""

    job_name: str
    folder: str  # on the cluster: sbatch script, recipe, logs
    run_dir: str
    recipe_yaml: str
    script: str
    tunnel: Any = None  # made by `launch` when the job is submitted

    @property
    def script_path(self) -> str:
        return os.path.join(self.folder, "sbatch.sh")

    @property
    def recipe_path(self) -> str:
        return os.path.join(self.folder, "configs", RECIPE_FILE_NAME)

    def worker_log(self, job_id: str, attempt: int | str = 0) -> str:
        """srun's output file, one per attempt (SLURM_RESTART_COUNT) of the job."""
        return os.path.join(self.folder, f"log-{self.job_name}_{job_id}_{attempt}.out")

    def batch_log(self, job_id: str) -> str:
        return os.path.join(self.folder, f"sbatch_{self.job_name}_{job_id}.out")


def _worker_command(executor: ExecutorConfig, worker_module: str, recipe_path: str) -> str:
    slurm = executor.slurm
    steps = list(slurm.setup_commands)
    on_this_machine = slurm.tunnel == "local" and not slurm.container_image
    if on_this_machine:
        # A login node shares the file system with the compute nodes: use this
        # environment's torchrun/python and start where the user launched from, so
        # relative data paths mean the same as here.
        steps.insert(0, f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH")
        steps.append(f"cd {shlex.quote(os.getcwd())}")
    torchrun = (
        f"torchrun --nnodes={slurm.nodes} --nproc-per-node={processes_per_node(executor)} "
        "--node-rank=$SLURM_NODEID --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT "
        f"--max-restarts=0 -m {worker_module} {recipe_path}"
    )
    if slurm.requeue:
        # The workers get the time-limit USR1 from Slurm themselves; torchrun must outlive it
        # (launchers.slurm_script). An ignored signal stays ignored across exec.
        steps.append('trap "" USR1')
    steps.append(f"exec {torchrun}")
    return f"bash -c {shlex.quote(' && '.join(steps))}"


def _batch_script(job: Job, job_name: str, folder: str, mask_env_values: bool) -> BatchScript:
    executor, slurm = job.executor, job.executor.slurm
    env_vars = {"MASTER_ADDR": "$head_node", "MASTER_PORT": str(slurm.master_port)}
    # Exported unquoted by the script: quote user values so spaces survive.
    env_vars.update({str(key): shlex.quote(MASKED_ENV_VALUE if mask_env_values else str(value))
                     for key, value in slurm.env_vars.items()})
    in_container = slurm.container_image is not None
    recipe_path = f"{JOB_FOLDER_IN_CONTAINER if in_container else folder}/configs/{RECIPE_FILE_NAME}"
    flags = {
        "account": slurm.account,
        "partition": slurm.partition,
        "qos": slurm.qos,
        "time": str(slurm.time),
        "nodes": slurm.nodes,
        # One srun task per node: torchrun, which starts the per-GPU workers itself.
        "ntasks_per_node": 1,
        "cpus_per_task": slurm.cpus_per_task * processes_per_node(executor) if slurm.cpus_per_task else None,
        "gpus_per_node": slurm.gpus_per_node or None,
    }
    return BatchScript(
        job_name=job_name,
        folder=folder,
        flags=flags,
        env_vars=env_vars,
        worker_command=_worker_command(executor, job.worker_module, recipe_path),
        container_image=slurm.container_image,
        container_mounts=list(slurm.container_mounts),
        max_retries=slurm.max_retries,
        warning_seconds=_signal_seconds(str(slurm.time)) if slurm.requeue else None,
    )


def plan_job(job: Job, mask_env_values: bool = False) -> SlurmJobPlan:
    """The job's sbatch script, folder and recipe file; `job.executor` is already validated.
    `mask_env_values`: the script as a dry run prints it, env_vars values masked."""
    slurm = job.executor.slurm
    run_dir = _run_dir_on_cluster(slurm, job.run_dir)
    _check_run_dir_is_mounted(slurm, run_dir)
    job_name = re.sub(r"[^\w.-]", "_", job.name)
    base = slurm.job_dir or os.path.join(run_dir, "launches")
    folder = os.path.join(base, f"{job_name}_{time.strftime('%Y%m%d-%H%M%S')}")
    return SlurmJobPlan(
        job_name=job_name,
        folder=folder,
        run_dir=run_dir,
        recipe_yaml=job.recipe_yaml_for(run_dir),
        script=_batch_script(job, job_name, folder, mask_env_values).render(),
    )


def logs_command(slurm: SlurmConfig, plan: SlurmJobPlan, job_id: str) -> str:
    """A command that follows the job's log, from where the job was submitted."""
    # Every attempt of a requeued job has its own file, so tail them all.
    folder = shlex.quote(plan.folder)
    command = f"tail -n 200 -f {folder}/{shlex.quote(f'log-{plan.job_name}_{job_id}_')}*.out"
    if slurm.tunnel == "ssh":
        identity = f"-i {shlex.quote(slurm.ssh_identity)} " if slurm.ssh_identity else ""
        port = f"-p {slurm.ssh_port} " if slurm.ssh_port is not None else ""
        user = f"{slurm.ssh_user}@" if slurm.ssh_user else ""
        command = f"ssh {identity}{port}{user}{slurm.ssh_host} {shlex.quote(command)}"
    return command


def launch(job: Job, dryrun: bool) -> LaunchResult:
    from launchers import slurm_jobs

    plan = plan_job(job, mask_env_values=dryrun)
    result = LaunchResult(
        kind="slurm",
        dryrun=dryrun,
        run_dir=plan.run_dir,
        recipe_yaml=plan.recipe_yaml,
        recipe_path=plan.recipe_path,
        rendered=plan.script,
    )
    if dryrun:
        return result

    slurm = job.executor.slurm
    plan.tunnel = make_tunnel(slurm)
    plan.tunnel.job_dir = os.path.dirname(plan.folder)
    slurm_jobs.check_cluster(plan.tunnel, slurm.partition)
    job_id = slurm_jobs.submit(plan)
    result.job_id = job_id
    result.log_path = plan.worker_log(job_id)
    result.logs_command = logs_command(slurm, plan, job_id)

    def wait(timeout: float, poll_interval: float):
        return slurm_jobs.wait_for_job(
            job_id,
            timeout,
            log_path=plan.worker_log(job_id, "*"),
            batch_log_path=plan.batch_log(job_id),
            tunnel=plan.tunnel,
            poll_interval=poll_interval,
        )

    result._waiter = wait
    return result
