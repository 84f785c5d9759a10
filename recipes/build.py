"""Recipe -> validated pieces and the model: the checks that run before any job starts (so
bad input fails fast, with the key named), the effective model config, and the one function
that builds the model a recipe describes."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

from falcon_h1.config import FalconH1Config, check_recompute_layers, resolve
from falcon_h1.errors import ConfigValueError, is_int_at_least
from falcon_h1.mup import MODES, MULTIPLIER_FIELDS
from recipes.config import RecipeConfig
from recipes.profiling import validate_profile_window
from recipes.schedules import LrSchedule, checked_schedule

PRECISIONS = ("auto", "bf16", "fp32")
RECOMPUTE = ("none", "selective", "full")


class CheckedRecipe(NamedTuple):
    """What validating a recipe resolves: the model config to build and the lr schedule."""

    model_cfg: FalconH1Config
    schedule: LrSchedule


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigValueError(key, value, allowed)


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


def model_parallel_size(recipe: RecipeConfig) -> int:
    """Processes that hold one copy of the model between them: tp * pp * cp."""
    p = recipe.parallel
    return p.tp * p.pp * p.cp


def data_parallel_size(recipe: RecipeConfig, world_size: int) -> int:
    return world_size // model_parallel_size(recipe)


def validate_recipe(recipe: RecipeConfig) -> CheckedRecipe:
    """Every check of the model, parallel layout, training, data, BitNet and logger settings
    that can fail before any process starts (the executor's settings are the launcher's)."""
    from recipes.tracking import resolve_wandb_mode

    p, t = recipe.parallel, recipe.train
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp)):
        if not is_int_at_least(value, 1):
            _fail(key, value, "a positive integer")
    if p.dp is not None and not is_int_at_least(p.dp, 1):
        _fail("parallel.dp", p.dp, "null (world_size / (tp * pp * cp)) or a positive integer")
    if p.ddp_bucket_size is not None and (not isinstance(p.ddp_bucket_size, int) or p.ddp_bucket_size < 1):
        _fail("parallel.ddp_bucket_size", p.ddp_bucket_size, "null (Megatron's default) or a positive integer")
    model_cfg = resolve(effective_model_config(recipe), p.tp)
    if model_cfg.num_hidden_layers % p.pp:
        _fail("parallel.pp", p.pp, f"a divisor of model.num_hidden_layers = {model_cfg.num_hidden_layers}")
    if t.precision not in PRECISIONS:
        _fail("train.precision", t.precision, f"one of {PRECISIONS}")
    if t.recompute not in RECOMPUTE:
        _fail("train.recompute", t.recompute, f"one of {RECOMPUTE}")
    check_recompute_layers(t.recompute, t.recompute_layers, model_cfg.num_hidden_layers // p.pp,
                           field="train.recompute_layers")
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_iters"):
        value = getattr(t, key)
        if not is_int_at_least(value, 1):
            _fail(f"train.{key}", value, "a positive integer")
    if t.global_batch_size % t.micro_batch_size:
        _fail("train.global_batch_size", t.global_batch_size,
              f"a multiple of train.micro_batch_size = {t.micro_batch_size} (times the data-parallel size): "
              "each step accumulates whole micro-batches")
    for key, off in (("save_interval", "no checkpoints"), ("eval_interval", "no evaluation"),
                     ("exit_after_steps", "never")):
        value = getattr(t, key)
        if not is_int_at_least(value, 0):
            _fail(f"train.{key}", value, f"an integer >= 0 (0: {off})")
    schedule = checked_schedule(t)
    validate_adam(t)
    if not is_int_at_least(t.sample_tokens, 0):
        _fail("train.sample_tokens", t.sample_tokens, "an integer >= 0 (0: no sample at the end)")
    from recipes.checkpoint_files import validate_keep_checkpoints

    validate_keep_checkpoints(t.keep_checkpoints)
    if recipe.data.seq_length < 1 or recipe.data.seq_length > model_cfg.max_position_embeddings:
        _fail("data.seq_length", recipe.data.seq_length,
              f"1 .. model.max_position_embeddings = {model_cfg.max_position_embeddings}")
    validate_sequence_split(recipe, model_cfg)
    if recipe.bitnet.enabled:
        from bitnet.layers import validate_bitnet_config

        validate_bitnet_config(recipe.bitnet)
    from recipes.data import validate_data_config

    validate_data_config(recipe.data)
    if isinstance(recipe.data.num_workers, bool) or recipe.data.num_workers < 0:
        _fail("data.num_workers", recipe.data.num_workers, "an integer >= 0 (0: samples are read in the training process)")
    validate_load_dir(recipe)
    validate_chat_training(recipe)
    if recipe.logger.wandb:
        resolve_wandb_mode(recipe.logger.wandb_mode)
    validate_cuda_graph(recipe)
    validate_profile_window(t)
    validate_optimizer_offload(recipe)
    return CheckedRecipe(model_cfg, schedule)


def validate_adam(train_cfg) -> None:
    """AdamW's betas are decay rates of its moment averages, and eps keeps its update finite."""
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(train_cfg, key)
        if not 0 <= value < 1:
            _fail(f"train.{key}", value, "a number in [0, 1) (the decay rate of AdamW's moment average)")
    if not train_cfg.adam_eps > 0:
        _fail("train.adam_eps", train_cfg.adam_eps,
              "a number > 0 (it keeps AdamW's update finite where a gradient's second moment is 0)")


