"""CUDA timing and kernel profiles shared by the benchmarks."""

from __future__ import annotations

import torch


def time_steps(step_fn, warmup: int, steps: int) -> tuple[float, float, float]:
    """Median ms per step, first-step loss, peak GiB since the caller's reset (which comes before
    a CUDA graph's capture: its private memory pool is allocated then)."""
    first_loss = float(step_fn())
    for _ in range(warmup - 1):
        step_fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step_fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], first_loss, torch.cuda.max_memory_allocated() / 2**30


def graphed_train_step(model, optimizer, forward_loss, warmup: int = 3):
    """A training step (forward_loss(model), backward, optimizer step) with forward + backward
    captured once in a CUDA graph and replayed: the host launches one graph instead of thousands
    of kernels. Gradients are produced (not accumulated) by the captured backward, so no zeroing
    is needed between replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotune, allocator warm-up, lazy caches: all before capture
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            forward_loss(model).backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_loss(model)
        static_loss.backward()

    def step():
        graph.replay()
        optimizer.step()
        return static_loss.detach().clone()
    return step


def profile_kernels(fn, top: int = 25) -> list[dict]:
    """CUDA time per kernel name over one call of fn: [{"total_ms"}, then the `top` largest]."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
    except Exception as err:  # the profile is a diagnostic; never lose the timing row over it
        return [{"total_ms": float("nan"), "error": f"{type(err).__name__}: {err}"[:200]}]
    rows = []
    for ev in events:
        cuda_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "device_time_total", 0)
        if cuda_us > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "ms": cuda_us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"total_ms": total}] + rows[:top]


def with_fresh_grads(fn, leaves, calls: int = 1):
    """fn called `calls` times, each after resetting the leaves' `.grad` (as do_bench does), so a
    profile of it counts no gradient-accumulation kernels."""
    def run():
        for _ in range(calls):
            for leaf in leaves:
                leaf.grad = None
            fn()
    return run


def kernel_ms(fn, leaves, calls: int = 10) -> float:
    """Summed CUDA kernel time of one call of fn (mean of `calls`, after the caller's warm-up): the
    GPU time alone. Eager timings of these small launches include the host's launch gaps, which a
    graphed training step does not have. (A CUDA-graph replay would measure the same; mamba_ssm's
    standalone combined scan does not capture: its backward touches the legacy stream.)"""
    rows = profile_kernels(with_fresh_grads(fn, leaves, calls), top=0)
    return rows[0]["total_ms"] / calls
