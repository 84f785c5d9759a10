"""Recipe -> validated pieces: the effective model config and the checks that run
before any job starts (so bad input fails fast, with the key named)."""

from __future__ import annotations

import copy

from falcon_h1.config import FalconH1Config, resolve
from falcon_h1.mup import MODES, MULTIPLIER_FIELDS
from recipes.config import RecipeConfig

PRECISIONS = ("auto", "bf16", "fp32")
EXECUTOR_KINDS = ("local", "slurm", "kubernetes")
RECOMPUTE = ("none", "selective", "full")


class RecipeError(ValueError):
    """A recipe value that cannot run; the message names the key, value and what is allowed."""


def _fail(key: str, value, allowed: str) -> None:
    raise RecipeError(f"{key} = {value!r} is not allowed: {allowed}.")


def effective_model_config(recipe: RecipeConfig) -> FalconH1Config:
    """The model config the recipe trains (its µP multipliers were resolved at composition)."""
    if recipe.mup.mode not in MODES:
        _fail("mup.mode", recipe.mup.mode, f"one of {MODES} (the config group mup=preset|derived|unit)")
    return copy.deepcopy(recipe.model)


def mup_report(recipe: RecipeConfig) -> list[str]:
    """One line per multiplier that differs from what `mup.mode` gives: the explicit overrides
    that win over the mode (nothing to compare against for mode preset on a non-preset model)."""
    from falcon_h1.presets import PRESETS
    from recipes.hydra_presets import multipliers_for_mode

    mode, model = recipe.mup.mode, effective_model_config(recipe)
    preset = PRESETS.get(model.name)
    if mode == "preset" and preset is None:
        return []
    expected = multipliers_for_mode(mode, preset, model)
    source = f"preset {model.name}" if mode == "preset" else f"mup = {mode}"
    return [f"model.{name} = {getattr(model, name)!r} set explicitly, kept over {source}'s {value!r}"
            for name, value in expected.items() if getattr(model, name) != value]


# Keys that moved: the µP multipliers have one key each, in `model.` (HF config names).
_MOVED_KEYS = {f"mup.{name}": f"model.{name}" for name in MULTIPLIER_FIELDS}


def check_overrides(overrides) -> None:
    """Refuse override strings that use a moved key, naming the key to use instead."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in _MOVED_KEYS:
            _fail(key, override.split("=", 1)[1] if "=" in override else None,
                  f"no longer a key: set {_MOVED_KEYS[key]} (one key per multiplier); "
                  "mup= chooses where the others come from: preset | derived | unit")


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
    from recipes.generate import validate_sample_settings

    validate_sample_settings(t)
    from recipes.checkpoint_files import validate_keep_checkpoints

    validate_keep_checkpoints(t.keep_checkpoints)
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
    validate_cuda_graph(recipe)
    return model_cfg


def validate_cuda_graph(recipe: RecipeConfig) -> None:
    """What Megatron's full-iteration CUDA graph (train.cuda_graph) needs of the rest of the recipe.

    The graph captures forward, backward and the gradient all-reduce of one step and replays
    them: whatever the captured region does must be GPU work on fixed buffers, with no host
    synchronisation and no host-to-device copy from pageable memory.
    """
    p, t = recipe.parallel, recipe.train
    if not t.cuda_graph:
        return
    when = "with train.cuda_graph = true"
    warmup = t.cuda_graph_warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        _fail("train.cuda_graph_warmup_steps", warmup,
              f"an integer >= 1 {when}: the eager steps before the capture compile and autotune the Triton "
              "kernels, create the NCCL communicators and fill the model's cached scales, none of which "
              "may happen inside a capture")
    if p.pp != 1:
        _fail("parallel.pp", p.pp,
              f"1 {when}: the pipeline schedule's point-to-point sends and receives between stages would "
              "have to be captured too, which this training loop does not support; use parallel.tp or "
              "data parallelism, or train.cuda_graph = false")
    if t.recompute != "none":
        _fail("train.recompute", t.recompute,
              f"'none' {when}: recomputation re-runs each block inside the backward pass under Megatron's "
              "reentrant checkpoint, which saves and restores RNG states on the host, and capturing that is "
              "not supported here; recompute with train.cuda_graph = false, or graph without recomputation")
    if recipe.bitnet.enabled and t.force_reference_kernels:
        _fail("train.force_reference_kernels", t.force_reference_kernels,
              f"false {when} and bitnet.enabled: the BitNet reference kernels build a tensor from a host "
              "number in every forward (a synchronous host-to-device copy, illegal during capture)")


def validate_cuda_graph_device(recipe: RecipeConfig, cuda_available: bool) -> None:
    """On the host that trains (not the one that submits the job): a CUDA graph needs a GPU."""
    if recipe.train.cuda_graph and not cuda_available:
        _fail("train.cuda_graph", recipe.train.cuda_graph,
              "false on a host without a CUDA device: a CUDA graph captures GPU kernels, and this "
              "process sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)")


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
