"""Issue 18 item 1: one training per run directory, with real processes holding the lock.

Two trainings in one run dir used to both run (metrics from one, checkpoints from the other).
Now the second refuses, naming the holder's pid and host; a lock left by a killed process is
taken over; a Slurm requeue (same SLURM_JOB_ID) waits for its earlier attempt to let go."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from falcon_h1.errors import ConfigValueError
from tests.conftest import REPO
from tests.recipes import reliability_runs as runs

LOCK_FILE = "run.lock"
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from recipes.run_lock import acquire
    lock = acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def _holder(run_dir: Path, seconds: float, **env: str) -> subprocess.Popen:
    """A real process that takes the lock of `run_dir` and keeps it for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], cwd=REPO,
                            env={**runs.worker_env(**env), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_second_training_in_the_same_run_dir_refuses_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = runs.start(runs.write_recipe(run_dir, "train.max_steps=2000", "train.save_interval=0"))
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, first)
        second = runs.run(runs.write_recipe(run_dir, "train.max_steps=5", "train.save_interval=1"), ok=False)
        message = second.stderr.strip().splitlines()[-1]
        assert "train.run_dir" in message and "is in use" in message
        assert f"pid {first.pid} on host {socket.gethostname()}" in message
        assert first.poll() is None  # the first training goes on, untouched
        assert not (run_dir / "checkpoints").exists()
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())
    finally:
        first.kill()
        first.communicate()


def test_lock_of_a_killed_process_is_taken_over_and_released_on_exit(tmp_path, caplog):
    from recipes.run_lock import RunDirInUse, acquire

    run_dir = tmp_path / "run"
    holder = _holder(run_dir, 600)
    with pytest.raises(RunDirInUse, match=f"pid {holder.pid} on host"):
        acquire(run_dir, requeue_wait_s=0)
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: its record stays behind
    holder.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="recipes.run_lock"):
        lock = acquire(run_dir, requeue_wait_s=0)
    assert f"pid {holder.pid}" in caplog.text and "gone" in caplog.text
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()
    # A process that exits normally leaves no lock behind either.
    _holder(run_dir, 0).wait()
    assert not (run_dir / LOCK_FILE).exists()


def test_slurm_requeue_waits_for_its_earlier_attempt_but_another_job_refuses(tmp_path, monkeypatch):
    from recipes.run_lock import RunDirInUse, acquire

    run_dir = tmp_path / "run"
    earlier = _holder(run_dir, 600, SLURM_JOB_ID="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunDirInUse, match="Slurm job 4242"):
        acquire(run_dir, requeue_wait_s=30)  # another job: refused at once, no waiting
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    killer = subprocess.Popen(["sh", "-c", f"sleep 2; kill -9 {earlier.pid}"])  # Slurm stopping the old attempt
    started = time.monotonic()
    lock = acquire(run_dir, requeue_wait_s=60)
    waited = time.monotonic() - started
    killer.wait()
    earlier.wait()
    assert earlier.returncode == -signal.SIGKILL and waited >= 1.5
    assert json.loads((run_dir / LOCK_FILE).read_text())["slurm_restart_count"] == 1
    lock.release()
    # A requeued attempt never takes a lock that stays held: it gives up after the wait.
    still_running = _holder(run_dir, 600, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(RunDirInUse, match="did not let go"):
            acquire(run_dir, requeue_wait_s=1)
    finally:
        still_running.kill()
        still_running.wait()


def test_without_posix_locks_an_exclusive_file_decides(tmp_path, monkeypatch):
    from recipes.run_lock import RunDirInUse, acquire

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {"pid": alive.pid, "host": socket.gethostname(), "started": "earlier"}
        (run_dir / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(RunDirInUse, match=f"pid {alive.pid}") as refused:
            acquire(run_dir, requeue_wait_s=0)
        assert isinstance(refused.value, ConfigValueError)
    finally:
        alive.kill()
        alive.wait()
    lock = acquire(run_dir, requeue_wait_s=0)  # that pid is gone now: stale
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()
