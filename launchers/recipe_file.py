"""The resolved recipe as the YAML file every worker reads (`python -m recipes.worker FILE`).

Interpolations such as `train.run_dir: runs/${now:...}` are resolved once, at launch, so
every rank and every requeued attempt of the same job sees the same run directory (and
so resumes from its checkpoints).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from launchers.result import WandbRun

RECIPE_FILE_NAME = "recipe.yaml"


def _register_now_resolver() -> None:
    # Hydra registers `now` only inside a Hydra app; the Python API and tests get it here.
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern), use_cache=True)


def resolve_recipe(recipe: Any, recipe_yaml: Optional[str] = None) -> DictConfig:
    """The recipe as a typed, fully resolved DictConfig.

    `recipe_yaml`, when given, is what runs (YAML text, or the path of a YAML file);
    it is checked against the `RecipeConfig` schema so a stray key fails here, not on
    the cluster. Otherwise `recipe` (a RecipeConfig or a DictConfig of one) is used.
    """
    from recipes.config import RecipeConfig

    _register_now_resolver()
    if recipe_yaml is not None:
        text = recipe_yaml
        if "\n" not in recipe_yaml and os.path.isfile(recipe_yaml):
            with open(recipe_yaml) as file:
                text = file.read()
        config = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.create(text))
    else:
        config = OmegaConf.structured(recipe)
    OmegaConf.resolve(config)
    return config


def with_run_dir(config: DictConfig, run_dir: str) -> DictConfig:
    updated = config.copy()
    updated.train.run_dir = run_dir
    return updated


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)


def wandb_run(config: DictConfig) -> Optional[WandbRun]:
    """W&B settings as the trainer will apply them (recipes/tracking.py); None when W&B is off."""
    logger = config.logger
    if not logger.wandb:
        return None
    mode = logger.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "disabled":
        return None
    run_dir = str(config.train.run_dir)
    return WandbRun(
        project=logger.wandb_project,
        entity=logger.wandb_entity,
        name=logger.wandb_run_name or os.path.basename(os.path.normpath(run_dir)),
        mode=mode,
        run_id_file=os.path.join(run_dir, "wandb_run_id"),
    )
