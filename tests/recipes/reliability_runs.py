"""Real tiny training runs for the reliability tests: a recipe file per run directory and
`python -m recipes.worker` in a fresh process (what every launched rank runs), or `falcon-train`
itself (`run_cli`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from recipes.api import compose_recipe
from recipes.recipe_file import recipe_to_yaml
from tests.conftest import REPO

COMMON = ["model=falcon_h1_micro", "model.vocab_size=320", "logger.wandb=false", "logger.progress_bar=false",
          "logger.tensorboard=false", "data.seq_length=64", "train.micro_batch_size=4",
          "train.global_batch_size=8", "train.lr=3e-3", "train.warmup_steps=2"]


def write_recipe(run_dir: Path, *overrides: str) -> Path:
    """The recipe file of a run in `run_dir` (kept next to it, outside it)."""
    recipe = compose_recipe(COMMON + [f"train.run_dir={run_dir}", *overrides])
    tag = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    path = run_dir.with_name(f"{run_dir.name}-{tag}.yaml")
    path.write_text(recipe_to_yaml(recipe))
    return path


def worker_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def start(recipe: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipes.worker", str(recipe)], cwd=REPO, env=worker_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(recipe: Path, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Train `recipe` in a fresh process; `ok`: it must exit 0 (else it must fail)."""
    proc = subprocess.run([sys.executable, "-m", "recipes.worker", str(recipe)], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) is ok, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_cli(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`falcon-train` (python -m recipes.train) with COMMON + `overrides` in `run_dir`, in a fresh
    process; the caller checks its exit code."""
    return subprocess.run([sys.executable, "-m", "recipes.train", *COMMON, f"train.run_dir={run_dir}", *overrides],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
