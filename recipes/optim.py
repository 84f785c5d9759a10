"""Data-parallel wrapping and the optimizer: Megatron Core's own, on GPU and on CPU.

`wrap_model` returns Megatron's `DistributedDataParallel` and `build_optimizer`
returns Megatron's optimizer (`get_megatron_optimizer`: AdamW with decoupled
weight decay, no decay on biases and 1-D parameters, global grad-norm clipping
that counts tensor-parallel duplicates once, optional distributed optimizer).
The same code runs on a GPU-less machine through the CPU shims of
`falcon_h1.megatron_compat.cpu` (DDP waits on `torch.cuda.current_stream()`; the optimizer
wrappers hard-code CUDA, so on a CPU host the optimizer comes in a `CpuCallsProxy`). The
optimizer object, its param groups and its (sharded) state dict are Megatron's own, so
checkpoints are the same format on both devices.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence, Union

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import MegatronModule

from falcon_h1.megatron_compat.cpu import CpuCallsProxy, cuda_as_cpu, enable_cpu_megatron
from falcon_h1.megatron_compat.optimizer import fp32_shards_as_leaves, set_fused_adamw, use_foreach_multi_tensor_ops
from recipes.config import ParallelConfig, TrainConfig
from recipes.schedules import LrSchedule, checked_schedule

ModelChunks = Union[MegatronModule, Sequence[MegatronModule]]


def wrap_model(model: ModelChunks, parallel_cfg: ParallelConfig, train_cfg: TrainConfig, transformer_config):
    """Wrap the model (or each virtual-pipeline chunk) in Megatron's DDP.

    Gradients accumulate in an fp32 buffer (`param.main_grad`) and are averaged
    over the data-parallel group by `finish_grad_sync()` (or asynchronously per
    bucket of `parallel.ddp_bucket_size` parameters during backward when
    `parallel.overlap_grad_reduce` is on). The returned object keeps Megatron's interface:
    `.module`, `zero_grad_buffer()`, `no_sync()`, `start_grad_sync()`, `finish_grad_sync()`.
    """
    enable_cpu_megatron()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
        bucket_size=parallel_cfg.ddp_bucket_size,
        # The per-bucket NaN check reads each grad norm on the host: a sync, illegal inside a CUDA
        # graph (Megatron-LM turns it off for full-iteration graphs too); training then checks the
        # loss and grad norm after each step instead.
        check_for_nan_in_grad=not train_cfg.cuda_graph,
    )
    chunks = [model] if isinstance(model, MegatronModule) else list(model)
    wrapped = [
        DistributedDataParallel(
            config=transformer_config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM buckets only the first chunk: later chunks' gradients
            # become ready all at once at the end of the pipeline flush.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    return wrapped[0] if isinstance(model, MegatronModule) else wrapped


def _offload_settings(fraction: float) -> dict:
    """Megatron's switches for keeping `fraction` of the optimizer state in host memory.

    Its HybridDeviceOptimizer steps the offloaded shards with torch's AdamW on the CPU and the
    rest on the GPU; it takes the bf16 weight shards from the precision-aware distributed
    optimizer and keeps the fp32 master copies itself (beside their moments, on either side).
    The gradients' copies to the host and the weights' copies back run on side streams,
    parameter by parameter, so the CPU's AdamW starts before the last gradient has arrived.
    """
    if not fraction:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=float(fraction),
                use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True)


def build_optimizer(wrapped_models: ModelChunks, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                    schedule: Optional[LrSchedule] = None):
    """Megatron's optimizer over the DDP-wrapped model chunk(s).

    `schedule`: `train_cfg`'s checked schedule when the caller has it (training does, from the
    recipe's validation); None checks `train_cfg` here.
    `.step()` returns `(update_successful, grad_norm, num_zeros_in_grad)`; the
    grad norm is the global L2 norm before clipping to `train.grad_clip`.
    Weight decay is already multiplied by each group's `wd_mult` (0 for biases and
    1-D parameters: norms, A_log, D, dt_bias), so the optimizer is correct before
    the lr scheduler's first step; the scheduler keeps it that way.
    """
    chunks = [wrapped_models] if isinstance(wrapped_models, MegatronModule) else list(wrapped_models)
    schedule = schedule or checked_schedule(train_cfg)
    param_dtypes = {p.dtype for chunk in chunks for p in chunk.parameters()}
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=schedule.lr,
        min_lr=schedule.min_lr,
        weight_decay=schedule.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=schedule.grad_clip,
        # bf16 model weights get fp32 main copies in the optimizer; read from the
        # model itself so the two can never disagree.
        bf16=torch.bfloat16 in param_dtypes,
        params_dtype=torch.bfloat16 if torch.bfloat16 in param_dtypes else torch.float32,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
        **_offload_settings(train_cfg.optimizer_offload_fraction),
    )
    use_foreach_multi_tensor_ops(train_cfg.fused_optimizer)
    offloading = fp32_shards_as_leaves() if optimizer_config.optimizer_cpu_offload else nullcontext()
    if torch.cuda.is_available():
        with offloading:
            optimizer = get_megatron_optimizer(optimizer_config, chunks)
        set_fused_adamw(optimizer, train_cfg.fused_optimizer)
    else:
        with cuda_as_cpu(), offloading:
            optimizer = CpuCallsProxy(get_megatron_optimizer(optimizer_config, chunks))
    for group in optimizer.param_groups:
        group["weight_decay"] = schedule.weight_decay * group.get("wd_mult", 1.0)
    return optimizer
