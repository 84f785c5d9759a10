"""Megatron Core 0.19.2's optimizer step without Apex or Transformer Engine (GPU and CPU).

Without those extensions Megatron falls back to torch's AdamW and to per-tensor Python
versions of Apex's multi-tensor kernels, and both cost host round trips every step:

- `use_foreach_multi_tensor_ops`: the fallback gradient norm (`local_multi_tensor_l2_norm`)
  takes each tensor's norm, then builds a host tensor from them: one device-to-host copy (a
  sync) per parameter. Megatron picks its kernels into module globals of
  `megatron.core.optimizer.clip_grads` / `.optimizer` at import; these are replaced by foreach
  versions with the same contract and no host syncs. Without a tensor-scale kernel (Transformer
  Engine's `multi_tensor_scale_tensor`) Megatron also reads the norm on the host to decide the
  clipping factor, so the optimizer's launches wait for the whole backward; a foreach one keeps
  the norm and the factor on the device.
- `set_fused_adamw`: Megatron builds its inner torch AdamW with the default (foreach) path;
  torch's fused AdamW kernel is chosen through the inner optimizer's param-group flags. The
  clipping factor then rides into that kernel (`_clip_in_fused_adamw`) instead of a multiply over
  every gradient of its own.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch


def torch_adamws(optimizer) -> list:
    """The torch AdamW(s) inside a Megatron optimizer (its choice without Apex/TE), or the optimizer itself."""
    found = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner if isinstance(inner, torch.optim.Optimizer) else getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.AdamW):
            found.append(torch_optimizer)
    return found


def fused_adamw_enabled(optimizer) -> bool:
    return any(group.get("fused") for adamw in torch_adamws(optimizer) for group in adamw.param_groups)


def set_fused_adamw(optimizer, enabled: bool) -> None:
    """torch's fused AdamW kernel (enabled) or its default foreach path for Megatron's inner torch
    AdamW. Set after building the optimizer; checkpoint loading keeps it (torch's `load_state_dict`
    would restore the saved param groups' `fused`/`foreach` flags: `optimizer_checkpoint` sets the
    run's own back). The step counters move where each path wants them: the fused kernel reads them
    on the parameter's device, the foreach path on the host (else it reads each back with a sync).
    A fused AdamW takes the clipping factor of its parameters' gradients (`_clip_in_fused_adamw`)."""
    for torch_optimizer in torch_adamws(optimizer):
        _clip_owner(torch_optimizer, enabled)
        for group in torch_optimizer.param_groups:
            group["fused"], group["foreach"] = (True, False) if enabled else (None, None)
            for param in group["params"]:
                state = torch_optimizer.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    device = param.device if enabled else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract with foreach kernels: (norm [1] fp32, None).

    Megatron calls it with non-empty lists and per_tensor=False only."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms: Megatron's clip_grads never asks for them")
    # .float() is free for the fp32 main gradients Megatron passes; it lets mixed dtypes stack
    norms = [torch.stack([norm.float() for norm in torch._foreach_norm(tensors)])
             for tensors in tensor_lists if tensors]
    return torch.linalg.vector_norm(torch.cat(norms)).reshape(1), None


