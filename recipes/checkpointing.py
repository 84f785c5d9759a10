"""Save and resume the whole training state with Megatron's distributed checkpointing.

Layout under `ckpt_root` (the one Megatron-LM uses, so its tools can read it):

    iter_0000050/                      one `torch_dist` checkpoint per saved step
      checksums.json                   size and SHA-256 of each of its files, written last
    latest_checkpointed_iteration.txt  the step of the newest complete checkpoint

A checkpoint is written to `iter_XXXXXXX.tmp/`, its checksums are added once every
rank has finished, it is renamed to `iter_XXXXXXX/`, and only then is
`latest_checkpointed_iteration.txt` replaced (write-then-rename), so a job killed
mid-save leaves the previous checkpoint as the latest one. Loading verifies the
checksums first: a damaged or incomplete newest checkpoint is reported (path and
reason) and the newest one that verifies is loaded instead. A save that fills the
disk says so and leaves the previous checkpoint the latest; `keep` deletes all but
the newest N after each save (see `recipes.checkpoint_files`).

What is saved: the model (sharded, so it loads at another tensor/pipeline/data
parallel size), the optimizer's sharded state, the lr scheduler, the step, the
caller's `extra` dict (e.g. the data position; it must be the same on all ranks)
and every rank's RNG states (Python, NumPy, torch CPU and CUDA, Megatron's
tensor-parallel RNG tracker). RNG states are only restored when the parallel
layout is unchanged; they cannot be mapped onto a different one.

Why `dist_checkpointing.save` hung on CPU (2 gloo processes) and what we change:

1. Megatron's torch_dist writer collects its write results through
   `filesystem_async.get_write_results_queue()`, which starts a
   `multiprocessing.get_context("spawn").Manager()` on the first save. A spawned
   process re-imports the `__main__` script; a worker script without an
   `if __name__ == "__main__"` guard re-runs `init_process_group` there and blocks,
   and the parent waits forever for the manager to start. Even with the guard
   the spawn costs a fresh interpreter importing torch and Megatron. Saves here
   are synchronous (the writer runs in this process), so we hand the writer an
   in-process `queue.Queue`.
2. The writer's `preload_tensors` calls `torch.cuda.synchronize()` unconditionally;
   on a host without CUDA we route it to the no-op `torch.cpu.synchronize()`.
3. The writer logs memory with `psutil`, which megatron-core does not declare as a
   dependency: without it every save fails ("psutil is not installed").

Megatron 0.19.2's distributed optimizer also needs help to load with torch's
AdamW (the optimizer Megatron uses without TE/Apex, on GPU too): its default
format cannot be built at all, a fresh optimizer has no state to load into, and
the restored AdamW step is wrong; see DISTRIBUTED_OPTIMIZER_FORMATS,
`_allocate_distributed_optimizer_state` and `_load_optimizer_state`.

Saving uses Megatron's `FullyParallelSaveStrategyWrapper` (replicated tensors are
written once, spread over the data-parallel ranks). Loading uses the plain
strategy: the fully parallel load exchanges tensors with `.cuda()` (CUDA only).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import queue
import random
import shutil
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from falcon_h1.compat import enable_cpu_megatron
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from recipes.checkpoint_files import (LATEST_FILE, MANIFEST, checkpoint_dir, digests, disk_full_message,
                                      files_hashed_by, fsync_dir, latest_pointer_step, prune,
                                      published_checkpoints, read_manifest, share_of_manifest,
                                      validate_keep_checkpoints, verification_problems, write_manifest)

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version
# Megatron's distributed optimizer formats: "fully_reshardable" loads at any
# TP/PP/DP size but gathers each model-parallel rank's optimizer state on its DP
# rank 0 while saving; "dp_reshardable" saves fully in parallel but only changes
# of the DP size are allowed on load. (0.19.2's default, "fully_sharded_model_space",
# fails: "ShardedTensor.flattened_range is not supported".) The plain optimizer's
# state is sharded like the model and always reshards.
DISTRIBUTED_OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
# Errors of reading a checkpoint's bytes (not of a model that does not match them); torch's own
# messages for these advise an unsafe `weights_only=False` load, which must not reach the user.
_UNREADABLE = (pickle.UnpicklingError, EOFError, OSError, CheckpointException)
# torch_dist stores each tensor as its own torch.save record: ~1.6 KB of headers on top of the data.
_STORED_TENSOR_OVERHEAD = 1600


class CheckpointError(RuntimeError):
    """No checkpoint under the root can be loaded; the message names each one and why."""


class CheckpointDiskFull(OSError):
    """A save ran out of disk space (or quota); the previous checkpoint stays the latest."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def save_checkpoint(
    ckpt_root: Union[str, Path],
    step: int,
    model_chunks,
    optimizer,
    scheduler,
    extra: Optional[dict] = None,
    distributed_optimizer_format: str = "fully_reshardable",
    keep: Optional[int] = None,
) -> Path:
    """Write `ckpt_root/iter_{step:07d}` on all ranks; returns its path.

    Call on every rank. `model_chunks`: the model or its list of virtual-pipeline
    chunks, DDP-wrapped or not. `optimizer` / `scheduler` may be None.
    `distributed_optimizer_format`: see DISTRIBUTED_OPTIMIZER_FORMATS. `keep`: after
    the save, delete all but the newest `keep` checkpoints (None keeps every one).
    Raises CheckpointDiskFull when the disk fills up (the partial save is removed).
    """
    if distributed_optimizer_format not in DISTRIBUTED_OPTIMIZER_FORMATS:
        raise ValueError(
            f"distributed_optimizer_format = {distributed_optimizer_format!r}; "
            f"allowed: {', '.join(DISTRIBUTED_OPTIMIZER_FORMATS)}."
        )
    if keep is not None:
        validate_keep_checkpoints(keep)
    _make_synchronous_save_work_everywhere()
    final_dir = checkpoint_dir(ckpt_root, step)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a save that was killed
        tmp_dir.mkdir(parents=True)
    dist.barrier()

    content = {"distrib_optim_sharding_type": distributed_optimizer_format}
    state = _model_and_optimizer_state(model_chunks, optimizer, content, is_loading=False)
    state.update(
        iteration=step,
        checkpoint_version=CHECKPOINT_VERSION,
        parallel_layout=_parallel_layout(),
        extra=dict(extra or {}),
        rng_state=_rng_state_sharded_object(_gather_rng_states_over_dp()),
    )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    needed_bytes = _checkpoint_bytes(state)

    save_strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    try:
        # Ends with a barrier. The content metadata tells the loader which format to ask for.
        dist_checkpointing.save(state, str(tmp_dir), save_strategy, content_metadata=content)
        _write_checksums(tmp_dir, step)
        if dist.get_rank() == 0:
            _publish(tmp_dir, final_dir, step)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        full = disk_full_message(error, tmp_dir, needed_bytes)
        if full is None:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = latest_pointer_step(ckpt_root)
        kept = (f"the latest checkpoint stays {checkpoint_dir(ckpt_root, previous)} (step {previous})"
                if previous is not None else "no earlier checkpoint exists")
        raise CheckpointDiskFull(
            f"saving step {step} failed: {full}; the partial save was removed and {kept}. Free space there, "
            "or keep fewer checkpoints (train.keep_checkpoints), then rerun to resume."
        ) from None
    dist.barrier()
    if keep is not None and dist.get_rank() == 0:
        prune(ckpt_root, keep, step)
    return final_dir


