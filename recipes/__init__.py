"""Recipes: typed run configurations, the `falcon-train` CLI and the Python API."""

from recipes.api import compose_recipe, falcon_h1_pretrain, recipe_from_yaml, recipe_to_yaml, run
from recipes.config import RecipeConfig

__all__ = ["RecipeConfig", "compose_recipe", "falcon_h1_pretrain", "recipe_from_yaml", "recipe_to_yaml", "run"]
