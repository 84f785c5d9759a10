"""Whether a run's gradients and optimizer state fit on its GPU (and the offloaded share of the
optimizer state, train.optimizer_offload_fraction, in its host's memory).

Checked on each training process once the model's weights are on the GPU and before Megatron's
DDP and optimizer allocate the rest, so a model one GPU cannot hold (the 34B on one H200, the 7B
on an 80 GB card) stops with the settings that would make it fit instead of running out of
memory inside Megatron. What it counts is a lower bound of what training needs (no
activations), so it never refuses a run that would have fit.
"""

from __future__ import annotations

import torch

from falcon_h1.errors import ConfigValueError

GRADIENT_BYTES = 4  # Megatron DDP's fp32 main_grad buffer (grad_reduce_in_fp32)
ADAM_MOMENT_BYTES = 8  # exp_avg and exp_avg_sq in fp32
MAIN_WEIGHT_BYTES = 4  # the fp32 copy Megatron's optimizer keeps of each bf16/fp16 weight
# Per offloaded parameter, in host memory: its fp32 master weight (a bf16 one's copy, or an fp32
# one itself), the moments, and the pinned copy of its gradient the CPU's AdamW reads.
HOST_BYTES_PER_OFFLOADED = MAIN_WEIGHT_BYTES + ADAM_MOMENT_BYTES + GRADIENT_BYTES


def _counts(params) -> tuple[int, int]:
    """(gradient bytes, optimizer state bytes) of `params` when nothing is sharded or offloaded."""
    gradients = state = 0
    for p in params:
        gradients += p.numel() * GRADIENT_BYTES
        state += p.numel() * (ADAM_MOMENT_BYTES + (MAIN_WEIGHT_BYTES if p.dtype in (torch.bfloat16, torch.float16) else 0))
    return gradients, state


def gradient_and_optimizer_bytes(params, optimizer_shards: int, offload_fraction: float = 0.0) -> int:
    """Bytes this rank's DDP gradient buffer and AdamW state take on its GPU for `params` (its
    weight shards), the optimizer state split over `optimizer_shards` ranks (the distributed
    optimizer over data x context parallelism; 1 without it) and `offload_fraction` of this
    rank's share of it kept in host memory instead."""
    gradients, state = _counts(params)
    return gradients + round(-(-state // optimizer_shards) * (1 - offload_fraction))


def offloaded_optimizer_bytes(params, optimizer_shards: int, offload_fraction: float) -> int:
    """Host memory this rank's offloaded optimizer state takes (HOST_BYTES_PER_OFFLOADED each)."""
    count = sum(p.numel() for p in params)
    return round(-(-count // optimizer_shards) * offload_fraction * HOST_BYTES_PER_OFFLOADED)


def check_training_state_fits(params, optimizer_shards: int, free_bytes: int, total_bytes: int,
                              tp: int, pp: int, distributed_optimizer: bool, offload_fraction: float = 0.0,
                              host_free_bytes: int | None = None, ranks_per_host: int = 1) -> None:
    """Refuses, naming the settings that shrink it, when the gradients and optimizer state of this
    rank's `params` need more than the `free_bytes` left on its GPU (of `total_bytes`), or when the
    `ranks_per_host` ranks' offloaded state needs more than the host's `host_free_bytes` (None:
    not known, not checked)."""
    params = list(params)
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    if offload_fraction and host_free_bytes is not None:
        host_need = ranks_per_host * offloaded_optimizer_bytes(params, optimizer_shards, offload_fraction)
        if host_need > host_free_bytes:
            raise ConfigValueError(
                "train.optimizer_offload_fraction", offload_fraction, "a share whose host memory is available",
                message=f"train.optimizer_offload_fraction = {offload_fraction} keeps {gib(host_need)} of optimizer "
                        f"state in host memory ({HOST_BYTES_PER_OFFLOADED} bytes an offloaded parameter: its fp32 "
                        f"master weight, AdamW's moments and a pinned copy of its gradient; {ranks_per_host} "
                        f"training process(es) on this host), but {gib(host_free_bytes)} is available. Allowed: a "
                        f"smaller train.optimizer_offload_fraction (the rest stays on the GPU), or more hosts.")
    need = gradient_and_optimizer_bytes(params, optimizer_shards, offload_fraction)
    if need <= free_bytes:
        return
    count = sum(p.numel() for p in params)
    shard = (f"more data-parallel ranks (the distributed optimizer splits its state over the "
             f"{optimizer_shards} data x context-parallel ranks now)" if distributed_optimizer else
             "parallel.distributed_optimizer=true with more data-parallel ranks (it splits the optimizer "
             "state, 12 bytes a bf16 parameter, over them)")
    offload = ("a larger train.optimizer_offload_fraction" if offload_fraction else
               "train.optimizer_offload_fraction > 0 with parallel.distributed_optimizer=true (that share of "
               "the optimizer state is kept and stepped in host memory)")
    raise ConfigValueError(
        "parallel.tp", tp, "a layout whose per-GPU share fits",
        message=f"The training state does not fit on this GPU: this rank holds {count:,} parameters "
                f"(parallel.tp = {tp}, parallel.pp = {pp}), whose fp32 gradients and AdamW state need "
                f"{gib(need)} more on the GPU, but {gib(free_bytes)} of the GPU's {gib(total_bytes)} is free "
                f"after the weights (activations come on top). Allowed: a larger parallel.tp or parallel.pp "
                f"(fewer parameters per GPU), {shard}, or {offload}.")
