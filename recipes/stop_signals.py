"""SIGTERM / SIGINT / SIGUSR1 during training: finish the step, save, say how to resume, exit.

Slurm sends SIGTERM on preemption and `scancel`, SIGUSR1 before the time limit
(`--signal=USR1@S`); Ctrl-C is SIGINT. The handler only records the signal: the training loop
asks after each step, every rank agrees (one rank's signal stops all), the step's checkpoint is
written, and the process ends with `StoppedBySignal`, exit code 128 + the signal number
(SIGTERM 143, SIGINT 130, SIGUSR1 138), the shell's convention for a process ended by a signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(SystemExit):
    """Training stopped on a signal after saving `checkpoint_dir` at `step` (or, where the run
    cannot be checkpointed, without saving: `unsaved_because` says why); `code` is 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str, run_dir: str,
                 unsaved_because: Optional[str] = None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint_dir, self.run_dir = signum, step, checkpoint_dir, run_dir
        self.unsaved_because = unsaved_because

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.unsaved_because:
            return (f"{name} received: stopped after step {self.step} without a checkpoint ({self.unsaved_because}); "
                    f"exit code {128 + self.signum}.")
        return (f"{name} received: stopped after step {self.step} and saved its checkpoint in {self.checkpoint_dir}. "
                f"To resume, run the same command again with train.run_dir={self.run_dir} (it continues from step "
                f"{self.step}); exit code {128 + self.signum}.")


class StopRequest:
    """The first stop signal this process received, if any (set from the signal handler)."""

    def __init__(self):
        self.signum: Optional[int] = None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def agreed(self, device: torch.device) -> Optional[int]:
        """The signal to stop on, the same on every rank (a collective when distributed)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


@contextlib.contextmanager
def stop_on_signals():
    """Record SIGTERM/SIGINT/SIGUSR1 instead of dying, for the block; the old handlers come back after."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # Python allows handlers only there
        yield request
        return
    previous = {signum: signal.signal(signum, request._handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