def load_latest_checkpoint(
    ckpt_root: Union[str, Path], model_chunks, optimizer, scheduler, train_to_step: Optional[int] = None
) -> Optional[tuple[int, dict]]:
    """Restore the newest complete, verified checkpoint under `ckpt_root` into the given objects.

    Returns `(step, extra)`, or None when `ckpt_root` holds no checkpoint yet; raises
    CheckpointError when it holds some but none verifies. `train_to_step`: the step a
    resumed run trains to; rank 0 prints "resumed from step N (path)" when N is before it.
    The model may be laid out at other tensor/pipeline/data parallel sizes than
    the saved one; so may the optimizer state, except a distributed optimizer's
    saved as "dp_reshardable" (then only the DP size may change).
    """
    _make_synchronous_save_work_everywhere()
    candidates = published_checkpoints(ckpt_root)
    if not candidates:
        return None
    ckpt_dir = _newest_verified(Path(ckpt_root), candidates)

    common = _read(ckpt_dir, dist_checkpointing.load_common_state_dict, str(ckpt_dir))
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    same_layout = common.get("parallel_layout") == _parallel_layout()
    state = _model_and_optimizer_state(model_chunks, optimizer, content, is_loading=True)
    if same_layout:
        state["rng_state"] = _rng_state_sharded_object(None)
    else:
        logger.warning(
            "Checkpoint %s was saved with parallel layout %s, now %s: weights and optimizer "
            "state are resharded, RNG states start fresh.",
            ckpt_dir, common.get("parallel_layout"), _parallel_layout(),
        )
    loaded = _read(ckpt_dir, dist_checkpointing.load, state, str(ckpt_dir),
                   get_default_load_sharded_strategy(str(ckpt_dir)))

    for key, chunk in _model_keys(model_chunks):
        chunk.load_state_dict(loaded[key])
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"][parallel_state.get_data_parallel_rank(with_context_parallel=True)])
    if train_to_step is not None and loaded["iteration"] < train_to_step and dist.get_rank() == 0:
        print(f"resumed from step {loaded['iteration']} ({ckpt_dir})", flush=True)
    return loaded["iteration"], loaded["extra"]


