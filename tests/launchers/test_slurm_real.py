"""launch(executor=slurm) against a real Slurm 22.05 cluster (one node, this machine).

The session fixture installs and starts slurmctld/slurmd/munged (see conftest.py);
jobs go through NeMo-Run's LocalTunnel, like a launch from a login node.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAKE_WORKER, HERE
from local_slurm import PARTITION, free_port

from falcon_h1.errors import ConfigValueError
from launchers import ClusterError
from recipes.launch import launch

REAL_WORKER = Path(__file__).resolve().parents[2] / "recipes" / "worker.py"
JOB_TIMEOUT_S = 150


def slurm_recipe(recipe, **env):
    recipe.executor.kind = "slurm"
    slurm = recipe.executor.slurm
    slurm.partition = PARTITION
    slurm.time = "00:10:00"
    slurm.master_port = free_port()
    slurm.env_vars = {"PYTHONPATH": str(HERE), **env}
    return recipe


def queued_jobs() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def test_two_workers_rendezvous_through_torchrun(slurm_cluster, recipe):
    recipe = slurm_recipe(recipe)
    recipe.executor.slurm.ntasks_per_node = 2
    result = launch(recipe, worker_module=FAKE_WORKER)
    assert result.job_id and result.job_id.isdigit()
    assert result.log_path.endswith(f"_{result.job_id}_0.out")

    outcome = result.wait(timeout=JOB_TIMEOUT_S, poll_interval=0.5)

    assert outcome.succeeded, outcome.describe() + "\n" + slurm_cluster.logs()
    records = [json.loads((Path(result.run_dir) / f"fake_worker_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert sorted(r["local_rank"] for r in records) == [0, 1]
    assert all(r["all_reduce_sum"] == 1 + 2 for r in records)  # ranks 0 and 1 contribute 1 and 2
    assert {r["master_addr"] for r in records} == {slurm_cluster.hostname}
    assert {r["master_port"] for r in records} == {str(recipe.executor.slurm.master_port)}
    assert records[0]["recipe_path"] == result.recipe_path
    # The worker log named in the result holds the workers' output.
    assert "all-reduce sum 3.0" in Path(result.log_path).read_text()


@pytest.mark.skipif(not REAL_WORKER.exists(), reason="recipes/worker.py (the trainer) is not in the tree yet")
def test_tiny_recipe_trains_and_a_requeued_job_resumes(slurm_cluster, recipe):
    """The real trainer (`python -m recipes.worker`): the first attempt trains 5 of 10
    steps (train.exit_after_steps) and checkpoints; `scontrol requeue` starts the same
    job again, which resumes from that checkpoint and finishes."""
    recipe = slurm_recipe(recipe)
    recipe.train.exit_after_steps = 5
    result = launch(recipe)
    run_dir = Path(result.run_dir)
    checkpoints = run_dir / "checkpoints"

    first = result.wait(timeout=JOB_TIMEOUT_S, poll_interval=1.0)

    assert first.succeeded, first.describe() + "\n" + slurm_cluster.logs()
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (checkpoints / "iter_0000005").is_dir()

    subprocess.run(["scontrol", "requeue", result.job_id], check=True)
    second = result.wait(timeout=JOB_TIMEOUT_S, poll_interval=1.0)

    assert second.succeeded, second.describe() + "\n" + slurm_cluster.logs()
    assert second.log_path.endswith(f"_{result.job_id}_1.out")
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (checkpoints / "iter_0000010").is_dir()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # 1-5 from the first attempt, 6-10 resumed


def test_failing_job_reports_exit_code_and_log_tail(slurm_cluster, recipe):
    recipe = slurm_recipe(recipe, FAKE_WORKER_EXIT_CODE="3")
    result = launch(recipe, worker_module=FAKE_WORKER)

    outcome = result.wait(timeout=JOB_TIMEOUT_S, poll_interval=0.5)

    assert outcome.state == "FAILED"
    # torchrun exits 1 when a worker fails, and the batch script passes that on.
    assert outcome.exit_code == 1
    assert "failing on purpose with exit code 3" in outcome.log_tail
    assert "job exited with code 1" in outcome.log_tail  # from the batch script's log
    assert outcome.log_path == result.log_path
    assert "exit code 1" in outcome.describe() and "failing on purpose" in outcome.describe()


@pytest.mark.slow  # CI: test_slurm_script.py's trap test and the requeue-resume test above
def test_time_limit_signal_requeues_and_the_job_resumes(slurm_cluster, recipe):
    """USR1 to the batch shell (what `--signal=B:USR1@S` sends before the time limit)
    makes the job requeue itself; the second attempt runs the same recipe file."""
    recipe = slurm_recipe(recipe, FAKE_WORKER_HOLD_FIRST_ATTEMPT="1")
    result = launch(recipe, worker_module=FAKE_WORKER)
    holding = Path(result.run_dir) / "holding_rank0"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not holding.exists():
        assert time.monotonic() < deadline, slurm_cluster.logs()
        time.sleep(0.3)

    subprocess.run(["scancel", "--batch", "--signal=USR1", result.job_id], check=True)
    outcome = result.wait(timeout=JOB_TIMEOUT_S, poll_interval=0.5)

    assert outcome.succeeded, outcome.describe()
    record = json.loads((Path(result.run_dir) / "fake_worker_rank0.json").read_text())
    assert record["attempt"] == 1  # SLURM_RESTART_COUNT of the requeued run
    assert record["recipe_path"] == result.recipe_path
    assert outcome.log_path.endswith(f"_{result.job_id}_1.out")  # the requeued attempt's own log
    shown = subprocess.run(["scontrol", "show", "job", result.job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown


def test_unknown_partition_is_refused_before_submission(slurm_cluster, recipe):
    recipe = slurm_recipe(recipe)
    recipe.executor.slurm.partition = "no-such-partition"
    before = queued_jobs()

    with pytest.raises(ConfigValueError) as raised:
        launch(recipe, worker_module=FAKE_WORKER)

    message = str(raised.value)
    assert "executor.slurm.partition" in message and "'no-such-partition'" in message
    assert PARTITION in message  # the partitions that do exist
    assert queued_jobs() == before


def test_unreachable_controller_is_named(slurm_cluster, recipe, tmp_path, monkeypatch):
    dead_port = free_port()  # nothing listens there
    text = slurm_cluster.conf.read_text().replace(
        f"SlurmctldPort={slurm_cluster.controller_port}", f"SlurmctldPort={dead_port}"
    )
    dead_conf = tmp_path / "slurm.conf"
    dead_conf.write_text(text)
    monkeypatch.setenv("SLURM_CONF", str(dead_conf))

    with pytest.raises(ClusterError) as raised:
        launch(slurm_recipe(recipe), worker_module=FAKE_WORKER)

    message = str(raised.value)
    assert slurm_cluster.hostname in message  # the controller
    assert "scontrol ping" in message and str(dead_conf) in message
    assert "Nothing was submitted" in message
