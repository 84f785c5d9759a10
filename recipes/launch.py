"""A recipe launched through its executor (`launchers/`): the recipe side of a launch.

The launchers get a `launchers.Job`: the executor settings, the run directory and, for the
directory the executor places the job in, the text of the resolved recipe file that every
rank reads with `python -m recipes.worker FILE`. The W&B destination is filled in here, from
the same rules the trainer logs by (`recipes.tracking`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import launchers
from recipes.config import RecipeConfig
from recipes.recipe_file import recipe_from_text, recipe_to_yaml, resolved, with_run_dir, without_environment_values
from recipes.tracking import wandb_destination

WORKER_MODULE = "recipes.worker"


def launch(recipe: RecipeConfig, recipe_yaml: Optional[str] = None, dryrun: bool = False, *,
           worker_module: str = WORKER_MODULE) -> launchers.LaunchResult:
    """Start (or, with dryrun, render) the training job of `recipe`; see `launchers.launch`.

    `recipe_yaml`, when given, is what runs instead: YAML text or the path of a YAML file, checked
    against RecipeConfig here so a stray key fails before anything is submitted.
    `worker_module`: the module every rank runs (tests use a stand-in).
    """
    if recipe_yaml is not None:
        recipe = recipe_from_text(_read_if_path(recipe_yaml))
    recipe = resolved(recipe)
    job = launchers.Job(
        name=recipe.name,
        run_dir=recipe.train.run_dir,
        executor=recipe.executor,
        recipe_yaml_for=lambda run_dir: recipe_to_yaml(without_environment_values(with_run_dir(recipe, run_dir))),
        worker_module=worker_module,
    )
    result = launchers.launch(job, dryrun=dryrun)
    result.wandb = wandb_destination(recipe.logger, result.run_dir)
    return result


def _read_if_path(recipe_yaml: str) -> str:
    if "\n" not in recipe_yaml and os.path.isfile(recipe_yaml):
        return Path(recipe_yaml).read_text()
    return recipe_yaml