def _newest_verified(root: Path, candidates: list[tuple[int, Path]]) -> Path:
    """The newest published checkpoint whose files match their checksums (every rank checks a
    share and all agree); the ones passed over are reported with what is wrong with them."""
    rejected = []
    pointer = latest_pointer_step(root)
    if pointer is None:
        rejected.append((root / LATEST_FILE, "missing or unreadable, so every iter_* directory was considered"))
    elif candidates[0][0] != pointer:
        rejected.append((checkpoint_dir(root, pointer), f"named by {LATEST_FILE} but missing"))
    for _, ckpt_dir in candidates:
        problems = _checksum_problems(ckpt_dir)
        if not problems:
            if rejected and dist.get_rank() == 0:
                logger.warning("Damaged or incomplete checkpoint(s) skipped: %s. Resuming from the newest "
                               "checkpoint that verifies: %s.", "; ".join(f"{p}: {why}" for p, why in rejected),
                               ckpt_dir)
            return ckpt_dir
        rejected.append((ckpt_dir, "; ".join(problems)))
    raise CheckpointError(
        f"no checkpoint under {root} can be loaded: "
        + "; ".join(f"{path}: {why}" for path, why in rejected)
        + ". Ways out: restore the damaged files; or move the damaged iter_* directories away and rerun "
        "(it resumes from the newest one left, or starts at step 0 when none is); or start a new run in "
        "another train.run_dir, with train.load_dir for initial weights."
    )


def _checksum_problems(ckpt_dir: Path) -> list[str]:
    """What is wrong with `ckpt_dir` against its checksums.json, agreed over all ranks."""
    manifest, unreadable = read_manifest(ckpt_dir)
    if unreadable:
        return [unreadable]
    if manifest is None:
        if not (ckpt_dir / ".metadata").is_file():
            return [f"no {MANIFEST} and no .metadata: not a complete checkpoint"]
        if dist.get_rank() == 0:
            logger.warning("%s has no %s (saved before checkpoints carried checksums): loading it unverified.",
                           ckpt_dir, MANIFEST)
        return []
    rank, world = dist.get_rank(), dist.get_world_size()
    local = verification_problems(ckpt_dir, manifest, share_of_manifest(manifest, rank, world))
    every_rank = [None] * world
    dist.all_gather_object(every_rank, local)
    return sorted({problem for problems in every_rank for problem in problems})


