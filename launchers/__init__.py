"""Launch a training job on this machine (torchrun), on Slurm, or on Kubernetes (Kubeflow PyTorchJob).

    from launchers import Job, launch
    result = launch(Job(name, run_dir, executor, recipe_yaml_for, worker_module))
    print(result.summary())

`executor.kind` picks the executor. Every executor starts `python -m WORKER_MODULE RECIPE_FILE`
on every rank (under torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT); the recipe file is the resolved recipe, so all ranks and all restarts of a job
agree on it. The launchers read the typed executor settings (`launchers.config`) and treat the
recipe file as text: what a recipe is, and how it is written, is the caller's (`recipes.launch`).
`dryrun=True` validates and renders (torchrun command line, sbatch script, Kubernetes manifests)
without starting or submitting anything.
"""

from __future__ import annotations

from types import ModuleType

from falcon_h1.errors import ConfigValueError
from launchers.config import EXECUTOR_KINDS, ExecutorConfig, KubernetesConfig, SlurmConfig
from launchers.job import RECIPE_FILE_NAME, Job
from launchers.result import ClusterError, LaunchResult, WandbRun

__all__ = [
    "ClusterError",
    "EXECUTOR_KINDS",
    "ExecutorConfig",
    "Job",
    "KubernetesConfig",
    "LaunchResult",
    "RECIPE_FILE_NAME",
    "SlurmConfig",
    "WandbRun",
    "launch",
    "validate_executor",
    "wait_for_job",
]


def _executor_module(kind: str) -> ModuleType:
    if kind == "local":
        from launchers import local as module
    elif kind == "slurm":
        from launchers import slurm as module
    elif kind == "kubernetes":
        from launchers import kubeflow as module
    else:
        raise ConfigValueError(
            "executor.kind", kind, ", ".join(EXECUTOR_KINDS),
            message=f"executor.kind = {kind!r} is not a known executor: allowed values are {', '.join(EXECUTOR_KINDS)}.",
        )
    return module


def validate_executor(executor: ExecutorConfig) -> None:
    """Check the executor settings without contacting any cluster.

    Raises ConfigValueError naming the field, its value and what is allowed. The checks that
    need the run directory or the cluster (run_dir on a mounted volume, controller reachable,
    partition exists) happen in `launch`.
    """
    _executor_module(executor.kind).validate(executor)


def launch(job: Job, dryrun: bool = False) -> LaunchResult:
    """Start (or, with dryrun, render) `job`.

    local: runs torchrun here and returns when the workers end (state, exit code, log
    tail). slurm / kubernetes: returns once the job is submitted (job id, log command);
    `result.wait()` follows a Slurm job to its end.
    """
    module = _executor_module(job.executor.kind)
    module.validate(job.executor)
    return module.launch(job, dryrun=dryrun)


def wait_for_job(job_id: str, timeout: float, **options):
    """Wait for a Slurm job; see launchers.slurm_jobs.wait_for_job."""
    from launchers.slurm_jobs import wait_for_job as wait

    return wait(job_id, timeout, **options)
