"""The `falcon-train` command line run for real: what a first run prints before its progress
bar, and how fast a dry run and `--cfg job` answer without leaving anything behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import REPO

HEAVY_MODULES = ("torch", "megatron", "transformers", "wandb", "nemo_run")
# Runs the CLI in this process, then names the heavy modules it imported.
_MAIN_THEN_MODULES = (
    "import sys, recipes.train as cli; sys.argv = ['falcon-train', *sys.argv[1:]]; cli.main(); "
    f"print('imported:', [m for m in {HEAVY_MODULES!r} if m in sys.modules], file=sys.stderr)"
)


def _cli(tmp_path, *args: str, code: str | None = None, timeout: float = 300):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "recipes.train", *args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def test_first_run_prints_one_fallback_line_before_the_progress_bar(tmp_path):
    done, _ = _cli(tmp_path, "train.max_steps=2", "train.warmup_steps=1", "train.save_interval=2",
                   "train.sample_tokens=0", "logger.progress_bar=false")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    before_training = [line for line in (done.stderr + done.stdout).splitlines()
                       if line.strip() and not line.startswith(("step ", "finished ", "run dir", "checkpoints",
                                                                "metrics", "W&B", "TensorBoard", "report", "sample"))]
    assert len(before_training) <= 1, "\n".join(before_training)
    assert before_training == [] or before_training[0].startswith("falcon-train: fallbacks in use: ")


def test_a_setting_error_still_shows(tmp_path):
    done, _ = _cli(tmp_path, "train.max_steps=2", "train.warmup_steps=5")
    assert done.returncode == 2
    assert "train.warmup_steps = 5 is not allowed" in done.stderr


def test_slurm_dry_run_is_fast_imports_nothing_heavy_and_leaves_no_run_dir(tmp_path):
    done, seconds = _cli(tmp_path, "dryrun=true", "executor=slurm", code=_MAIN_THEN_MODULES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "#SBATCH --signal=B:USR1@300" in done.stdout and "run dir: " + str(tmp_path / "runs") in done.stdout
    assert "imported: []" in done.stderr, done.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # neither the run dir nor Hydra's files
    assert seconds < 6, f"{seconds:.1f} s"


def test_cfg_job_is_fast_and_imports_nothing_heavy(tmp_path):
    done, seconds = _cli(tmp_path, "--cfg", "job", "model=falcon_h1_34b", code=_MAIN_THEN_MODULES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "name: falcon_h1_34b" in done.stdout
    assert "imported: []" in done.stderr, done.stderr[-2000:]
    assert os.listdir(tmp_path) == []
    assert seconds < 6, f"{seconds:.1f} s"