def _read(ckpt_dir: Path, read, *args):
    """`read(*args)`, with an error about the checkpoint's bytes named by its path."""
    try:
        return read(*args)
    except BaseException as error:
        if not (isinstance(error, _UNREADABLE) or "weights_only" in str(error)):
            raise
        reason = " ".join(line.strip() for line in str(error).splitlines()
                          if line.strip() and "weights_only" not in line)[:500]
        raise CheckpointError(
            f"{ckpt_dir} cannot be read ({type(error).__name__}: {reason or 'no details'}); it has no "
            f"{MANIFEST} to tell which file is damaged, or it was damaged after it was verified. Move it away "
            "and rerun to resume from the previous checkpoint."
        ) from None


def _write_checksums(directory: Path, step: int) -> None:
    """Every rank hashes the files it wrote; rank 0 writes them all into checksums.json."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = digests(directory, files_hashed_by(directory, rank, world))
    every_rank = [None] * world
    dist.all_gather_object(every_rank, mine)
    if rank == 0:
        write_manifest(directory, {name: entry for part in every_rank for name, entry in part.items()}, step)


def _checkpoint_bytes(state: dict) -> int:
    """About the bytes a save of `state` writes: every tensor shard once (its main replica)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    local = 0
    for value in nested_values(state):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and is_main_replica(value.replica_id):
            if isinstance(value.data, torch.Tensor):
                local += value.data.numel() * value.data.element_size() + _STORED_TENSOR_OVERHEAD
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, local)
    return sum(every_rank)


# --------------------------------------------------------------------------------------


def _model_keys(model_chunks) -> list[tuple[str, torch.nn.Module]]:
    """Megatron-LM's keys: "model", or "model0", "model1", ... for virtual pipeline chunks."""
    chunks = unwrap_model(list(model_chunks) if isinstance(model_chunks, Sequence) else [model_chunks])
    if len(chunks) == 1:
        return [("model", chunks[0])]
    return [(f"model{index}", chunk) for index, chunk in enumerate(chunks)]


