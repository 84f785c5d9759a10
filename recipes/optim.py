"""Data-parallel wrapping and the optimizer: Megatron Core's own, on GPU and on CPU.

`wrap_model` returns Megatron's `DistributedDataParallel` and `build_optimizer`
returns Megatron's optimizer (`get_megatron_optimizer`: AdamW with decoupled
weight decay, no decay on biases and 1-D parameters, global grad-norm clipping
that counts tensor-parallel duplicates once, optional distributed optimizer).
The same code runs on a GPU-less machine; two small CPU shims make that possible:

* Megatron's `DistributedDataParallel` dies on CPU in
  `_ParamAndGradBucketGroup.start_grad_sync`, which calls
  `torch.cuda.current_stream()` unconditionally (to wait for CUDA-graph weight
  gradient events) before every gradient all-reduce. On a host without CUDA
  `falcon_h1.compat.enable_cpu_megatron` routes it to `torch.cpu.current_stream()`,
  whose `wait_event` / `wait_stream` are no-ops. Nothing else in the DDP path needs CUDA once
  `torch.cuda.current_device()` returns the CPU (falcon_h1.compat does that).
* Megatron's optimizer wrappers hard-code CUDA: `torch.tensor(..., device='cuda')`
  (FP32Optimizer's `_scale`, the grad scaler, `clip_grads`' norm and zero
  counters), `.cuda()` on loaded state, and dtype checks written as
  `param.type() == 'torch.cuda.FloatTensor'` (distributed and bf16 optimizers).
  On a host without CUDA, `build_optimizer` returns the Megatron optimizer in a
  thin proxy that runs every call under `falcon_h1.compat.cuda_as_cpu`, a
  TorchFunctionMode that reads "cuda" as "cpu" in exactly those three forms. The optimizer object, its
  param groups and its (sharded) state dict are Megatron's own, so checkpoints
  are the same format on both devices.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch

from falcon_h1.compat import cuda_as_cpu, enable_cpu_megatron
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import MegatronModule

from recipes.schedules import validate_train_schedule

ModelChunks = Union[MegatronModule, Sequence[MegatronModule]]


def wrap_model(model: ModelChunks, parallel_cfg, train_cfg, transformer_config):
    """Wrap the model (or each virtual-pipeline chunk) in Megatron's DDP.

    Gradients accumulate in an fp32 buffer (`param.main_grad`) and are averaged
    over the data-parallel group by `finish_grad_sync()` (or asynchronously per
    bucket during backward when `parallel.overlap_grad_reduce` is on). The
    returned object keeps Megatron's interface: `.module`, `zero_grad_buffer()`,
    `no_sync()`, `start_grad_sync()`, `finish_grad_sync()`.
    """
    enable_cpu_megatron()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
        # None = Megatron's default, max(4e7, 1e6 * dp_size) parameters per bucket.
        bucket_size=getattr(parallel_cfg, "ddp_bucket_size", None),
        # The per-bucket NaN check reads each grad norm on the host: a sync, illegal inside a CUDA
        # graph (Megatron-LM turns it off for full-iteration graphs too); training then checks the
        # loss and grad norm after each step instead.
        check_for_nan_in_grad=not getattr(train_cfg, "cuda_graph", False),
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


def build_optimizer(wrapped_models: ModelChunks, train_cfg, parallel_cfg):
    """Megatron's optimizer over the DDP-wrapped model chunk(s).

    `.step()` returns `(update_successful, grad_norm, num_zeros_in_grad)`; the
    grad norm is the global L2 norm before clipping to `train.grad_clip`.
    Weight decay is already multiplied by each group's `wd_mult` (0 for biases and
    1-D parameters: norms, A_log, D, dt_bias), so the optimizer is correct before
    the lr scheduler's first step; the scheduler keeps it that way.
    """
    chunks = [wrapped_models] if isinstance(wrapped_models, MegatronModule) else list(wrapped_models)
    validate_train_schedule(train_cfg)
    param_dtypes = {p.dtype for chunk in chunks for p in chunk.parameters()}
    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.grad_clip,
        # bf16 model weights get fp32 main copies in the optimizer; read from the
        # model itself so the two can never disagree.
        bf16=torch.bfloat16 in param_dtypes,
        params_dtype=torch.bfloat16 if torch.bfloat16 in param_dtypes else torch.float32,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
    )
    use_foreach_multi_tensor_ops(train_cfg.fused_optimizer)
    if torch.cuda.is_available():
        optimizer = get_megatron_optimizer(config, chunks)
        set_fused_adamw(optimizer, train_cfg.fused_optimizer)
    else:
        with cuda_as_cpu():
            optimizer = _CpuCallsProxy(get_megatron_optimizer(config, chunks))
    for group in optimizer.param_groups:
        group["weight_decay"] = train_cfg.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def _torch_adamws(optimizer) -> list:
    """The torch AdamW(s) inside a Megatron optimizer (its choice without Apex/TE), or the optimizer itself."""
    found = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner if isinstance(inner, torch.optim.Optimizer) else getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.AdamW):
            found.append(torch_optimizer)
    return found


def fused_adamw_enabled(optimizer) -> bool:
    return any(group.get("fused") for adamw in _torch_adamws(optimizer) for group in adamw.param_groups)


def set_fused_adamw(optimizer, enabled: bool) -> None:
    """torch's fused AdamW kernel (enabled) or its default foreach path for Megatron's inner torch
    AdamW. Set after building the optimizer; checkpoint loading keeps it (torch's `load_state_dict`
    would restore the saved param groups' `fused`/`foreach` flags: recipes.checkpointing sets the
    run's own back). The step counters move where each path wants them: the fused kernel reads them
    on the parameter's device, the foreach path on the host (else it reads each back with a sync)."""
    for torch_optimizer in _torch_adamws(optimizer):
        for group in torch_optimizer.param_groups:
            group["fused"], group["foreach"] = (True, False) if enabled else (None, None)
            for param in group["params"]:
                state = torch_optimizer.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    device = param.device if enabled else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract with foreach kernels: (norm [1] fp32, None).

    Megatron 0.19.2's fallback takes each tensor's norm, then builds a host tensor from them,
    one device-to-host copy (a sync) per parameter, every step. Megatron calls it with
    non-empty lists and per_tensor=False only."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms: Megatron's clip_grads never asks for them")
    # .float() is free for the fp32 main gradients Megatron passes; it lets mixed dtypes stack
    norms = [torch.stack([norm.float() for norm in torch._foreach_norm(tensors)])
             for tensors in tensor_lists if tensors]
    return torch.linalg.vector_norm(torch.cat(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract (dst = src * scale) in place, without a temporary copy
    of the sources (clipping passes the gradients as both lists)."""
    sources, destinations = tensor_lists[0], tensor_lists[1]
    if not sources:
        return
    if any(src is not dst for src, dst in zip(sources, destinations)):
        torch._foreach_copy_(destinations, sources)
    if scale != 1.0:
        torch._foreach_mul_(destinations, scale)


def use_foreach_multi_tensor_ops(enabled: bool) -> None:
    """Megatron's gradient-norm and copy kernels when Apex/TE are absent: ours (foreach, no host
    syncs) or Megatron's per-tensor fallbacks. Only the fallbacks are replaced: where Apex or TE
    is installed, Megatron's own kernels stay. Process-wide (Megatron's module globals): every
    `build_optimizer` sets it from its own config, so the optimizer built last decides."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer as megatron_optimizer

    replaced = {utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale, _foreach_l2_norm, _foreach_scale}
    for module, name, ours, megatrons in (
            (clip_grads, "l2_norm_impl", _foreach_l2_norm, utils.local_multi_tensor_l2_norm),
            (clip_grads, "multi_tensor_scale_impl", _foreach_scale, utils.local_multi_tensor_scale),
            (megatron_optimizer, "multi_tensor_scale_impl", _foreach_scale, utils.local_multi_tensor_scale)):
        if getattr(module, name, None) in replaced:
            setattr(module, name, ours if enabled else megatrons)


class _CpuCallsProxy:
    """Forwards to a Megatron optimizer, running each method call under `cuda_as_cpu`."""

    def __init__(self, optimizer):
        object.__setattr__(self, "_optimizer", optimizer)

    @property
    def unwrapped(self):
        """The Megatron optimizer itself."""
        return self._optimizer

    def __getattr__(self, name):
        attribute = getattr(self._optimizer, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call_on_cpu(*args, **kwargs):
            with cuda_as_cpu():
                return attribute(*args, **kwargs)

        return call_on_cpu

    def __setattr__(self, name, value):
        setattr(self._optimizer, name, value)

    def __repr__(self):
        return f"CPU({self._optimizer!r})"