def _copied(tensor_lists) -> list:
    """The destinations of a multi-tensor scale's [sources, destinations], holding the sources."""
    sources, destinations = tensor_lists[0], tensor_lists[1]
    if any(src is not dst for src, dst in zip(sources, destinations)):
        torch._foreach_copy_(destinations, sources)
    return destinations


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract (dst = src * scale) in place, without a temporary copy
    of the sources (clipping passes the gradients as both lists)."""
    destinations = _copied(tensor_lists)
    if destinations and scale != 1.0:
        torch._foreach_mul_(destinations, scale)


def _foreach_scale_by_tensor(chunk_size, noop_flag, tensor_lists, scale):
    """multi_tensor_scale_tensor's contract (dst = src * scale, `scale` a one-element tensor on the
    tensors' device), in place like `_foreach_scale`. The multiply runs even when the factor is 1:
    choosing to skip it would read the factor on the host."""
    destinations = _copied(tensor_lists)
    if destinations:
        torch._foreach_mul_(destinations, scale.reshape(()))


# id(main parameter) -> the fused torch AdamW stepping it (set_fused_adamw), for the clipping below
_CLIP_OWNERS: "weakref.WeakValueDictionary[int, torch.optim.Optimizer]" = weakref.WeakValueDictionary()


def _clip_owner(torch_optimizer, enabled: bool) -> None:
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            if enabled:
                _CLIP_OWNERS[id(param)] = torch_optimizer
            elif _CLIP_OWNERS.get(id(param)) is torch_optimizer:
                del _CLIP_OWNERS[id(param)]
    if enabled and not getattr(torch_optimizer, "_clip_factor_hook", None):
        # a factor serves one step: an AdamW stepped again without clipping must not reuse it
        torch_optimizer._clip_factor_hook = torch_optimizer.register_step_post_hook(
            lambda opt, args, kwargs: opt.__dict__.pop("grad_scale", None))


def _clip_in_fused_adamw(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 (gradients times min(1, max_norm / (norm + 1e-6)))
    where the parameters are exactly those of one fused torch AdamW and the norm is on the device:
    that AdamW divides each gradient by the inverse factor inside its kernel (torch's `grad_scale`,
    GradScaler's hook), so clipping reads and writes no gradient of its own and nothing waits for
    the host. Anything else (foreach AdamW, offloaded shards, a norm read on the host) goes to
    Megatron's, which multiplies the gradients."""
    from megatron.core.optimizer import clip_grads

    params = list(parameters)
    owner = _CLIP_OWNERS.get(id(params[0])) if params else None
    owned = owner is not None and all(group.get("fused") for group in owner.param_groups) and \
        {id(p) for p in params} == {id(p) for group in owner.param_groups for p in group["params"]}
    if not owned or use_decoupled_grad or not isinstance(total_norm, torch.Tensor):
        return clip_grads.clip_grad_by_total_norm_fp32(params, max_norm, total_norm, use_decoupled_grad)
    owner.grad_scale = ((total_norm.float() + 1.0e-6) / max_norm).clamp_min(1.0).reshape(1)


def use_foreach_multi_tensor_ops(enabled: bool) -> None:
    """Megatron's gradient-norm and copy kernels when Apex/TE are absent: ours (foreach, no host
    syncs) or Megatron's per-tensor fallbacks. Only the fallbacks are replaced: where Apex or TE
    is installed, Megatron's own kernels stay. Process-wide (Megatron's module globals): every
    `build_optimizer` sets it from its own config, so the optimizer built last decides."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer as megatron_optimizer

    replaced = {utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale, _foreach_l2_norm, _foreach_scale,
                None, _foreach_scale_by_tensor}
    if clip_grads.l2_norm_impl not in replaced:  # Apex or TE: Megatron's own kernels, tensor scale or not
        return
    for module, name, ours, megatrons in (
            (clip_grads, "l2_norm_impl", _foreach_l2_norm, utils.local_multi_tensor_l2_norm),
            (clip_grads, "multi_tensor_scale_impl", _foreach_scale, utils.local_multi_tensor_scale),
            (clip_grads, "multi_tensor_scale_tensor_impl", _foreach_scale_by_tensor, None),
            (megatron_optimizer, "multi_tensor_scale_impl", _foreach_scale, utils.local_multi_tensor_scale)):
        if getattr(module, name, None) in replaced:
            setattr(module, name, ours if enabled else megatrons)
    megatron_clip = clip_grads.clip_grad_by_total_norm_fp32
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_in_fused_adamw if enabled else megatron_clip


@contextmanager
def fp32_shards_as_leaves():
    """Let Megatron 0.19.2's distributed optimizer offload a model that has fp32 parameters.

    It hands its inner optimizer each fp32 parameter's shard as `param.view(-1)[range]`, a view
    that autograd tracks (not a leaf). The all-GPU path assigns its param groups directly, but the
    offloaded one builds a new HybridDeviceOptimizer from them, and torch refuses a non-leaf:
    "can't optimize a non-leaf Tensor" (Falcon-H1's A_log, D and dt_bias are fp32). While this is
    open, each such shard is its detached view instead: the same memory, so the step still updates
    the model's parameter, with the shard's attributes (tensor-parallel flags) carried over, in the
    param groups and in the shard lists Megatron copies gradients into alike.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]

    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups = original.__func__(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        leaves = {}
        for shards in groups[3]:  # shard_fp32_groups
            for index, shard in enumerate(shards):
                if not shard.is_leaf:
                    leaf = shard.detach()
                    leaf.__dict__.update(shard.__dict__)
                    leaves[id(shard)] = shards[index] = leaf
        for group_range in opt_group_ranges:
            group_range["orig_group"]["params"] = [leaves.get(id(p), p) for p in group_range["orig_group"]["params"]]
        return groups

    DistributedOptimizer._build_model_and_main_param_groups = classmethod(build)
    try:
        yield
    finally:
        DistributedOptimizer._build_model_and_main_param_groups = original
