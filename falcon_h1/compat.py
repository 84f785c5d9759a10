"""Make Megatron Core run on CPU (gloo), for tests and the embedded CPU demo.

Megatron Core assumes CUDA in places the training path reaches (see
../shared/platform.md): rotary embeddings move `inv_freq` to
`torch.cuda.current_device()`, the RNG tracker stores CUDA generator states, and
the pipeline schedules and optimizer wrappers allocate with `device="cuda"`.
`enable_cpu_megatron()` patches the first two and `cuda_as_cpu()` is a scoped
TorchFunctionMode for the last; all of it only acts when no GPU is present, so
nothing changes on a GPU machine.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_PATCHED = False

# Megatron's fused-op switches, all off: their kernels need CUDA extensions (apex,
# TransformerEngine) that neither the CPU machines nor the GPU image have.
MEGATRON_FUSIONS_OFF = dict(bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                            gradient_accumulation_fusion=False)


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


def enable_cpu_megatron() -> None:
    """Install the CPU shims if (and only if) CUDA is unavailable. Idempotent."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")  # rotary embedding's inv_freq.to(...)
    torch.cuda.current_stream = torch.cpu.current_stream  # DDP's start_grad_sync waits on it
    torch.cuda.synchronize = torch.cpu.synchronize  # dist_checkpointing's writer syncs before saving
    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
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


def recompute(function, *args):
    """Activation recomputation: Megatron's tensor-parallel checkpoint (which also restores the
    CUDA RNG tracker states) on GPU; torch's non-reentrant checkpoint on CPU, where Megatron's
    reads CUDA RNG state. The model has no dropout, so both recompute the same values."""
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        return tensor_parallel.checkpoint(function, False, *args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(
    tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, cp: int = 1
) -> None:
    """Set up torch.distributed and Megatron's parallel state for this process.

    Works under torchrun (reads RANK/WORLD_SIZE) and in a plain single process
    (starts a one-rank group). Backend: NCCL on GPU, gloo on CPU.
    """
    from megatron.core import parallel_state, tensor_parallel

    enable_cpu_megatron()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / Slurm / Kubernetes: env:// rendezvous
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        else:  # a plain process: a private one-rank group; leave os.environ alone for child processes
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"parallel.tp * parallel.pp * parallel.cp = {tp} * {pp} * {cp} must divide the number of processes "
            f"({world}); allowed: tp * pp * cp in the divisors of {world}."
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp
            or parallel_state.get_context_parallel_world_size() != cp
        ):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        import megatron.core.tensor_parallel.random as mrandom

        tracker = CpuRNGStatesTracker()
        tracker.add("model-parallel-rng", seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
    torch.manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
