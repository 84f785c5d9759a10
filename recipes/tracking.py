"""Experiment tracking: one `Tracker` per training job, writing to every enabled backend.

Backends (rank 0 only; every other rank gets a Tracker that does nothing and writes
no files):

- `metrics.jsonl` in the run directory, always: one JSON object per `log` call,
  `{"step": ..., <metric>: ..., "time": <unix seconds>}`. This is what
  `falcon-report` reads.
- TensorBoard event files under `run_dir/tensorboard` (`logger.tensorboard`), with
  tags `train/<metric>` and `eval/<metric>` for metrics named `val_*`.
- Weights & Biases (`logger.wandb`), one W&B run per job whose id is kept in
  `run_dir/wandb_run_id` (WANDB_RUN_ID_FILE), so a resumed job continues the same W&B run. Mode
  `logger.wandb_mode`: "auto" is "online" when WANDB_API_KEY is set, else "offline"
  (local files under run_dir/wandb, upload later with `wandb sync`). An online run whose
  server does not answer, or whose init fails, logs offline instead.
- MLflow (`logger.mlflow`), a file store under `run_dir/mlruns`; needs `mlflow`
  (or `mlflow-skinny`) installed.

A resumed job restarts logging at the step after its checkpoint. Anything an earlier
launch logged at or after that step is dropped from metrics.jsonl and TensorBoard,
so curves show the run that produced the final weights.

The heavy imports (wandb, tensorboard, mlflow) happen only when a backend is enabled.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from falcon_h1.errors import ConfigValueError
from launchers.result import WandbRun
from recipes.config import LoggerConfig
from recipes.run_metadata import scrub_command_line, scrub_secrets

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
WANDB_MODES = ("auto", "online", "offline", "disabled")
RESERVED_NAMES = frozenset({"step", "time"})
# An unreachable W&B server is noticed within this many seconds, and the run logs offline.
WANDB_PROBE_TIMEOUT_S = 5.0


def tensorboard_tag(metric: str) -> str:
    """`loss` -> `train/loss`, `val_loss` -> `eval/val_loss`; names with a `/` are kept."""
    if "/" in metric:
        return metric
    group = "eval" if metric.startswith("val_") else "train"
    return f"{group}/{metric}"


def resolve_wandb_mode(mode: str) -> str:
    """`logger.wandb_mode` as W&B gets it: "auto" is "online" when WANDB_API_KEY is set, else "offline"."""
    if mode not in WANDB_MODES:
        raise ConfigValueError("logger.wandb_mode", mode, f"one of {', '.join(WANDB_MODES)}")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def wandb_run_name(logger_cfg: LoggerConfig, run_dir: str | os.PathLike) -> str:
    return logger_cfg.wandb_run_name or Path(run_dir).name


def wandb_destination(logger_cfg: LoggerConfig, run_dir: str | os.PathLike) -> WandbRun | None:
    """Where a run in `run_dir` logs to W&B (None when W&B is off), as its Tracker will."""
    mode = resolve_wandb_mode(logger_cfg.wandb_mode) if logger_cfg.wandb else "disabled"
    if mode == "disabled":
        return None
    return WandbRun(project=logger_cfg.wandb_project, entity=logger_cfg.wandb_entity,
                    name=wandb_run_name(logger_cfg, run_dir), mode=mode,
                    run_id_file=str(Path(run_dir) / WANDB_RUN_ID_FILE))


def _as_number(name: str, value: Any) -> int | float:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} = {value!r} is not a number.") from None


class Tracker:
    """Logs a training job's metrics to metrics.jsonl, TensorBoard, W&B and MLflow.

    Only rank 0 logs; on other ranks every method is a no-op. Use as a context
    manager, or call `finish()` at the end (W&B marks the run failed when the
    `with` block raises).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logger_cfg: LoggerConfig,
        resolved_recipe: Any,
        tags: list[str],
        rank: int,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.run_name = wandb_run_name(logger_cfg, self.run_dir)
        self.wandb_run_id: str | None = None
        self.wandb_mode: str | None = None
        self._backends: list[Any] = []
        self._finished = False
        if not self.enabled:
            return

        wandb_mode = resolve_wandb_mode(logger_cfg.wandb_mode) if logger_cfg.wandb else "disabled"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        public_recipe = scrub_secrets(resolved_recipe)
        self._backends.append(_JsonlBackend(self.run_dir))
        if logger_cfg.tensorboard:
            self._backends.append(_TensorBoardBackend(self.run_dir / TENSORBOARD_DIR))
        # MLflow before W&B: a missing mlflow fails before a W&B run is opened.
        if logger_cfg.mlflow:
            self._backends.append(_MlflowBackend(self.run_dir, public_recipe, tags, self.run_name))
        if wandb_mode != "disabled":
            backend = _WandbBackend(self.run_dir, logger_cfg, wandb_mode, public_recipe, tags, self.run_name)
            self.wandb_run_id, self.wandb_mode = backend.run_id, backend.mode
            self._backends.append(backend)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._finished:
            raise RuntimeError("Tracker.log called after finish().")
        reserved = RESERVED_NAMES.intersection(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved for metrics.jsonl's own fields.")
        numbers = {name: _as_number(name, value) for name, value in metrics.items()}
        for backend in self._backends:
            backend.log(int(step), numbers)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final values of a run (e.g. best val_loss): summary.json, W&B and MLflow summaries."""
        if not self.enabled:
            return
        plain = scrub_secrets(summary)
        for backend in self._backends:
            backend.log_summary(plain)

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled or self._finished:
            return
        self._finished = True
        errors = []
        for backend in self._backends:
            try:
                backend.finish(exit_code)
            except Exception as error:  # close every backend even when one fails
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


class _JsonlBackend:
    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self.summary_path = run_dir / SUMMARY_FILE
        self._file = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            _drop_lines_from_step(self.path, step)
            self._file = self.path.open("a")
        record = {"step": step, **metrics, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        # A killed job keeps every step it logged.
        self._file.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        merged = {}
        if self.summary_path.exists():
            merged = json.loads(self.summary_path.read_text())
        merged.update(summary)
        self.summary_path.write_text(json.dumps(merged, indent=2) + "\n")

    def finish(self, exit_code: int) -> None:
        if self._file is not None:
            self._file.close()


def _drop_lines_from_step(path: Path, first_step: int) -> None:
    """Remove lines an earlier launch logged at steps this launch is about to redo."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] < first_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class _TensorBoardBackend:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._open_writer(step)
        for name, value in metrics.items():
            self._writer.add_scalar(tensorboard_tag(name), value, global_step=step)

    def _open_writer(self, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        resuming = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        # purge_step makes TensorBoard hide the earlier launch's events from first_step on.
        return SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step if resuming else None)

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass  # TensorBoard has no run summary; the scalars already hold the values.

    def finish(self, exit_code: int) -> None:
        if self._writer is not None:
            self._writer.close()


class _WandbBackend:
    def __init__(self, run_dir: Path, logger_cfg: LoggerConfig, mode: str, public_recipe: dict, tags: list[str],
                 name: str):
        # Before importing wandb: no banners, no prompts, nothing waiting on a terminal.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_path = run_dir / WANDB_RUN_ID_FILE
        run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:12]
        id_path.write_text(run_id + "\n")

        init_kwargs = dict(
            project=logger_cfg.wandb_project,
            entity=logger_cfg.wandb_entity,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=public_recipe,
            tags=list(tags),
            settings=wandb.Settings(silent=True),
        )
        # No network or a bad key must not cost a training job: the run is kept on disk
        # instead, for `wandb sync` later.
        base_url = wandb.setup().settings.base_url  # WANDB_BASE_URL, or W&B's settings file
        if mode == "online" and not _wandb_server_answers(base_url):
            warnings.warn(f"The W&B server {base_url} does not answer; logging offline under {run_dir}/wandb.")
            mode = "offline"
        try:
            self.run = _wandb_init_with_scrubbed_argv(mode, init_kwargs)
        except Exception as error:
            if mode != "online":
                raise
            warnings.warn(f"W&B online init failed ({error}); logging offline under {run_dir}/wandb.")
            # The failed init's stream still holds the run id in wandb-core ("run ID ... is in
            # use"); a fresh service lets the offline run keep the id a resumed job continues.
            wandb.teardown()
            mode = "offline"
            self.run = _wandb_init_with_scrubbed_argv(mode, init_kwargs)
        self.mode = mode
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def finish(self, exit_code: int) -> None:
        import wandb

        self.run.finish(exit_code=exit_code)
        # finish() returns once wandb-core has the exit record, not once its files are
        # written; teardown waits for that, so the run's files are complete on return.
        wandb.teardown()


