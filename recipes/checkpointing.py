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

Saves are synchronous and in-process (`falcon_h1.megatron_compat.dist_checkpointing` says
why Megatron 0.19.2's writer needs that). Megatron 0.19.2's optimizers also need help to save
a bf16 model with fp32 parameters and to load the distributed optimizer with torch's AdamW
(the optimizer Megatron uses without TE/Apex, on GPU too): its default format cannot be built
at all (see DISTRIBUTED_OPTIMIZER_FORMATS), and `falcon_h1.megatron_compat.optimizer_checkpoint`
holds the rest.

Saving uses Megatron's `FullyParallelSaveStrategyWrapper` (replicated tensors are
written once, spread over the data-parallel ranks). Loading uses the plain
strategy: the fully parallel load exchanges tensors with `.cuda()` (CUDA only).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from recipes.checkpoint_files import (LATEST_FILE, MANIFEST, checkpoint_dir, digests, disk_full_message,
                                      files_hashed_by, fsync_dir, latest_pointer_step, prune,
                                      published_checkpoints, read_manifest, share_of_manifest,
                                      validate_keep_checkpoints, verification_problems, write_manifest)
from recipes.run_errors import RunError
from falcon_h1.megatron_compat.dist_checkpointing import make_synchronous_save_work_everywhere
from falcon_h1.megatron_compat.optimizer_checkpoint import (
    allocate_distributed_optimizer_state,
    fp32_params_numbered_as_the_optimizer_does,
    load_optimizer_state,
)

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


class CheckpointError(RunError, RuntimeError):
    """No checkpoint under the root can be loaded; the message names each one and why."""


class CheckpointDiskFull(RunError, OSError):
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
    make_synchronous_save_work_everywhere()
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
    make_synchronous_save_work_everywhere()
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
        load_optimizer_state(optimizer, loaded["optimizer"])
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
            allocate_distributed_optimizer_state(optimizer)
        with fp32_params_numbered_as_the_optimizer_does(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


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
