"""The sbatch script for a 4-node x 8-GPU recipe, and the checks made before submission.

The script is read line by line (#SBATCH flags), then run by bash with stand-ins for
`scontrol`, `srun` and `torchrun` on PATH: the fake srun runs the training step once per
node with that node's SLURM_NODEID, and the fake torchrun records its argv and
environment. The argv is then parsed by torch's own torchrun argument parser.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAKE_WORKER, HERE
from local_slurm import free_port
from torch.distributed.run import get_args_parser

from falcon_h1.errors import ConfigValueError
from launchers import Job, validate_executor
from recipes.launch import launch
from launchers.job import RECIPE_FILE_NAME
from launchers.slurm import parse_time_limit, plan_job

NODES = ["gpu-a01", "gpu-a02", "gpu-b17", "gpu-c03"]

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' {nodes}; exit 0; fi
echo "scontrol $*" >> "$FAKE_DIR/scontrol_calls"
"""
FAKE_SRUN = """#!/bin/bash
# `srun ... hostname --ip-address` (the head-node query): answer an address.
for arg in "$@"; do [ "$arg" = hostname ] && {{ echo 10.1.0.1; exit 0; }}; done
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
# The training step: drop srun's own options, run the command once per node.
while [ "$1" != bash ]; do shift; done
for node in {node_ids}; do SLURM_NODEID=$node "$@" || exit $?; done
"""
FAKE_TORCHRUN = """#!/usr/bin/env python3
import json, os, sys
with open(os.path.join(os.environ["FAKE_DIR"], "torchrun_" + os.environ["SLURM_NODEID"]), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""


@pytest.fixture
def big_recipe(recipe):
    recipe.executor.kind = "slurm"
    slurm = recipe.executor.slurm
    slurm.account = "llm_pretrain"
    slurm.partition = "batch"
    slurm.nodes = 4
    slurm.gpus_per_node = 8
    slurm.ntasks_per_node = 8
    slurm.cpus_per_task = 12
    slurm.time = "04:00:00"
    slurm.container_image = "nvcr.io/nvidia/pytorch:25.01-py3"
    slurm.container_mounts = ["/lustre/fs1:/lustre/fs1", "/home/me/.cache:/root/.cache:ro"]
    slurm.env_vars = {"NCCL_DEBUG": "INFO", "GREETING": "hello world"}
    slurm.setup_commands = ["export FROM_SETUP=1"]
    slurm.master_port = 29512
    recipe.train.run_dir = "/lustre/fs1/runs/falcon-4n"
    return recipe


def sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line[len("#SBATCH --") :].partition("=")
            flags[name] = value
    return flags


def submitted_plan(recipe, worker_module: str = "recipes.worker", recipe_yaml: str = ""):
    """The sbatch script, job folder and recipe a launch submits (a dry run prints the script with
    the env_vars values masked)."""
    job = Job(name=recipe.name, run_dir=recipe.train.run_dir, executor=recipe.executor,
              recipe_yaml_for=lambda run_dir: recipe_yaml, worker_module=worker_module)
    return plan_job(job)


def submitted_script(recipe) -> str:
    return submitted_plan(recipe).script


def run_script_with_fakes(script: str, tmp_path: Path) -> Path:
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name, text in {
        "scontrol": FAKE_SCONTROL.format(nodes=" ".join(NODES)),
        "srun": FAKE_SRUN.format(node_ids=" ".join(str(i) for i in range(len(NODES)))),
        "torchrun": FAKE_TORCHRUN,
    }.items():
        path = fakes / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "job.sh").write_text(script)
    env = {
        "PATH": f"{fakes}:/usr/bin:/bin",
        "FAKE_DIR": str(fakes),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[01-02],gpu-b17,gpu-c03",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return fakes


def test_sbatch_header_for_four_nodes_of_eight_gpus(big_recipe):
    result = launch(big_recipe, dryrun=True)

    flags = sbatch_flags(result.rendered)
    assert flags["nodes"] == "4"
    assert flags["ntasks-per-node"] == "1"  # one torchrun per node; it starts the 8 workers
    assert flags["gpus-per-node"] == "8"
    assert flags["cpus-per-task"] == str(12 * 8)  # cpus_per_task is per worker process
    assert flags["account"] == "llm_pretrain" and flags["partition"] == "batch"
    assert flags["time"] == "04:00:00"
    assert "requeue" in flags and flags["requeue"] == ""
    assert flags["signal"] == "B:USR1@300"  # the batch shell's warning before the time limit
    assert flags["open-mode"] == "append"  # a requeued job appends to its logs
    assert flags["output"].startswith(result.run_dir + "/launches/")
    assert result.recipe_path.startswith(result.run_dir + "/launches/")
    assert "trap save_and_requeue USR1" in result.rendered


def test_script_runs_torchrun_once_per_node_with_static_rendezvous(big_recipe, tmp_path):
    script = submitted_script(big_recipe)

    fakes = run_script_with_fakes(script, tmp_path)

    parser = get_args_parser()
    for node_rank in range(len(NODES)):
        record = json.loads((fakes / f"torchrun_{node_rank}").read_text())
        args = parser.parse_args(record["argv"])
        assert args.nnodes == "4"
        assert args.nproc_per_node == "8"
        assert args.node_rank == node_rank  # $SLURM_NODEID read on each node
        assert args.master_addr == NODES[0]  # first host of `scontrol show hostnames`
        assert args.master_port == 29512
        assert args.module and args.training_script == "recipes.worker"
        assert args.training_script_args == ["/nemo_run/configs/recipe.yaml"]  # the job folder inside the container
        assert args.max_restarts == 0
        env = record["env"]
        assert env["MASTER_ADDR"] == NODES[0] and env["MASTER_PORT"] == "29512"
        assert env["NCCL_DEBUG"] == "INFO" and env["GREETING"] == "hello world"
        assert env["FROM_SETUP"] == "1"  # setup_commands run on every node before torchrun


def test_srun_uses_the_container_with_the_job_folder_mounted(big_recipe, tmp_path):
    result = launch(big_recipe, dryrun=True)
    fakes = run_script_with_fakes(result.rendered, tmp_path)

    srun_args = (fakes / "srun_args").read_text().splitlines()
    option = {srun_args[i]: srun_args[i + 1] for i in range(len(srun_args) - 1) if srun_args[i].startswith("--")}
    assert option["--container-image"] == "nvcr.io/nvidia/pytorch:25.01-py3"
    folder = os.path.dirname(os.path.dirname(result.recipe_path))
    mounts = option["--container-mounts"].split(",")
    assert mounts == ["/lustre/fs1:/lustre/fs1", "/home/me/.cache:/root/.cache:ro", f"{folder}:/nemo_run"]
    assert "--kill-on-bad-exit=1" in srun_args
    assert "SLURM_NODEID" not in " ".join(srun_args[: srun_args.index("bash")])
    assert not (fakes / "scontrol_calls").exists()  # a successful job is not requeued


# srun as slurmstepd delivers a forwarded signal: to every process of the step (torchrun's
# workers run in sessions of their own, so a process group would not reach them).
FAKE_SRUN_FORWARDING = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args[0] != "bash":  # drop srun's own options
    args.pop(0)
step = subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID="0"))

def descendants(root):
    children = {{}}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found

def forward(signum, frame):
    for pid in descendants(step.pid):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGUSR1, forward)
sys.exit(step.wait())
"""
# Records each call and, for a requeue, which workers had saved by then.
FAKE_SCONTROL_SAVED = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi
echo "scontrol $* saved:$(cd "$RUN_DIR" && ls saved_rank* 2>/dev/null | tr '\\n' ' ')" >> "$FAKE_DIR/scontrol_calls"
"""


def test_time_limit_signal_saves_before_the_job_is_requeued(recipe, tmp_path):
    """USR1 to the batch shell (`--signal=B:USR1@S`): the trap forwards it through srun to the
    real torchrun's worker, which saves and exits 138; only then is the job requeued (exit 0)."""
    recipe.executor.kind = "slurm"
    recipe.executor.slurm.env_vars = {"PYTHONPATH": str(HERE), "FAKE_WORKER_HOLD_FIRST_ATTEMPT": "1"}
    recipe.executor.slurm.master_port = free_port()
    run_dir = Path(recipe.train.run_dir)
    plan = submitted_plan(recipe, FAKE_WORKER, launch(recipe, dryrun=True, worker_module=FAKE_WORKER).recipe_yaml)
    recipe_path = Path(plan.folder) / "configs" / RECIPE_FILE_NAME
    recipe_path.parent.mkdir(parents=True)  # what submitting writes
    recipe_path.write_text(plan.recipe_yaml)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "srun").write_text(FAKE_SRUN_FORWARDING.format(python=sys.executable))
    (fakes / "scontrol").write_text(FAKE_SCONTROL_SAVED)
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    (tmp_path / "job.sh").write_text(plan.script)
    env = {"PATH": f"{fakes}:/usr/bin:/bin", "FAKE_DIR": str(fakes), "RUN_DIR": str(run_dir), "HOME": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost"}
    log = tmp_path / "job.log"
    with open(log, "w") as output:
        # Own process group, so whatever is left is ended with the shell's group below.
        shell = subprocess.Popen(
            ["bash", str(tmp_path / "job.sh")], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "holding_rank0").exists():
            assert time.monotonic() < deadline and shell.poll() is None, log.read_text()
            time.sleep(0.1)
        shell.send_signal(signal.SIGUSR1)
        shell.wait(timeout=60)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = log.read_text()
    assert shell.returncode == 0, output
    assert (fakes / "scontrol_calls").read_text().split("\n")[0].strip() == "scontrol requeue 4242 saved:saved_rank0"
    assert "fake worker rank 0: saved on signal 10" in output
    assert "the training processes have ended" in output


def test_a_dry_run_prints_the_env_vars_names_not_their_values(big_recipe):
    rendered = launch(big_recipe, dryrun=True).rendered
    assert "export NCCL_DEBUG='***'" in rendered and "export GREETING='***'" in rendered
    assert "INFO" not in rendered and "hello world" not in rendered
    assert "export GREETING='hello world'" in submitted_script(big_recipe)


def test_requeue_can_be_turned_off(big_recipe):
    big_recipe.executor.slurm.requeue = False
    script = launch(big_recipe, dryrun=True).rendered
    flags = sbatch_flags(script)
    assert "no-requeue" in flags and "requeue" not in flags and "signal" not in flags
    assert "trap " not in script


def test_relative_run_dir_on_a_login_node_is_made_absolute(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe.executor.kind = "slurm"
    recipe.train.run_dir = "runs/exp1"
    result = launch(recipe, dryrun=True)
    assert result.run_dir == str(tmp_path / "runs" / "exp1")
    assert "run_dir: " + str(tmp_path / "runs" / "exp1") in result.recipe_yaml
    # Without a container the workers start where the user launched, with this Python.
    srun_line = next(line for line in result.rendered.splitlines() if line.startswith("srun "))
    inner = shlex.split(srun_line)[shlex.split(srun_line).index("-c") + 1]
    assert f"cd {tmp_path}" in inner


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("nodes", 0, ["executor.slurm.nodes = 0", ">= 1"]),
        (
            "ntasks_per_node",
            4,
            ["executor.slurm.ntasks_per_node = 4", "gpus_per_node = 8", "one worker process per GPU"],
        ),
        ("time", "4 hours", ["executor.slurm.time = '4 hours'", "HH:MM:SS"]),
        ("tunnel", "rsh", ["executor.slurm.tunnel = 'rsh'", "local, ssh"]),
        ("container_mounts", ["/lustre"], ["executor.slurm.container_mounts entry '/lustre'", "SOURCE:DESTINATION"]),
        ("master_port", 70000, ["executor.slurm.master_port = 70000", "1..65535"]),
    ],
)
def test_invalid_settings_are_named_before_anything_runs(big_recipe, field, value, words):
    setattr(big_recipe.executor.slurm, field, value)
    with pytest.raises(ConfigValueError) as raised:
        validate_executor(big_recipe.executor)
    for word in words:
        assert word in str(raised.value)
    with pytest.raises(ConfigValueError):
        launch(big_recipe, dryrun=True)


