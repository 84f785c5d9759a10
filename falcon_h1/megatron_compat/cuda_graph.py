"""Megatron Core 0.19.2's full-iteration CUDA graph (`FullCudaGraphWrapper`), as the training
loop uses it (`train.cuda_graph`).

The wrapper copies each step's micro-batches into static CUDA buffers, runs a number of warm-up
steps eagerly, captures the next call of the pipeline schedule (forward, backward,
finalize_model_grads with the DP all-reduce) in one CUDA graph and replays it from then on.
What it needs here, and why:

- `full_iteration_graph`: the wrapper keeps its graph, step counter and input buffers on the
  CLASS, so a second run in one process (a test) would replay the first run's graph with the
  first run's shapes; they are reset on entry and released on exit.
- `capture_stream` / `on_stream`: every training step runs on the wrapper's capture stream, and
  the DDP wrapper is built on it. Megatron's DDP holds each parameter's grad-accumulator
  autograd node, which keeps the stream current when it was made; made on the default stream,
  the captured backward would have to sync with the default (legacy) stream, which a capture
  forbids (cudaErrorStreamCaptureImplicit, seen on an H200 with torch 2.11, which lacks the
  `set_override_stale_capture_stream` switch newer Megatron relies on).
- `use_graph_safe_rng_tracker`: the wrapper registers every RNG-tracker state with the graph,
  which needs generator objects (Megatron's "cudagraphable" tracker) instead of byte-tensor
  snapshots.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def full_iteration_graph(forward_backward_func, warmup_steps: int):
    """Megatron's schedule wrapped in its full-iteration CUDA graph, with the wrapper's
    class-level state reset on entry (this run counts its own warm-up steps) and released on exit."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    wrapper = FullCudaGraphWrapper(forward_backward_func, cuda_graph_warmup_steps=warmup_steps)

    def release():
        wrapper.reset_cuda_graph("training")
        StaticBufferLoader.static_buffers["training"].clear()

    release()
    try:
        yield wrapper
    finally:
        release()


def has_captured(wrapper) -> bool:
    """Whether the wrapper has captured its training graph yet (kept on its class)."""
    return type(wrapper).cuda_graph["training"] is not None


def capture_stream():
    """The side stream Megatron's wrapper captures on."""
    from megatron.core.full_cuda_graph import get_shared_capture_stream

    return get_shared_capture_stream()


@contextlib.contextmanager
def on_stream(stream):
    """Run the block on `stream` (ordered after the work already queued, and before what follows);
    None runs it where it is."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def use_graph_safe_rng_tracker(seed: int) -> None:
    """Re-seed Megatron's RNG tracker (same seeds as initialize_parallel) with generator objects
    that a CUDA graph can register (use_cudagraphable_rng, as Megatron-LM does with graphs)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, force_reset_rng=True)
