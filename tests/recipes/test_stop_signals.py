"""A real signal to a real CPU training process: the step finishes, a checkpoint is saved, the
process says how to resume and exits 128 + signum; resuming gives the uninterrupted run's losses."""

from __future__ import annotations

import signal
import time

import pytest

from tests.recipes import reliability_runs as runs

STEPS = ["train.max_steps=40", "train.save_interval=1000", "train.log_interval=1"]


def _signal_after_step(proc, run_dir, signum: int, step: int, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(runs.losses(run_dir), default=0) >= step:
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_the_step_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, signum):
    stopped_dir = tmp_path / "stopped"
    recipe = runs.write_recipe(stopped_dir, *STEPS)
    code, out, err = _signal_after_step(runs.start(recipe), stopped_dir, signum, step=2)

    assert code == 128 + signum, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    stop_step = max(runs.losses(stopped_dir))
    assert 2 <= stop_step < 40, "the signal arrived after the run had finished; make the run longer"
    assert (stopped_dir / "checkpoints" / f"iter_{stop_step:07d}").is_dir(), sorted(stopped_dir.rglob("iter_*"))
    name = signal.Signals(signum).name
    assert f"{name} received: stopped after step {stop_step}" in out
    assert f"train.run_dir={stopped_dir}" in out and f"exit code {128 + signum}" in out

    proc = runs.run(recipe)
    assert f"resumed from step {stop_step}" in proc.stdout + proc.stderr
    reference_dir = tmp_path / "reference"
    runs.run(runs.write_recipe(reference_dir, *STEPS))
    assert runs.losses(stopped_dir) == runs.losses(reference_dir)