def _wandb_server_answers(base_url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP request to the W&B server gets any answer (through the proxy settings
    wandb-core uses too): a refused connection fails wandb.init only after its init_timeout."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(base_url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # an error page is an answer: the server is there
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return True


def _wandb_init_with_scrubbed_argv(mode: str, init_kwargs: dict):
    """wandb.init, with secrets masked in the command line W&B records from sys.argv."""
    import wandb

    original_argv = sys.argv
    sys.argv = scrub_command_line(original_argv)
    try:
        return wandb.init(mode=mode, **init_kwargs)
    finally:
        sys.argv = original_argv


class _MlflowBackend:
    def __init__(self, run_dir: Path, public_recipe: dict, tags: list[str], name: str):
        try:
            import mlflow
        except ImportError:
            raise RuntimeError(
                "logger.mlflow = true but mlflow is not installed: "
                "`pip install mlflow-skinny` or set logger.mlflow=false."
            ) from None
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps its file store only behind this opt-in; it needs no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=(run_dir / MLFLOW_DIR).resolve().as_uri())
        id_path = run_dir / MLFLOW_RUN_ID_FILE
        if id_path.exists():
            self.run_id = id_path.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("falcon-h1")
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment("falcon-h1")
            )
            run = self.client.create_run(
                experiment_id, run_name=name, tags={f"tag.{t}": "true" for t in tags}
            )
            self.run_id = run.info.run_id
            id_path.write_text(self.run_id + "\n")
            params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in _flatten(public_recipe).items()]
            for start in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        import mlflow

        now_ms = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(name, float(value), now_ms, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for name, value in _flatten(summary).items():
            self.client.set_tag(self.run_id, f"summary.{name}", str(value))

    def finish(self, exit_code: int) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if exit_code == 0 else "FAILED")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
