"""Console progress bar with ETA (rich), shown on rank 0 only."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, status="")

    def __enter__(self):
        if self.enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.enabled:
            self._bar.update(self._task, completed=step, status=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")