def test_processes_per_node_may_come_from_nproc_per_node(big_recipe):
    """configs/executor/slurm.yaml's spelling: executor.nproc_per_node=8, ntasks_per_node=1."""
    big_recipe.executor.nproc_per_node = 8
    big_recipe.executor.slurm.ntasks_per_node = 1
    script = launch(big_recipe, dryrun=True).rendered
    assert sbatch_flags(script)["ntasks-per-node"] == "1"
    assert "--nproc-per-node=8 " in script
    big_recipe.executor.slurm.ntasks_per_node = 4  # two different answers
    with pytest.raises(
        ConfigValueError, match="executor.nproc_per_node = 8 disagrees with executor.slurm.ntasks_per_node = 4"
    ):
        validate_executor(big_recipe.executor)
    big_recipe.executor.slurm.ntasks_per_node = 1
    big_recipe.executor.nproc_per_node = 1  # one process for 8 GPUs
    with pytest.raises(
        ConfigValueError, match="executor.slurm.gpus_per_node = 8: training runs one worker process per GPU"
    ):
        validate_executor(big_recipe.executor)


def test_ssh_tunnel_needs_a_host_and_an_absolute_job_dir(big_recipe):
    big_recipe.executor.slurm.tunnel = "ssh"
    with pytest.raises(ConfigValueError, match="executor.slurm.ssh_host"):
        validate_executor(big_recipe.executor)
    big_recipe.executor.slurm.ssh_host = "login.cluster"
    with pytest.raises(ConfigValueError, match="executor.slurm.job_dir"):
        validate_executor(big_recipe.executor)


