"""Shared fixtures for the launcher tests: recipes, and a real one-node Slurm cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # fake_worker / local_slurm live next to the tests

import local_slurm  # noqa: E402

FAKE_WORKER = "fake_worker"


@pytest.fixture
def recipe(tmp_path):
    """A tiny CPU recipe whose run_dir is in the test's temp dir (no W&B, no TensorBoard)."""
    from recipes.config import RecipeConfig

    config = RecipeConfig()
    config.train.run_dir = str(tmp_path / "run")
    config.train.max_steps = 10
    config.train.save_interval = 5
    config.logger.wandb = False
    config.logger.tensorboard = False
    config.logger.progress_bar = False
    return config


def _cannot_run_slurm(reason: str):
    # CI runs as root on a fresh Debian machine: there the cluster must come up.
    if os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"the Slurm test cluster is required in CI: {reason}")
    pytest.skip(f"no Slurm test cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd + munged on localhost, started for this session and stopped after.

    Installs the Debian packages when missing (root only). Client commands find the
    cluster through SLURM_CONF, which is set for the session and restored afterwards.
    """
    if local_slurm.missing_binaries():
        reason = local_slurm.install_with_apt()
        if reason is not None or local_slurm.missing_binaries():
            _cannot_run_slurm(reason or f"still missing: {local_slurm.missing_binaries()}")
    cluster = local_slurm.LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    previous_conf = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
    except Exception as error:
        cluster.stop()
        _cannot_run_slurm(f"the daemons did not start: {error}")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
