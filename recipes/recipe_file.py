"""A recipe as YAML: the resolved file every rank of a launched job reads
(`python -m recipes.worker FILE`), and `run_dir/config.yaml` read back.

Interpolations such as `train.run_dir: runs/${now:...}` are resolved once, when the file is
written, so every rank and every requeued attempt of the same job sees the same run directory
(and so resumes from its checkpoints). Reading a file checks it against `RecipeConfig`, so a
stray key fails where the file is read, naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from falcon_h1.errors import ConfigValueError
from recipes.config import RecipeConfig
from recipes.run_metadata import MASK


def _register_now_resolver() -> None:
    # Hydra registers `now` only inside a Hydra app; the Python API and tests get it here.
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern), use_cache=True)


def to_recipe(tree: DictConfig) -> RecipeConfig:
    """A composed or loaded OmegaConf tree -> the typed recipe, interpolations resolved (Hydra's
    own `hydra` node, when present, is left out)."""
    _register_now_resolver()
    tree = OmegaConf.masked_copy(tree, [k for k in tree.keys() if k != "hydra"]) if "hydra" in tree else tree
    try:
        recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecipeConfig), tree))
    except InterpolationResolutionError as error:
        setting_error = _config_value_error_within(error)  # a resolver's check (the µP multipliers of mup.mode)
        if setting_error is None:
            raise
        raise setting_error from None
    refuse_unknown_keys(recipe)
    return recipe


def _config_value_error_within(error: BaseException):
    """The ConfigValueError an OmegaConf error wraps (it chains the resolver's exception as its
    context), or None."""
    while error is not None and not isinstance(error, ConfigValueError):
        error = error.__cause__ or error.__context__
    return error


def refuse_unknown_keys(node, path: str = "") -> None:
    """Fail on a key that is no field of its config dataclass. Hydra's `+group.key=value` adds
    such a key, and OmegaConf hands it over as a stray attribute that nothing would ever read."""
    fields = [f.name for f in dataclasses.fields(node)]
    for name, value in vars(node).items():
        key = f"{path}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {path}{close[0]}? " if close else ""
            raise ConfigValueError(
                key, value, f"a field of {type(node).__name__}",
                message=f"{key} = {value!r} is not a setting ({hint}{path.rstrip('.') or 'the recipe'} has: "
                        f"{', '.join(fields)}); a misspelt key would otherwise be accepted and never read.")
        if dataclasses.is_dataclass(value):
            refuse_unknown_keys(value, f"{key}.")


def resolved(recipe: RecipeConfig) -> RecipeConfig:
    """A copy of `recipe` with every interpolation (e.g. `${now:...}` set from Python) resolved."""
    return to_recipe(OmegaConf.structured(recipe))


def with_run_dir(recipe: RecipeConfig, run_dir: str) -> RecipeConfig:
    updated = copy.deepcopy(recipe)
    updated.train.run_dir = run_dir
    return updated


def without_environment_values(recipe: RecipeConfig) -> RecipeConfig:
    """A copy with the values of `executor.*.env_vars` masked, their names kept: the values reach
    the job through its environment (the launchers), never through a file or a printout."""
    updated = copy.deepcopy(recipe)
    for env_vars in (updated.executor.slurm.env_vars, updated.executor.kubernetes.env_vars):
        for name in env_vars:
            env_vars[name] = MASK
    return updated


def recipe_to_yaml(recipe: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def recipe_from_text(text: str) -> RecipeConfig:
    return to_recipe(OmegaConf.create(text))


def recipe_from_yaml(path: str | Path) -> RecipeConfig:
    return to_recipe(OmegaConf.load(path))
