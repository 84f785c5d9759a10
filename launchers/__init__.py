"""Launch a recipe on this machine (torchrun), on Slurm, or on Kubernetes (Kubeflow PyTorchJob).

    from launchers import launch
    result = launch(recipe)                 # recipe.executor.kind picks the executor
    print(result.summary())

Every executor starts `python -m recipes.worker RECIPE_YAML` on every rank (under
torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); the
recipe file is the resolved recipe, so all ranks and all restarts of a job agree on it.
`dryrun=True` validates and renders (torchrun command line, sbatch script, Kubernetes
manifests) without starting or submitting anything.
"""

from __future__ import annotations

from typing import Any, Optional

from launchers.result import ClusterError, ExecutorConfigError, LaunchResult, WandbRun

EXECUTOR_KINDS = ("local", "slurm", "kubernetes")
WORKER_MODULE = "recipes.worker"

__all__ = [
    "ClusterError",
    "EXECUTOR_KINDS",
    "ExecutorConfigError",
    "LaunchResult",
    "WandbRun",
    "launch",
    "validate_executor",
    "wait_for_job",
]


def _executor_module(kind: Any):
    if kind == "local":
        from launchers import local as module
    elif kind == "slurm":
        from launchers import slurm as module
    elif kind == "kubernetes":
        from launchers import kubeflow as module
    else:
        raise ExecutorConfigError(
            f"executor.kind = {kind!r} is not a known executor: allowed values are {', '.join(EXECUTOR_KINDS)}."
        )
    return module


def validate_executor(recipe: Any) -> None:
    """Check the recipe's executor settings without contacting any cluster.

    Raises ExecutorConfigError naming the field, its value and what is allowed.
    Cluster-side checks (controller reachable, partition exists) happen in `launch`.
    """
    from launchers.recipe_file import resolve_recipe

    config = resolve_recipe(recipe)
    _executor_module(config.executor.kind).validate(config)


def launch(
    recipe: Any,
    recipe_yaml: Optional[str] = None,
    dryrun: bool = False,
    *,
    worker_module: str = WORKER_MODULE,
) -> LaunchResult:
    """Start (or, with dryrun, render) the training job described by `recipe`.

    `recipe`: a RecipeConfig, or a DictConfig of one. `recipe_yaml`: the resolved recipe
    as YAML text or a YAML file path; when given it is what runs (and is checked against
    RecipeConfig). `worker_module`: the module every rank runs (tests use a stand-in).

    local: runs torchrun here and returns when the workers end (state, exit code, log
    tail). slurm / kubernetes: returns once the job is submitted (job id, log command);
    `result.wait()` follows a Slurm job to its end.
    """
    from launchers.recipe_file import resolve_recipe

    config = resolve_recipe(recipe, recipe_yaml)
    module = _executor_module(config.executor.kind)
    return module.launch(config, dryrun=dryrun, worker_module=worker_module)


def wait_for_job(job_id: str, timeout: float, **options):
    """Wait for a Slurm job; see launchers.slurm_jobs.wait_for_job."""
    from launchers.slurm_jobs import wait_for_job as wait

    return wait(job_id, timeout, **options)
