"""What a finished training run prints: the loss drop, throughput, and where its outputs are,
naming only the trackers the run wrote to (`logger.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from recipes.config import LoggerConfig


def tracking_lines(logger_cfg: LoggerConfig, run_dir: str, wandb_mode: Optional[str]) -> list[str]:
    """Where the run's metrics are: metrics.jsonl always, then each tracker logger_cfg turned on.
    `wandb_mode`: the mode W&B ran in (online / offline; None or "disabled": no W&B run)."""
    lines = [f"metrics:     {run_dir}/metrics.jsonl"]
    if logger_cfg.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {run_dir}/tensorboard")
    if wandb_mode == "offline":
        lines.append(f"W&B:         offline; upload with: wandb sync {run_dir}/wandb/offline-run-*")
    elif wandb_mode == "online":
        lines.append(f"W&B:         online, project {logger_cfg.wandb_project}")
    if logger_cfg.mlflow:
        lines.append(f"MLflow:      mlflow ui --backend-store-uri {run_dir}/mlruns")
    return lines


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    first_loss: float
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    checkpoint_dir: str
    resumed_from: Optional[int]
    # The step whose forward/backward was captured into the CUDA graph (replayed by every later
    # step); None for an eager run or one that ended before the capture.
    cuda_graph_step: Optional[int] = None
    # train.sample_tokens new tokens after train.sample_prompt, generated at the end; None if 0.
    sample: Optional[str] = None
    # what the loss counts: every token (text data) or assistant tokens only (chat data)
    loss_name: str = "loss"
    # chat data: what building the datasets skipped, truncated and how full the rows are
    data_report: list[str] = field(default_factory=list)
    # data.heldout: (step, recipes.heldout_eval.HeldoutScore) when the run started and after its last step
    heldout: list[tuple[int, Any]] = field(default_factory=list)
    # where the metrics went (tracking_lines)
    tracking: list[str] = field(default_factory=list)
    # train.profile_step_start: which steps were profiled and where the outputs are (recipes.profiling)
    profile: Optional[str] = None

    def report(self) -> str:
        """What the run did and where its outputs are, as `falcon-train` prints it."""
        return (
            "".join(f"\n{line}" for line in self.data_report)
            + "".join(f"\nheld-out questions after {n} steps: {score.line()}" for n, score in self.heldout)
            + f"\nfinished {self.steps} steps: {self.loss_name} {self.first_loss:.4f} -> {self.final_loss:.4f} "
            f"({100 * (1 - self.final_loss / self.first_loss):.1f}% lower), {self.tokens_per_s:,.0f} tokens/s\n"
            f"run dir:     {self.run_dir}\n"
            f"checkpoints: {self.checkpoint_dir}\n"
            + "".join(f"{line}\n" for line in self.tracking)
            + f"report:      falcon-report {self.run_dir}"
            + (f"\nCUDA graph:  captured at step {self.cuda_graph_step}, replayed after"
               if self.cuda_graph_step else "")
            + (f"\nprofile:     {self.profile}" if self.profile else "")
            + (f"\nsample:      {self.sample}" if self.sample else "")
        )
