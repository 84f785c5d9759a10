"""Hydra's own copies of a `falcon-train` job's config, kept free of secrets.

Hydra writes `config.yaml`, `hydra.yaml` and `overrides.yaml` into `OUTPUT_DIR/hydra` (and a
sweep's `multirun.yaml`) before the app starts, with every value as it was given, environment
values included. `scrub_hydra_copies` rewrites them with the values masked as in
`run_dir/config.yaml` (`recipes.run_metadata`).

Hydra's output directory is the run directory when the job runs where its files land: here
(executor.kind=local) or on a Slurm cluster reached from this machine. For jobs placed
elsewhere (Kubernetes pods, Slurm over ssh) it is a temporary directory removed when the
process ends, so launching them leaves nothing on this machine.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from recipes.run_metadata import scrub_override, scrub_secrets

RUN_DIR_RESOLVER = "hydra_output_dir"
_elsewhere_output_dir: str | None = None


def run_dir_is_here(executor_kind: str, slurm_tunnel: str) -> bool:
    """Whether the job's run directory is on this machine's file system."""
    return executor_kind == "local" or (executor_kind == "slurm" and slurm_tunnel == "local")


def _hydra_output_dir(executor_kind: str, slurm_tunnel: str, run_dir: str) -> str:
    global _elsewhere_output_dir
    if run_dir_is_here(executor_kind, slurm_tunnel):
        return run_dir
    if _elsewhere_output_dir is None:
        _elsewhere_output_dir = tempfile.mkdtemp(prefix="falcon-train-hydra-")
        atexit.register(shutil.rmtree, _elsewhere_output_dir, ignore_errors=True)
    return _elsewhere_output_dir


def register_output_dir_resolver() -> None:
    """`${hydra_output_dir:KIND,TUNNEL,RUN_DIR}`, configs/config.yaml's `hydra.run.dir`."""
    if not OmegaConf.has_resolver(RUN_DIR_RESOLVER):
        OmegaConf.register_new_resolver(RUN_DIR_RESOLVER, _hydra_output_dir)


def scrub_hydra_copies(hydra_cfg: Any) -> None:
    """Mask secrets and environment values in the files Hydra wrote for this job
    (`hydra_cfg`: `HydraConfig.get()`)."""
    from hydra.types import RunMode

    paths = []
    if hydra_cfg.output_subdir is not None:
        paths += sorted((Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir).glob("*.yaml"))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        paths.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    # hydra.job.override_dirname joins the overrides with kv_sep in place of "=".
    kv_sep = hydra_cfg.job.config.override_dirname.kv_sep
    masked = {raw: scrub_override(raw) for raw in hydra_cfg.overrides.task if scrub_override(raw) != raw}
    masked.update({raw.replace("=", kv_sep): text.replace("=", kv_sep) for raw, text in list(masked.items())})
    for path in paths:
        if path.is_file():
            tree = scrub_secrets(yaml.safe_load(path.read_text()))
            path.write_text(yaml.safe_dump(_mask_overrides(tree, masked), sort_keys=False))


def _mask_overrides(value: Any, masked: dict[str, str], in_list: bool = False) -> Any:
    if isinstance(value, dict):
        return {key: _mask_overrides(item, masked) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask_overrides(item, masked, in_list=True) for item in value]
    if isinstance(value, str):
        if in_list:  # an override list, e.g. a sweep's own overrides in multirun.yaml
            value = scrub_override(value)
        for raw, text in masked.items():
            value = value.replace(raw, text)
    return value
