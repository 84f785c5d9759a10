"""A run's trained model, loaded back from its run directory (for export, inference, fine-tuning
elsewhere); `recipes.api.load_trained_model` is the Python API's name for it."""

from __future__ import annotations

from pathlib import Path

from recipes.recipe_file import recipe_from_yaml


def load_trained_model(run_dir: str | Path, tp: int = 1):
    """The model of a finished or running job, built from run_dir/config.yaml and loaded
    from its latest checkpoint at tensor-parallel size `tp` (1: this process; more: one
    process per rank, under torchrun) and PP=1. Returns (model, recipe, step)."""
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from recipes.build import build_model_for, effective_model_config
    from recipes.checkpointing import load_latest_checkpoint

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; allowed: a run directory written by falcon-train.")
    recipe = recipe_from_yaml(config_file)
    initialize_parallel(tp=tp, pp=1, seed=recipe.train.seed)
    model = build_model_for(recipe, effective_model_config(recipe), initialize=False)
    loaded = load_latest_checkpoint(run_dir / "checkpoints", [model], None, None)
    if loaded is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no checkpoint yet.")
    model.eval()
    return model, recipe, loaded[0]
