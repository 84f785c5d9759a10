"""torch.distributed and Megatron Core 0.19.2's parallel state for this process, on GPU or CPU.

Megatron's `initialize_model_parallel` expects a process group and, on GPU, seeds its CUDA RNG
tracker (`model_parallel_cuda_manual_seed`), which needs CUDA; on a host without CUDA the CPU
shims (`megatron_compat.cpu`) and a CPU RNG tracker with the same seeds take its place.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from falcon_h1.errors import ConfigValueError
from falcon_h1.megatron_compat.cpu import CpuRNGStatesTracker, enable_cpu_megatron, install_cpu_rng_tracker


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, cp: int = 1) -> None:
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
        raise ConfigValueError(
            "parallel.tp", tp, f"tp * pp * cp dividing the number of processes ({world})",
            message=f"parallel.tp * parallel.pp * parallel.cp = {tp} * {pp} * {cp} must divide the number of "
                    f"processes ({world}); allowed: tp * pp * cp in the divisors of {world}.")
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
        tracker = CpuRNGStatesTracker()
        tracker.add("model-parallel-rng", seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
        install_cpu_rng_tracker(tracker)
    torch.manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
