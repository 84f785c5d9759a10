"""executor.kind=local: torchrun on this machine through NeMo-Run's LocalExecutor.

`torchrun --nproc-per-node N -m WORKER_MODULE RECIPE_YAML` runs N workers here; the
worker picks gloo on CPU and NCCL on GPU. The launch blocks until the workers end, like
an in-process run, and reports the state and the log's last lines.
Each launch gets a folder RUN_DIR/launches/NAME_TIME/ with the recipe file
(configs/recipe.yaml) and NeMo-Run's experiment record, including the combined log.
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
import time
from pathlib import Path

from falcon_h1.errors import ConfigValueError
from launchers.config import ExecutorConfig
from launchers.job import RECIPE_FILE_NAME, Job
from launchers.nemo import nemo_run
from launchers.result import LaunchResult

# torchrun's own failure report is about 40 lines; keep the worker's last words too.
LOG_TAIL_LINES = 80


def validate(executor: ExecutorConfig) -> None:
    nproc = executor.nproc_per_node
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigValueError(
            "executor.nproc_per_node", nproc, "an integer >= 1",
            message=f"executor.nproc_per_node = {nproc!r} is not allowed for executor.kind=local: it is the number "
            "of worker processes torchrun starts on this machine, an integer >= 1 (one per GPU on a GPU machine).",
        )


def _executor(nproc: int):
    run = nemo_run()

    # torchrun must be the one of this interpreter's environment, whether or not the
    # venv is activated in the calling shell.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return run.LocalExecutor(
        ntasks_per_node=nproc,
        launcher="torchrun",
        env_vars={"PATH": path, "LOGLEVEL": os.environ.get("LOGLEVEL", "WARNING")},
    )


def _script(worker_module: str, recipe_path: str):
    run = nemo_run()

    return run.Script(path=worker_module, entrypoint="python", m=True, args=[recipe_path])


def _command_line(executor, script) -> str:
    """The torchrun command NeMo-Run will start (from its own torchx packaging)."""
    nemo_run()
    from nemo_run.run.torchx_backend.packaging import package

    executor.assign("dryrun", "/dryrun", "train", "train")
    role = package("train", script, executor).roles[0]
    return " ".join([role.entrypoint, *role.args])


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not os.path.isfile(path):
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def launch(job: Job, dryrun: bool) -> LaunchResult:
    run = nemo_run()

    run_dir = os.path.abspath(job.run_dir)
    yaml_text = job.recipe_yaml_for(run_dir)
    title = f"falcon-{job.name}"
    experiment_id = f"{title}_{time.strftime('%Y%m%d-%H%M%S')}"
    launch_dir = os.path.join(run_dir, "launches", experiment_id)
    recipe_path = os.path.join(launch_dir, "configs", RECIPE_FILE_NAME)
    nproc = job.executor.nproc_per_node
    result = LaunchResult(
        kind="local",
        dryrun=dryrun,
        run_dir=run_dir,
        recipe_yaml=yaml_text,
        recipe_path=recipe_path,
        rendered=_command_line(_executor(nproc), _script(job.worker_module, recipe_path)),
    )
    if dryrun:
        return result

    os.makedirs(os.path.dirname(recipe_path), exist_ok=True)
    Path(recipe_path).write_text(yaml_text)
    experiment_dir = os.path.join(launch_dir, "experiments", title, experiment_id)
    with run.Experiment(
        title,
        id=experiment_id,
        executor=_executor(nproc),
        log_level="WARN",
        base_dir=launch_dir,
        enable_goodbye_message=False,
        skip_status_at_exit=True,
    ) as experiment:
        experiment.add(_script(job.worker_module, recipe_path), name="train", tail_logs=True)
        experiment.run(detach=False)
    # Leaving the `with` block waited for the workers to end.
    job = experiment.jobs[0]
    state = getattr(job.state, "name", str(job.state))
    logs = sorted(glob.glob(os.path.join(experiment_dir, "**", "combined.log"), recursive=True))
    result.job_id = experiment_id

    result.state = state
    # NeMo-Run reports the job's state, not torchrun's exit status: 1 stands for any failure.
    result.exit_code = 0 if state == "SUCCEEDED" else 1
    if logs:
        result.log_path = logs[-1]
        result.logs_command = f"tail -n 200 {shlex.quote(logs[-1])}"
        result.log_tail = _tail(logs[-1])
    return result