def test_run_dir_outside_the_container_mounts_is_refused(big_recipe):
    big_recipe.train.run_dir = "/scratch/runs/x"
    with pytest.raises(
        ConfigValueError, match=r"train.run_dir = '/scratch/runs/x' is not inside any container mount"
    ):
        launch(big_recipe, dryrun=True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784)],
)
def test_time_limit_formats(text, seconds):
    # The formats of sbatch(1), --time.
    assert parse_time_limit(text) == seconds


def test_qos_reaches_the_sbatch_header(big_recipe):
    assert "qos" not in sbatch_flags(launch(big_recipe, dryrun=True).rendered)  # null: the cluster's default
    big_recipe.executor.slurm.qos = "high"
    assert sbatch_flags(launch(big_recipe, dryrun=True).rendered)["qos"] == "high"


@pytest.mark.parametrize(("max_retries", "restart_count", "requeued"), [(0, 0, False), (2, 1, True), (2, 2, False)])
def test_failing_workers_are_requeued_max_retries_times(big_recipe, tmp_path, max_retries, restart_count, requeued):
    """The batch shell requeues a job whose workers fail while SLURM_RESTART_COUNT < max_retries."""
    big_recipe.executor.slurm.max_retries = max_retries
    script = launch(big_recipe, dryrun=True).rendered
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "scontrol").write_text(FAKE_SCONTROL.format(nodes=" ".join(NODES)))
    (fakes / "srun").write_text(FAKE_SRUN.format(node_ids="0"))
    (fakes / "torchrun").write_text("#!/bin/bash\nexit 3\n")  # the workers fail
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {"PATH": f"{fakes}:/usr/bin:/bin", "FAKE_DIR": str(fakes), "SLURM_JOB_ID": "4242", "HOME": str(tmp_path),
           "SLURM_RESTART_COUNT": str(restart_count)}
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    calls = (fakes / "scontrol_calls").read_text() if (fakes / "scontrol_calls").exists() else ""
    assert ("scontrol requeue 4242" in calls) == requeued, calls