def _model_and_optimizer_state(model_chunks, optimizer, content: dict, is_loading: bool) -> dict:
    metadata = {**content, "chained_optim_avoid_prefix": True}
    state = {key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in _model_keys(model_chunks)}
    if optimizer is not None:
        if is_loading:
            _allocate_distributed_optimizer_state(optimizer)
        with _fp32_params_numbered_as_the_optimizer_does(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


@contextmanager
def _fp32_params_numbered_as_the_optimizer_does(optimizer):
    """Let Megatron's bf16 optimizers checkpoint a model that also has fp32 parameters.

    Falcon-H1 keeps A_log, D and dt_bias in fp32 inside a bf16 model, and Megatron 0.19.2
    numbers such mixed groups inconsistently when it builds or loads a checkpoint, so one
    parameter's state was paired with another's shape ("Optimizer shape (8,) does not match
    model shape (128,)"; "size of tensor a (64) must match ... (4)"):
    * `Float16OptimizerWithFloat16Params` keeps the fp32 parameters in its param groups (as
      themselves) but numbers the checkpoint by `float16_groups`, which lacks them. While this is
      open, each group lists every parameter in param-group order, an fp32 one as its own main
      copy; loading then copies the saved fp32 values into those parameters themselves.
    * `DistributedOptimizer` puts a group's fp32 shards before its bf16 ones in the inner
      optimizer, but `model_param_group_index_map` keeps the model's interleaved order. While
      this is open, the map points at each parameter's own shard.
    Training itself pairs the groups correctly and is not touched.
    """
    megatron_optimizer = getattr(optimizer, "unwrapped", optimizer)
    replacements = []  # (inner optimizer, {attribute: value while open}), all built before any is set
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        if hasattr(inner, "fp32_from_float16_groups") and hasattr(inner, "float16_groups"):
            model_groups, main_groups = [], []
            for group, model_params, main_params in zip(inner.optimizer.param_groups, inner.float16_groups,
                                                        inner.fp32_from_float16_groups):
                model_of_main = {id(main): model for main, model in zip(main_params, model_params)}
                main_groups.append(list(group["params"]))
                model_groups.append([model_of_main.get(id(param), param) for param in group["params"]])
            replacements.append((inner, {"float16_groups": model_groups, "fp32_from_float16_groups": main_groups}))
        elif hasattr(inner, "model_param_group_index_map") and hasattr(inner, "shard_fp32_groups"):
            position = {id(param): (g, i) for g, group in enumerate(inner.optimizer.param_groups)
                        for i, param in enumerate(group["params"])}
            index_map = {}
            for pairs in ((inner.model_fp32_groups, inner.shard_fp32_groups),
                          (inner.model_float16_groups, inner.shard_fp32_from_float16_groups)):
                for model_params, shards in zip(*pairs):
                    for model_param, shard in zip(model_params, shards):
                        if id(shard) not in position:
                            raise NotImplementedError(
                                "checkpointing a bf16 model with fp32 parameters supports Megatron's distributed "
                                "optimizer with fp32 main shards only (no use_precision_aware_optimizer).")
                        index_map[model_param] = position[id(shard)]
            replacements.append((inner, {"model_param_group_index_map": index_map}))
    saved = [(inner, {name: getattr(inner, name) for name in values}) for inner, values in replacements]
    try:
        for inner, values in replacements:
            for name, value in values.items():
                setattr(inner, name, value)
        yield
    finally:
        for inner, values in saved:
            for name, value in values.items():
                setattr(inner, name, value)


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors before loading into them.

    Megatron's DistributedOptimizer builds its loading state dict from the inner
    optimizer's state, which torch's AdamW (used when TE/Apex are absent) creates
    only on its first step; Megatron's `_init_optimizer_states_with_dummy_values`
    takes that step with zero gradients. lr and weight decay are zeroed around it
    so not even a decay step touches the weights.
    """
    megatron_optimizer = getattr(optimizer, "unwrapped", optimizer)
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        allocate = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if allocate is None or len(inner.optimizer.state) > 0:
            continue
        groups = inner.optimizer.param_groups
        saved = [(group["lr"], group["weight_decay"]) for group in groups]
        for group in groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        allocate()
        for group, (lr, weight_decay) in zip(groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay


def _load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, around Megatron 0.19.2 bugs in the distributed optimizer.

    Megatron restores the step of torch's AdamW (used when TE/Apex are absent;
    they keep no per-parameter step) from the saved param groups, then copies the
    per-parameter tensors, where AdamW also keeps a tensor "step":
    * "fully_reshardable" has no "step" among them: KeyError('step');
    * "dp_reshardable" has one, but it is the freshly allocated state's, not the
      saved one: the step count silently went back to 1.
    The per-parameter copy now skips "step" (and any key the checkpoint lacks, as
    Megatron already skips non-tensor entries), so the param groups' step stands.

    A second bug on the same path (any distributed optimizer format): Megatron
    restores torch AdamW's "step" as ONE tensor shared by every parameter's state,
    and AdamW increments each parameter's step in place, so after a resume the
    shared counter advanced once per parameter per step and the bias corrections
    were wrong. Each parameter gets its own copy back.

    The run's choice of torch's fused AdamW (train.fused_optimizer) survives the load, whatever
    the checkpoint was saved with.
    """
    from recipes.optim import fused_adamw_enabled, set_fused_adamw

    megatron_optimizer = getattr(optimizer, "unwrapped", optimizer)
    fused = fused_adamw_enabled(megatron_optimizer)
    patched = []
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        set_states = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if set_states is not None:
            inner._set_main_param_and_optimizer_states = (
                lambda model_param, tensors, set_states=set_states: set_states(
                    model_param, defaultdict(lambda: None, _without_step(tensors))
                )
            )
            patched.append(inner)
    _give_saved_param_groups_this_runs_schedule(megatron_optimizer, state)
    try:
        # no_grad: 0.19.2's dp_reshardable loader (unlike the others) lacks it and
        # copies into fp32 main params that are views of leaf parameters.
        with torch.no_grad(), _fp32_params_numbered_as_the_optimizer_does(optimizer):
            optimizer.load_state_dict(state)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        for param_state in inner.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
    # torch's load_state_dict took the saved param groups' fused/foreach flags: the run's own stand
    set_fused_adamw(megatron_optimizer, fused)


def _give_saved_param_groups_this_runs_schedule(megatron_optimizer, state) -> None:
    """Let a resumed run change train.lr, train.min_lr and train.weight_decay.

    Megatron 0.19.2 keeps each param group's schedule (max_lr, min_lr, start_wd, end_wd) in the
    group and in the checkpoint, pairs saved groups with the current ones by a key that includes
    those values, and fails when one changed ("Could not find parameter group with key ... in
    loaded checkpoint"); had it paired them, the saved values would have driven the schedule.
    Each saved group takes the schedule values of the current group it corresponds to (same
    weight-decay / lr multipliers and flags), so the pairing holds and the recipe's schedule
    applies from the resumed step on, as `recipes.schedules.build_scheduler` intends.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    schedule_keys = ("max_lr", "min_lr", "start_wd", "end_wd")
    structure_keys = [key for key in param_group_identifier_keys if key not in schedule_keys]
    current: dict[tuple, set] = defaultdict(set)  # structure -> the schedule values (only keys a group sets)
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        for group in inner.optimizer.param_groups:
            schedule = tuple((key, group[key]) for key in schedule_keys if key in group)
            current[tuple(group.get(key) for key in structure_keys)].add(schedule)

    def visit(node) -> None:
        if isinstance(node, dict):
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                if isinstance(group, dict):
                    matches = current.get(tuple(group.get(key) for key in structure_keys), set())
                    if len(matches) == 1:
                        for key in schedule_keys:
                            group.pop(key, None)
                        group.update(next(iter(matches)))
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(state)


def _without_step(tensors: dict) -> dict:
    return {key: value for key, value in tensors.items() if key != "step"}


def _parallel_layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    }


def _rng_state_sharded_object(dp_rng_states: Optional[list]) -> ShardedObject:
    """Megatron-LM's layout: one object per (pp, tp) rank holding the list over DP ranks."""
    return ShardedObject(
        "rng_state",
        dp_rng_states,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _gather_rng_states_over_dp() -> list:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": _tracker_states_as_tensors(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, state, group=group)
    return states


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state["cuda_rng_state"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    _restore_tracker_states(state["rng_tracker_states"])


def _tracker_states_as_tensors(states: dict) -> dict:
    """The tracker's states as the byte tensors an eager run holds. A CUDA-graphed run's tracker
    holds generator objects (registered with the graph); saved as tensors, its checkpoints load
    anywhere, also on a host without a GPU, where a CUDA generator cannot be unpickled."""
    return {name: state.get_state() if isinstance(state, torch.Generator) else state
            for name, state in states.items()}


def _restore_tracker_states(saved: dict) -> None:
    """Set the tracker to saved byte-tensor states; where it holds generator objects (a graphed
    run), each generator is set in place, so the objects a CUDA graph registers stay the same."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    live = tracker.get_states()
    restored = {}
    for name, state in saved.items():
        current = live.get(name)
        if isinstance(current, torch.Generator) and isinstance(state, torch.Tensor):
            current.set_state(state)
            state = current
        restored[name] = state
    tracker.set_states(restored)


def _publish(tmp_dir: Path, final_dir: Path, step: int) -> None:
    """Make a finished checkpoint visible: rename the directory, then point `latest` at it."""
    if final_dir.exists():  # re-saving a step: keep the old one until the new one is in place
        old_dir = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old_dir, ignore_errors=True)
        final_dir.rename(old_dir)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old_dir)
    else:
        tmp_dir.rename(final_dir)
    latest = final_dir.parent / LATEST_FILE
    latest_tmp = latest.with_name(LATEST_FILE + ".tmp")
    with open(latest_tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, latest)
    fsync_dir(final_dir.parent)


# --------------------------------------------------------------------------------------
# Shims for Megatron's torch_dist writer (see the module docstring).


def _make_synchronous_save_work_everywhere() -> None:
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    enable_cpu_megatron()  # the writer's torch.cuda.synchronize()
