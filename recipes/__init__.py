"""Recipes: typed run configurations, the `falcon-train` CLI and the Python API."""

from recipes.api import compose_recipe, falcon_h1_pretrain, falcon_h1_sft, run
from recipes.config import RecipeConfig
from recipes.recipe_file import recipe_from_yaml, recipe_to_yaml

__all__ = ["RecipeConfig", "compose_recipe", "falcon_h1_pretrain", "falcon_h1_sft", "recipe_from_yaml", "recipe_to_yaml", "run"]