def test_ssh_port_reaches_the_tunnel_and_the_log_command(big_recipe):
    from launchers.slurm import SlurmJobPlan, logs_command, make_tunnel

    slurm = big_recipe.executor.slurm
    slurm.tunnel, slurm.ssh_host, slurm.ssh_user, slurm.job_dir = "ssh", "login.cluster", "me", "/lustre/fs1/jobs"
    slurm.ssh_identity, slurm.ssh_port = "/home/me/.ssh/id_ed25519", 2222
    validate_executor(big_recipe.executor)
    assert make_tunnel(slurm).port == 2222
    plan = SlurmJobPlan(job_name="falcon", folder="/lustre/fs1/jobs/falcon_1", run_dir="/lustre/fs1/runs/x",
                        recipe_yaml="", script="", tunnel=None)
    argv = shlex.split(logs_command(slurm, plan, "42"))
    assert argv[:6] == ["ssh", "-i", "/home/me/.ssh/id_ed25519", "-p", "2222", "me@login.cluster"]
    assert argv[6].startswith("tail -n 200 -f /lustre/fs1/jobs/falcon_1/")
    slurm.ssh_port = 0
    with pytest.raises(ConfigValueError, match=r"executor.slurm.ssh_port = 0 is not a TCP port"):
        validate_executor(big_recipe.executor)


def test_max_retries_must_not_be_negative(big_recipe):
    big_recipe.executor.slurm.max_retries = -1
    with pytest.raises(ConfigValueError, match=r"executor.slurm.max_retries = -1 is not allowed"):
        validate_executor(big_recipe.executor)
