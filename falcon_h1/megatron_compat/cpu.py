"""Megatron Core 0.19.2 on a host without CUDA (gloo), for the tests and the CPU demo.

Megatron assumes CUDA in places the training path reaches: rotary embeddings move `inv_freq`
to `torch.cuda.current_device()`, the RNG tracker stores CUDA generator states, DDP waits on
`torch.cuda.current_stream()` before every gradient all-reduce, the torch_dist checkpoint
writer calls `torch.cuda.synchronize()`, and the pipeline schedules and optimizer wrappers
allocate with `device="cuda"`. `enable_cpu_megatron()` patches the first four process-wide and
`cuda_as_cpu()` is a scoped TorchFunctionMode for the last; all of it acts only when no GPU is
present, so nothing changes on a GPU machine.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_PATCHED = False


class CpuRNGStatesTracker:
    """Megatron's RNG tracker interface on the CPU generator.

    Megatron forks a named RNG state around tensor-parallel-region randomness
    (dropout, GPU weight init); on CPU the default generator plays that role.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install_cpu_rng_tracker(tracker: CpuRNGStatesTracker) -> None:
    """Make `tracker` the one Megatron's `get_cuda_rng_tracker()` returns (a module global)."""
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def enable_cpu_megatron() -> None:
    """Install the CPU shims if (and only if) CUDA is unavailable. Idempotent."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")  # rotary embedding's inv_freq.to(...)
    torch.cuda.current_stream = torch.cpu.current_stream  # DDP's start_grad_sync waits on it
    torch.cuda.synchronize = torch.cpu.synchronize  # dist_checkpointing's writer syncs before saving
    install_cpu_rng_tracker(CpuRNGStatesTracker())
    _PATCHED = True


class cuda_as_cpu(TorchFunctionMode):
    """Read the CUDA device as the CPU inside Megatron code that hard-codes it.

    Rewrites `device='cuda'` (factory functions and `.to`), makes `.cuda()` a no-op
    and answers `.type()` of a CPU tensor with its CUDA name (how Megatron's
    optimizers ask for a tensor's dtype class). Use only on CPU hosts.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def cuda_as_cpu_without_gpu():
    """`cuda_as_cpu()` on a host without CUDA, else nothing: for Megatron's pipeline schedules,
    which allocate their loss and token counters on 'cuda'."""
    return cuda_as_cpu() if not torch.cuda.is_available() else contextlib.nullcontext()


class CpuCallsProxy:
    """Forwards to a Megatron optimizer, running each method call under `cuda_as_cpu`.

    Megatron's optimizer wrappers hard-code CUDA: `torch.tensor(..., device='cuda')` (FP32Optimizer's
    `_scale`, the grad scaler, `clip_grads`' norm and zero counters), `.cuda()` on loaded state, and
    dtype checks written as `param.type() == 'torch.cuda.FloatTensor'` (distributed and bf16
    optimizers). The optimizer object, its param groups and its (sharded) state dict stay
    Megatron's own, so checkpoints are the same format on both devices.
    """

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


def unwrapped_optimizer(optimizer):
    """The Megatron optimizer inside a `CpuCallsProxy`, or `optimizer` itself."""
    return optimizer.unwrapped if isinstance(optimizer, CpuCallsProxy) else optimizer
