"""What a launch hands back, and the error of a cluster that cannot take the job.

A setting that cannot work is a `falcon_h1.errors.ConfigValueError` (the field, its value,
what is allowed), raised before anything is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


class ClusterError(RuntimeError):
    """The cluster could not be reached, or refused the job. The message names the
    command that failed and what it printed."""


@dataclass
class WandbRun:
    """Where the run's W&B data goes, as the trainer will log it (filled in by the caller of the
    launch, `recipes.launch`). The run id is only known once rank 0 has started: the trainer
    keeps it in `run_id_file`."""

    project: str
    entity: Optional[str]
    name: str
    mode: str
    run_id_file: str

    def url(self) -> Optional[str]:
        """The run's page, once the worker has created the run (local file systems only)."""
        path = Path(self.run_id_file)
        if self.entity is None or self.mode != "online" or not path.is_file():
            return None
        return f"https://wandb.ai/{self.entity}/{self.project}/runs/{path.read_text().strip()}"


@dataclass
class LaunchResult:
    """One launch of a recipe.

    `job_id`: Slurm job id, PyTorchJob name, or the NeMo-Run experiment id of a local run.
    `pod_name`: Kubernetes only, the rank-0 (Master) pod whose log is the run's log.
    `logs_command`: a shell command that prints the run's log.
    `rendered`: what was (or, for a dry run, would be) submitted: the sbatch script, the
    Kubernetes manifests as YAML, or the local torchrun command line.
    `state` / `log_tail`: filled for local runs, which wait for the end, and by `wait()`.
    """

    kind: str
    dryrun: bool
    run_dir: str
    recipe_yaml: str
    rendered: str
    recipe_path: Optional[str] = None
    job_id: Optional[str] = None
    pod_name: Optional[str] = None
    log_path: Optional[str] = None
    logs_command: Optional[str] = None
    wandb: Optional[WandbRun] = None
    state: Optional[str] = None
    exit_code: Optional[int] = None
    log_tail: str = ""
    # Waits for a submitted job: set by the launcher that knows how (Slurm).
    _waiter: Optional[Callable[..., Any]] = field(default=None, repr=False, compare=False)

    @property
    def succeeded(self) -> Optional[bool]:
        return None if self.exit_code is None else self.exit_code == 0

    def wait(self, timeout: float = 3600.0, poll_interval: float = 2.0):
        """Block until a submitted job ends; returns the executor's outcome (Slurm: JobOutcome)."""
        if self._waiter is None:
            raise RuntimeError(f"waiting is not supported for executor.kind = {self.kind!r} (dryrun={self.dryrun}).")
        outcome = self._waiter(timeout=timeout, poll_interval=poll_interval)
        self.state, self.exit_code, self.log_tail = outcome.state, outcome.exit_code, outcome.log_tail
        return outcome

    def __str__(self) -> str:
        # `print(result)` shows the summary, and for a dry run what would be submitted.
        return self.summary() + (f"\n\n{self.rendered}" if self.dryrun else "")

    def summary(self) -> str:
        lines = [f"executor: {self.kind}" + (" (dry run, nothing submitted)" if self.dryrun else "")]
        for label, value in [
            ("job id", self.job_id),
            ("pod", self.pod_name),
            ("run dir", self.run_dir),
            ("recipe", self.recipe_path),
            ("log", self.log_path),
            ("fetch logs", self.logs_command),
            ("state", self.state),
            ("exit code", self.exit_code),
        ]:
            if value is not None:
                lines.append(f"{label}: {value}")
        if self.wandb is not None:
            url = self.wandb.url()
            where = url or f"project {self.wandb.project}, run name {self.wandb.name}, mode {self.wandb.mode}"
            lines.append(f"W&B: {where}")
        if self.log_tail:
            lines.append("last log lines:\n" + self.log_tail)
        return "\n".join(lines)
