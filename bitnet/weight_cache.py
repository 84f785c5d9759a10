"""A BitNet layer's quantised weight, made once per optimizer step and reused until the weight
changes: by every micro-batch of a step, by the backward and by activation recompute.

When a cached quantisation is stale. The parameter's version counter (`param._version`) alone
does not say: torch's fused AdamW updates parameters in place without bumping it, and
Megatron's mixed-precision optimizers copy the fp32 main parameters into `param.data` (a
tensor with its own version counter), as its DDP does when it moves parameters into buffers.
So an entry holds while all of these are unchanged:
- the count of optimizer steps taken in this process: a post-step hook on every
  `torch.optim.Optimizer` (the fused ones too; Megatron's optimizers step a torch optimizer
  before they copy its main parameters into the model);
- the parameter's version (in-place writes autograd sees: `copy_` under no_grad,
  `load_state_dict`, torch's non-fused optimizers);
- its storage, dtype, device and shape (`param.data = ...`, `.to()`, DDP's buffers).
Code that writes weights behind all three (`param.data.copy_(...)` outside an optimizer step)
calls `weights_changed()`.

CUDA graphs replay the captured kernels without running this check, so a forward that is being
captured neither reads nor keeps an entry: the graph quantises on every replay, and from then on
the layer keeps no entry (its training runs by replays; an eager evaluation in between would
only leave a copy beside the graph's). An optimizer step that is itself captured would change
weights at every replay without the hook running, so it turns the cache off for the rest of the
process. Entries made under `torch.inference_mode()` could not be saved for a later backward, so
none is kept there.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

T = TypeVar("T")

_optimizer_steps = 0
_hook = None
_off_because: str | None = None


def weights_changed() -> None:
    """Every cached quantisation is stale: call after writing BitNet weights in a way that
    neither an optimizer step nor the parameter's version counter records."""
    global _optimizer_steps
    _optimizer_steps += 1


def cache_disabled_reason() -> str | None:
    """Why the process no longer caches quantised weights (None while it does)."""
    return _off_because


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _off_because
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        _off_because = (f"{type(optimizer).__name__}.step() was captured in a CUDA graph: its replays change "
                        "the weights without a step hook")
    weights_changed()


def _watch_optimizer_steps() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _identity(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class QuantizedWeightCache(Generic[T]):
    """One layer's cache entry: `get(param, make)` returns `make()` of the current weight,
    computed only when the weight may have changed since the last call."""

    def __init__(self):
        self._key = None
        self._value: T | None = None
        self._captured = False

    def get(self, param: torch.Tensor, make: Callable[[], T], also: torch.Tensor | None = None) -> T:
        """`also`: another tensor the quantisation is made from (a constant scale folded in), held
        to the same rules as the parameter."""
        if _capturing(param):
            self._captured = True
        if self._captured or _off_because is not None:
            self.clear()
            return make()
        _watch_optimizer_steps()
        key = (_optimizer_steps, *_identity(param), *(_identity(also) if also is not None else ()))
        if key == self._key:
            return self._value
        self.clear()  # free the stale quantisation before making the new one
        value = make()
        if not torch.is_inference_mode_enabled():
            self._key, self._value = key, value
        return value

    def clear(self) -> None:
        self._key = self._value = None

    @property
    def holds(self) -> bool:
        """Whether an entry is kept (for tests and memory accounting)."""
        return self._key is not None
