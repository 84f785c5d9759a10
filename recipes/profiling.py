"""The torch profiler over a window of training steps (`train.profile_step_start` ..
`train.profile_step_end`, counted from 1 like the logged steps).

Each rank writes, under `run_dir/profile/`:
- `rank{r}.<time>.pt.trace.json`: the timeline (Perfetto, chrome://tracing, or TensorBoard's
  PyTorch Profiler plugin with `tensorboard --logdir run_dir`);
- `kernels_rank{r}.txt`: the ops and kernels by their own device time (CPU time on a host
  without a GPU), per profiled step, under a header that sets the device's busy time against the
  steps' wall time: a step whose kernels add up to less than its wall time waited on the host.

A CUDA graph's capture cannot run under the profiler, so with `train.cuda_graph` the window
starts after the capture step; replayed steps show the graph's kernels one by one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from falcon_h1.errors import ConfigValueError, is_int_at_least

PROFILE_DIR = "profile"
TABLE_ROWS = 40


def validate_profile_window(train_cfg) -> None:
    """The window's bounds against the run's steps and its CUDA graph capture."""
    start, end = train_cfg.profile_step_start, train_cfg.profile_step_end
    if not is_int_at_least(start, 0):
        raise ConfigValueError("train.profile_step_start", start,
                               "an integer >= 0 (the first profiled step, counted from 1; 0 = no profile)")
    if start == 0:
        if end != 0:
            raise ConfigValueError("train.profile_step_end", end,
                                   "0 while train.profile_step_start = 0 (no profile), or set "
                                   "train.profile_step_start to the first step to profile")
        return
    if not is_int_at_least(end, start) or end > train_cfg.max_steps:
        raise ConfigValueError("train.profile_step_end", end,
                               f"an integer from train.profile_step_start = {start} to train.max_steps = "
                               f"{train_cfg.max_steps} (the last profiled step)")
    capture = train_cfg.cuda_graph_warmup_steps + 1
    if train_cfg.cuda_graph and start <= capture:
        raise ConfigValueError("train.profile_step_start", start,
                               f"an integer > {capture} with train.cuda_graph = true: step {capture} captures the "
                               f"CUDA graph (after train.cuda_graph_warmup_steps = {capture - 1} eager steps), "
                               "and a capture cannot run under the profiler")


class StepProfiler:
    """Starts torch's profiler before step `start` and writes its outputs after step `end` (or
    when the loop ends first: a stop on a signal, train.exit_after_steps)."""

    def __init__(self, train_cfg, run_dir: Path, rank: int, first_step: int):
        self.start, self.end = train_cfg.profile_step_start, train_cfg.profile_step_end
        self.out_dir = Path(run_dir) / PROFILE_DIR
        self.rank = rank
        self.notice: Optional[str] = None  # what the summary says about the profile
        if self.start and first_step > self.end:
            self.notice = (f"none: this run resumed after step {first_step - 1}, past train.profile_step_end = "
                           f"{self.end}")
            self.start = self.end = 0
        self.start = max(self.start, first_step) if self.start else 0
        self._profiler = None
        self._step_wall_s: list[float] = []
        self._step_started = 0.0

    def before_step(self, step: int) -> None:
        """`step` counts from 1."""
        if step == self.start:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        if self._profiler is not None:
            self._synchronize()
            self._step_started = time.perf_counter()

    def after_step(self, step: int) -> None:
        if self._profiler is None:
            return
        self._synchronize()
        self._step_wall_s.append(time.perf_counter() - self._step_started)
        if step == self.end:
            self._finish()

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._profiler is not None:
            self._finish()

    def _finish(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.{time.time_ns()}.pt.trace.json"
        profiler.export_chrome_trace(str(trace))
        table = self.out_dir / f"kernels_rank{self.rank}.txt"
        table.write_text(kernel_table(profiler, self._step_wall_s, self.start))
        steps = len(self._step_wall_s)
        last = self.start + steps - 1
        self.notice = (f"steps {self.start}..{last} in {self.out_dir} ({table.name}; the trace for Perfetto or "
                       "TensorBoard's PyTorch Profiler plugin)")

    @staticmethod
    def _synchronize() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def kernel_table(profiler, step_wall_s: list[float], first_step: int) -> str:
    """The header (wall and busy time per step) and torch's table of ops by their own device time."""
    import torch

    events = profiler.key_averages()
    # Kernels and copies are their own events, and the op that launched one counts its time too:
    # the busy time sums the device's events only.
    device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    if device_events:
        key, where = "self_device_time_total", "device busy (kernels and copies, summed over streams)"
        busy_us = sum(e.self_device_time_total for e in device_events)
    else:
        key, where = "self_cpu_time_total", "CPU ops' own time (summed over threads; no GPU in this process)"
        busy_us = sum(e.self_cpu_time_total for e in events)
    steps = max(len(step_wall_s), 1)
    wall_ms = 1e3 * sum(step_wall_s) / steps
    busy_ms = busy_us / 1e3 / steps
    share = f" ({100 * busy_ms / wall_ms:.1f}% of wall)" if wall_ms else ""
    header = (f"steps {first_step}..{first_step + len(step_wall_s) - 1}: wall {wall_ms:.2f} ms a step, "
              f"{where} {busy_ms:.2f} ms a step{share}\n"
              f"step wall times (ms): {', '.join(f'{1e3 * s:.2f}' for s in step_wall_s)}\n\n")
    return header + events.table(sort_by=key, row_limit=TABLE_ROWS) + "\n"
