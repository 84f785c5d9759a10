"""Whether a run's gradients and optimizer state fit on its GPU.

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


def gradient_and_optimizer_bytes(params, optimizer_shards: int) -> int:
    """Bytes this rank's DDP gradient buffer and AdamW state take for `params` (its weight
    shards), the optimizer state split over `optimizer_shards` ranks (the distributed optimizer
    over data x context parallelism; 1 without it)."""
    gradients = state = 0
    for p in params:
        gradients += p.numel() * GRADIENT_BYTES
        state += p.numel() * (ADAM_MOMENT_BYTES + (MAIN_WEIGHT_BYTES if p.dtype in (torch.bfloat16, torch.float16) else 0))
    return gradients + -(-state // optimizer_shards)


def check_training_state_fits(params, optimizer_shards: int, free_bytes: int, total_bytes: int,
                              tp: int, pp: int, distributed_optimizer: bool) -> None:
    """Refuses, naming the settings that shrink it, when the gradients and optimizer state of this
    rank's `params` need more than the `free_bytes` left on its GPU (of `total_bytes`)."""
    params = list(params)
    need = gradient_and_optimizer_bytes(params, optimizer_shards)
    if need <= free_bytes:
        return
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    count = sum(p.numel() for p in params)
    shard = (f"more data-parallel ranks (the distributed optimizer splits its state over the "
             f"{optimizer_shards} data x context-parallel ranks now)" if distributed_optimizer else
             "parallel.distributed_optimizer=true with more data-parallel ranks (it splits the optimizer "
             "state, 12 bytes a bf16 parameter, over them)")
    raise ConfigValueError(
        "parallel.tp", tp, "a layout whose per-GPU share fits",
        message=f"The training state does not fit on this GPU: this rank holds {count:,} parameters "
                f"(parallel.tp = {tp}, parallel.pp = {pp}), whose fp32 gradients and AdamW state need "
                f"{gib(need)} more, but {gib(free_bytes)} of the GPU's {gib(total_bytes)} is free after "
                f"the weights (activations come on top). Allowed: a larger parallel.tp or parallel.pp "
                f"(fewer parameters per GPU), or {shard}.")