def validate_load_dir(recipe: RecipeConfig) -> None:
    """train.load_dir must exist where a local run reads it. A resumed run never reads it, and a
    remote job reads it on the cluster (where the worker checks it at start)."""
    from recipes.checkpoint_files import has_checkpoints

    load_dir, run_dir = recipe.train.load_dir, recipe.train.run_dir
    if load_dir is None or recipe.executor.kind != "local" or os.path.isdir(load_dir):
        return
    if recipe.train.resume and has_checkpoints(Path(run_dir) / "checkpoints"):
        return
    _fail("train.load_dir", load_dir, "null or an existing directory: a Hugging Face FalconH1 checkpoint "
          "(config.json + *.safetensors) or a falcon-train run directory"
          + ("" if os.path.isabs(load_dir) else f" (relative to {os.getcwd()})"))


def validate_sequence_split(recipe: RecipeConfig, model_cfg: FalconH1Config) -> None:
    """What context parallelism (parallel.cp) and sequence parallelism need of data.seq_length."""
    from falcon_h1.config import check_context_parallel

    p, seq = recipe.parallel, recipe.data.seq_length
    check_context_parallel(model_cfg, p.cp)
    if p.cp > 1:
        if seq % (2 * p.cp):
            _fail("data.seq_length", seq,
                  f"a multiple of 2 * parallel.cp = {2 * p.cp}: every sequence is cut into 2 * cp equal chunks "
                  "and each context-parallel rank holds two of them (chunks r and 2cp-1-r, balancing causal work)")
        halo = model_cfg.mamba_d_conv - 1
        if model_cfg.has_mamba and seq // (2 * p.cp) < halo:
            _fail("parallel.cp", p.cp,
                  f"at most data.seq_length / (2 * (model.mamba_d_conv - 1)) = {seq // (2 * halo)}: each of the "
                  f"2 * cp chunks ({seq // (2 * p.cp)} tokens here) must hold the {halo} conv inputs it hands to "
                  "the next chunk")
    if p.sequence_parallel and p.tp > 1 and (seq // p.cp) % p.tp:
        _fail("data.seq_length", seq,
              f"a multiple of parallel.cp * parallel.tp = {p.cp * p.tp} with parallel.sequence_parallel = true: "
              "each tensor-parallel rank holds an equal slice of the context-parallel shard")


def validate_chat_training(recipe: RecipeConfig) -> None:
    """What packed chat rows and the held-out exact-match score need of the rest of the recipe."""
    p, t, data_cfg = recipe.parallel, recipe.train, recipe.data
    if data_cfg.kind != "chat":
        return
    if data_cfg.packing and p.cp > 1:
        _fail("parallel.cp", p.cp,
              "1 with packed chat rows (data.packing = true): context parallelism splits each row into "
              "chunks without regard to its documents; set data.packing = false or parallel.cp = 1")
    if data_cfg.packing and t.cuda_graph:
        _fail("train.cuda_graph", t.cuda_graph,
              "false with packed chat rows (data.packing = true): where each row's documents start is read "
              "from its position_ids on the host every step, which a captured graph cannot do; set "
              "data.packing = false or train.cuda_graph = false")
    if data_cfg.heldout is not None and p.pp > 1:
        _fail("parallel.pp", p.pp,
              "1 with data.heldout: the held-out exact match reads the whole model's logits in one "
              "process group; leave data.heldout null under pipeline parallelism")


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
    if not is_int_at_least(warmup, 1):
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


# Why a run with train.optimizer_offload_fraction > 0 writes no checkpoint (validation and the stop
# on a signal both say it).
UNCHECKPOINTED_OFFLOAD = (
    "a run with train.optimizer_offload_fraction > 0 is not checkpointed: the checkpoint code here "
    "numbers the distributed optimizer's fp32 main shards, and the offloaded optimizer keeps its master "
    "weights inside Megatron's HybridDeviceOptimizer instead")


def validate_optimizer_offload(recipe: RecipeConfig) -> None:
    """What keeping part of the optimizer state in host memory (train.optimizer_offload_fraction)
    needs: Megatron offloads only its distributed optimizer's state, in its precision-aware form."""
    p, t = recipe.parallel, recipe.train
    fraction = t.optimizer_offload_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        _fail("train.optimizer_offload_fraction", fraction,
              "a number in [0, 1]: the share of the optimizer state kept in host memory (0 = none)")
    if fraction == 0:
        return
    if not p.distributed_optimizer:
        _fail("parallel.distributed_optimizer", p.distributed_optimizer,
              f"true with train.optimizer_offload_fraction = {fraction}: Megatron moves the distributed "
              "optimizer's state shards to the host (its HybridDeviceOptimizer); set "
              "parallel.distributed_optimizer = true or train.optimizer_offload_fraction = 0")
    if t.save_interval:
        _fail("train.save_interval", t.save_interval,
              f"0 with train.optimizer_offload_fraction = {fraction} ({UNCHECKPOINTED_OFFLOAD}); train without "
              "checkpoints, or keep the optimizer state on the GPU (train.optimizer_offload_fraction = 0, with "
              "more GPUs for a model whose state does not fit one)")
    if t.cuda_graph:
        _fail("train.cuda_graph", t.cuda_graph,
              f"false with train.optimizer_offload_fraction = {fraction}: the offloaded step copies "
              "gradients out and weights back on side streams between the replays, a combination this "
              "training loop does not support; use one or the other")


def validate_gpu_settings(recipe: RecipeConfig, cuda_available: bool) -> None:
    """On the host that trains (not the one that submits the job): the settings that need a GPU."""
    t = recipe.train
    if t.cuda_graph and not cuda_available:
        _fail("train.cuda_graph", t.cuda_graph,
              "false on a host without a CUDA device: a CUDA graph captures GPU kernels, and this "
              "process sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)")
    if t.optimizer_offload_fraction and not cuda_available:
        _fail("train.optimizer_offload_fraction", t.optimizer_offload_fraction,
              "0 on a host without a CUDA device: it moves optimizer state from the GPU to host memory, "
              "and this process sees no GPU (on CPU the whole state is in host memory already)")


def validate_parallel_layout(recipe: RecipeConfig, world_size: int) -> None:
    """The checks that need the number of processes (known once the job has started)."""
    p, t = recipe.parallel, recipe.train
    if world_size % model_parallel_size(recipe):
        key, value = ("parallel.cp", p.cp) if p.cp > 1 else ("parallel.tp", p.tp)
        _fail(key, value, f"tp * pp * cp = {p.tp} * {p.pp} * {p.cp} = {model_parallel_size(recipe)} "
              f"dividing the {world_size} processes")
    dp = data_parallel_size(recipe, world_size)
    if p.dp is not None and p.dp != dp:
        _fail("parallel.dp", p.dp, f"world_size / (tp * pp * cp) = {dp} (or null)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail("train.global_batch_size", t.global_batch_size,
              f"a multiple of train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}")


def build_model_for(recipe: RecipeConfig, model_cfg: FalconH1Config, **options):
    """`falcon_h1.model.build_model` for `recipe`: its linear spec (BitNet's layers where bitnet.*
    asks for them), precision and kernel choice.

    `train.force_reference_kernels` is applied here and nowhere else, as the model config's
    kernel backend, which the BitNet layers follow too. `options` pass on to build_model
    (sequence_parallel, recompute, seed, initialize).
    """
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model

    if recipe.train.force_reference_kernels:
        model_cfg = dataclasses.replace(model_cfg, kernel_backend="reference")
    return build_model(model_cfg, linears=falcon_h1_linear_spec(recipe.bitnet, model_cfg.kernel_backend),
                       precision=resolve_precision(recipe.train.precision), **options)
