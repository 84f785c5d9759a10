"""Recipe -> validated pieces: the effective model config and the checks that run
before any job starts (so bad input fails fast, with the key named)."""

from __future__ import annotations

import dataclasses

from falcon_h1.config import FalconH1Config, resolve
from recipes.config import RecipeConfig

PRECISIONS = ("auto", "bf16", "fp32")
EXECUTOR_KINDS = ("local", "slurm", "kubernetes")
RECOMPUTE = ("none", "selective", "full")


class RecipeError(ValueError):
    """A recipe value that cannot run; the message names the key, value and what is allowed."""


def _fail(key: str, value, allowed: str) -> None:
    raise RecipeError(f"{key} = {value!r} is not allowed: {allowed}.")


def effective_model_config(recipe: RecipeConfig) -> FalconH1Config:
    """The model preset with the recipe's µP overrides applied (null keeps the preset's value)."""
    overrides = {k: v for k, v in dataclasses.asdict(recipe.mup).items() if v is not None}
    return dataclasses.replace(recipe.model, **{k: list(v) if isinstance(v, (list, tuple)) else v
                                                for k, v in overrides.items()})


def resolve_precision(precision: str) -> str:
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def data_parallel_size(recipe: RecipeConfig, world_size: int) -> int:
    p = recipe.parallel
    return world_size // (p.tp * p.pp)


def validate_recipe(recipe: RecipeConfig) -> FalconH1Config:
    """Every check that can fail before any process starts; returns the resolved model config."""
    p, t = recipe.parallel, recipe.train
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)):
        if not isinstance(value, int) or value < 1:
            _fail(key, value, "a positive integer")
    model_cfg = resolve(effective_model_config(recipe), p.tp)
    if model_cfg.num_hidden_layers % p.pp:
        _fail("parallel.pp", p.pp, f"a divisor of model.num_hidden_layers = {model_cfg.num_hidden_layers}")
    if t.precision not in PRECISIONS:
        _fail("train.precision", t.precision, f"one of {PRECISIONS}")
    if t.recompute not in RECOMPUTE:
        _fail("train.recompute", t.recompute, f"one of {RECOMPUTE}")
    for key in ("max_steps", "micro_batch_size", "global_batch_size"):
        value = getattr(t, key)
        if not isinstance(value, int) or value < 1:
            _fail(f"train.{key}", value, "a positive integer")
    from recipes.schedules import validate_train_schedule

    validate_train_schedule(t)
    if recipe.data.seq_length < 1 or recipe.data.seq_length > model_cfg.max_position_embeddings:
        _fail("data.seq_length", recipe.data.seq_length,
              f"1 .. model.max_position_embeddings = {model_cfg.max_position_embeddings}")
    if recipe.executor.kind not in EXECUTOR_KINDS:
        _fail("executor.kind", recipe.executor.kind, f"one of {EXECUTOR_KINDS}")
    if recipe.bitnet.enabled:
        from bitnet.layers import validate_bitnet_layers

        validate_bitnet_layers(recipe.bitnet)
    from recipes.data import validate_data_config

    validate_data_config(recipe.data)
    return model_cfg


def validate_parallel_layout(recipe: RecipeConfig, world_size: int) -> None:
    """The checks that need the number of processes (known once the job has started)."""
    p, t = recipe.parallel, recipe.train
    if world_size % (p.tp * p.pp):
        _fail("parallel.tp", p.tp, f"tp * pp = {p.tp * p.pp} dividing the {world_size} processes")
    dp = data_parallel_size(recipe, world_size)
    if p.dp is not None and p.dp != dp:
        _fail("parallel.dp", p.dp, f"world_size / (tp * pp) = {dp} (or null)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail("train.global_batch_size", t.global_batch_size,
              f"a multiple of train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}")
