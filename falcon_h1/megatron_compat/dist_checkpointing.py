"""Megatron Core 0.19.2's torch_dist checkpoint writer, synchronous and in-process.

Why `dist_checkpointing.save` hung on CPU (2 gloo processes) and what changes here:

1. The writer collects its write results through `filesystem_async.get_write_results_queue()`,
   which starts a `multiprocessing.get_context("spawn").Manager()` on the first save. A spawned
   process re-imports the `__main__` script; a worker script without an
   `if __name__ == "__main__"` guard re-runs `init_process_group` there and blocks, and the
   parent waits forever for the manager to start. Even with the guard the spawn costs a fresh
   interpreter importing torch and Megatron. Saves here are synchronous (the writer runs in
   this process), so the writer gets an in-process `queue.Queue`.
2. The writer's `preload_tensors` calls `torch.cuda.synchronize()` unconditionally; on a host
   without CUDA it is routed to the no-op `torch.cpu.synchronize()` (`megatron_compat.cpu`).
3. The writer logs memory with `psutil`, which megatron-core does not declare as a dependency:
   without it every save fails ("psutil is not installed"); pyproject.toml lists it.
"""

from __future__ import annotations

import queue

from falcon_h1.megatron_compat.cpu import enable_cpu_megatron


def make_synchronous_save_work_everywhere() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    enable_cpu_megatron()  # the writer's torch.cuda.synchronize()
