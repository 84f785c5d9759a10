"""`falcon-train` (`python -m recipes.train`) writes no environment value given in
`executor.*.env_vars` anywhere but the job's environment: every file under the run directory
(which is also Hydra's output directory) and the process's stdout / stderr are searched for
the value, and a Kubernetes dry run must leave no file behind on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

SLURM_VALUE = "slurm-env-value-4b7e1d"
KUBE_VALUE = "kube-env-value-93c0aa"
ENV_OVERRIDES = [f"+executor.slurm.env_vars.MY_SERVICE_URL={SLURM_VALUE}",
                 f"++executor.kubernetes.env_vars.HF_HOME={KUBE_VALUE}"]
TINY_RUN = ["model=falcon_h1_micro", "model.vocab_size=320", "data.seq_length=64", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.max_steps=2", "train.warmup_steps=0", "train.save_interval=2",
            "train.sample_tokens=0", "logger.progress_bar=false"]


def falcon_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(cwd.parent / "tmp"),
               WANDB_CONFIG_DIR=str(cwd.parent / "wandb_config"), WANDB_CACHE_DIR=str(cwd.parent / "wandb_cache"))
    (cwd.parent / "tmp").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "recipes.train", *overrides, *ENV_OVERRIDES], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_no_env_value_in(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    for text, where in [(proc.stdout, "stdout"), (proc.stderr, "stderr")] + [
        (path.read_bytes().decode("latin-1"), str(path)) for path in files
    ]:
        for value in (SLURM_VALUE, KUBE_VALUE):
            assert value not in text, f"{value} written to {where}"


def test_a_local_run_writes_the_env_vars_names_only(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    run_dir = cwd / "run"
    proc = falcon_train(cwd, *TINY_RUN, f"train.run_dir={run_dir}")
    assert "finished 2 steps" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B recorded the config and argv
    assert_no_env_value_in(proc, run_dir)
    hydra_overrides = (run_dir / "hydra" / "overrides.yaml").read_text()
    assert "+executor.slurm.env_vars.MY_SERVICE_URL=***" in hydra_overrides
    # The other overrides are kept as given, numbers under secret-looking names too.
    assert "train.max_steps=2" in hydra_overrides and "train.sample_tokens=0" in hydra_overrides
    assert "MY_SERVICE_URL: '***'" in (run_dir / "hydra" / "config.yaml").read_text()


def test_a_slurm_dry_run_prints_the_env_vars_names_only(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    run_dir = cwd / "run"
    proc = falcon_train(cwd, "dryrun=true", "executor=slurm", "executor.nproc_per_node=1",
                        "executor.slurm.gpus_per_node=0", f"train.run_dir={run_dir}")
    assert "export MY_SERVICE_URL='***'" in proc.stdout  # the sbatch script
    assert not run_dir.exists()  # a dry run leaves no run dir (nor Hydra's copies) behind
    assert_no_env_value_in(proc, cwd)


def test_a_kubernetes_dry_run_creates_nothing_here(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = falcon_train(cwd, "dryrun=true", "executor=kubernetes", "executor.kubernetes.image=img:1")
    assert "kind: Secret" in proc.stdout and "HF_HOME: '***'" in proc.stdout
    assert_no_env_value_in(proc, cwd)
    assert list(cwd.iterdir()) == []
    assert not list((tmp_path / "tmp").glob("falcon-train-hydra-*"))
