"""What a launcher is handed: one job, described without the recipe's schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from launchers.config import ExecutorConfig

# The recipe file's name wherever a launcher puts it (job folder, ConfigMap key, launch folder).
RECIPE_FILE_NAME = "recipe.yaml"
# An environment value as a dry run prints it: the names of executor.*.env_vars are shown, never
# their values.
MASKED_ENV_VALUE = "***"


@dataclass(frozen=True)
class Job:
    """Every rank of the job runs `python -m WORKER_MODULE RECIPE_FILE` under torchrun.

    `run_dir` is the run directory as the user gave it; the executor places it (absolute, on the
    cluster's shared file system or the pods' volume) and asks `recipe_yaml_for(placed_run_dir)`
    for the text of the recipe file, which must name that directory: every rank and every
    restart of the job reads the same file. `name` names the job (Slurm job, PyTorchJob,
    launch folder).
    """

    name: str
    run_dir: str
    executor: ExecutorConfig
    recipe_yaml_for: Callable[[str], str]
    worker_module: str
