"""launch(executor=local, nproc_per_node=2): torchrun through NeMo-Run's LocalExecutor."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import FAKE_WORKER, HERE
from torch.distributed.run import get_args_parser

from falcon_h1.errors import ConfigValueError
from recipes.launch import launch


@pytest.fixture
def local_recipe(recipe, monkeypatch, tmp_path):
    from launchers.nemo import nemo_run

    nemo_run()
    from nemo_run.run.torchx_backend.schedulers import local as nemo_local_scheduler

    # NeMo-Run lists local jobs in ~/.nemo_run/.local_jobs.json; keep the tests' jobs out of it.
    monkeypatch.setattr(nemo_local_scheduler, "LOCAL_JOB_DIRS", str(tmp_path / "local_jobs.json"))
    recipe.executor.kind = "local"
    recipe.executor.nproc_per_node = 2
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # where the stand-in worker lives
    return recipe


def test_dryrun_renders_the_torchrun_command(local_recipe):
    result = launch(local_recipe, dryrun=True)

    argv = shlex.split(result.rendered)
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert args.nproc_per_node == "2" and args.nnodes == "1"
    assert args.module and args.training_script == "recipes.worker"
    assert args.training_script_args == [result.recipe_path]
    assert not Path(result.run_dir).exists()  # a dry run writes nothing


def test_two_local_workers_run_and_rendezvous(local_recipe):
    result = launch(local_recipe, worker_module=FAKE_WORKER)

    assert result.state == "SUCCEEDED" and result.exit_code == 0, result.log_tail
    records = [json.loads((Path(result.run_dir) / f"fake_worker_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert all(r["all_reduce_sum"] == 1 + 2 for r in records)
    assert records[0]["recipe_path"] == result.recipe_path
    assert Path(result.recipe_path).read_text() == result.recipe_yaml
    assert "all-reduce sum 3.0" in Path(result.log_path).read_text()


def test_failing_local_workers_report_state_and_log_tail(local_recipe, monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_EXIT_CODE", "7")
    result = launch(local_recipe, worker_module=FAKE_WORKER)

    assert result.state == "FAILED" and result.exit_code != 0
    assert "failing on purpose with exit code 7" in result.log_tail
    assert "failing on purpose" in result.summary()


def test_nproc_per_node_must_be_positive(local_recipe):
    local_recipe.executor.nproc_per_node = 0
    with pytest.raises(ConfigValueError, match=r"executor.nproc_per_node = 0 .* integer >= 1"):
        launch(local_recipe, dryrun=True)


def test_falcon_train_exits_nonzero_when_one_of_two_local_workers_fails(tmp_path):
    # The CLI as a user runs it, with the stand-in worker: rank 1 fails, rank 0 finishes.
    import os
    import subprocess
    import sys

    cli = tmp_path / "falcon_train_with_fake_worker.py"
    cli.write_text(
        "import functools, recipes.launch as L\n"
        "L.launch = functools.partial(L.launch, worker_module='fake_worker')\n"
        "import recipes.train as T\nT.main()\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent.parent)]),
        "HOME": str(tmp_path),  # NeMo-Run's ~/.nemo_run job list stays in the test's folder
        "FAKE_WORKER_EXIT_CODE": "7",
        "FAKE_WORKER_FAIL_RANK": "1",
    }
    args = ["executor=local", "executor.nproc_per_node=2", "logger.wandb=false", "logger.tensorboard=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, str(cli), *args], env=env, capture_output=True, text=True, timeout=300)

    assert "state: FAILED" in done.stdout, done.stdout + done.stderr
    assert "rank 1: failing on purpose" in done.stdout
    assert done.returncode == 1, done.stdout + done.stderr
