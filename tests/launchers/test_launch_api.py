"""launchers.launch / validate_executor: dispatch, the recipe file, W&B info."""

from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from falcon_h1.errors import ConfigValueError
from launchers import EXECUTOR_KINDS, validate_executor
from recipes.launch import launch


def test_unknown_executor_kind_names_the_field_and_the_choices(recipe):
    recipe.executor.kind = "lsf"
    for call in (lambda: validate_executor(recipe.executor), lambda: launch(recipe, dryrun=True)):
        with pytest.raises(ConfigValueError) as raised:
            call()
        message = str(raised.value)
        assert "executor.kind = 'lsf'" in message
        assert all(kind in message for kind in EXECUTOR_KINDS)


def test_now_interpolation_is_resolved_once(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe.executor.kind = "slurm"
    recipe.train.run_dir = "runs/${now:%Y%m%d-%H%M%S}"
    result = launch(recipe, dryrun=True)
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/runs/\d{8}-\d{6}", result.run_dir)
    assert yaml.safe_load(result.recipe_yaml)["train"]["run_dir"] == result.run_dir
    assert "${now:" not in result.recipe_yaml and "${now:" not in result.rendered


def test_recipe_yaml_text_or_file_is_what_runs(recipe, tmp_path):
    recipe.executor.kind = "slurm"
    text = OmegaConf.to_yaml(OmegaConf.structured(recipe)).replace("max_steps: 10", "max_steps: 77")
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    for given in (text, str(path)):
        result = launch(recipe, recipe_yaml=given, dryrun=True)
        assert yaml.safe_load(result.recipe_yaml)["train"]["max_steps"] == 77


def test_recipe_yaml_with_a_stray_key_fails_here(recipe):
    text = OmegaConf.to_yaml(OmegaConf.structured(recipe)).replace("max_steps:", "max_stepz:")
    with pytest.raises(ConfigKeyError, match="max_stepz"):
        launch(recipe, recipe_yaml=text, dryrun=True)


def test_wandb_info_follows_the_logger_settings(recipe, monkeypatch):
    recipe.executor.kind = "slurm"
    assert launch(recipe, dryrun=True).wandb is None  # logger.wandb = false
    recipe.logger.wandb = True
    recipe.logger.wandb_entity = "falcon-team"
    recipe.logger.wandb_run_name = "tiny-slurm"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    info = launch(recipe, dryrun=True).wandb
    assert (info.project, info.entity, info.name, info.mode) == ("falcon-h1", "falcon-team", "tiny-slurm", "online")
    assert info.url() is None  # the run id exists only once rank 0 has started
    monkeypatch.delenv("WANDB_API_KEY")
    assert launch(recipe, dryrun=True).wandb.mode == "offline"


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        (["executor=slurm", "executor.slurm.partition=batch", "executor.slurm.nodes=2"], "slurm"),
        (["executor=kubernetes", "executor.kubernetes.image=ghcr.io/x/falcon:1"], "kubernetes"),
    ],
)
def test_the_shipped_executor_configs_launch(overrides, kind, tmp_path, monkeypatch):
    """configs/executor/*.yaml, composed the way falcon-train does, dry-run cleanly."""
    from recipes.api import compose_recipe

    monkeypatch.chdir(tmp_path)
    recipe = compose_recipe(overrides)
    recipe.executor.kubernetes.pvcs = {"runs": "/runs"}  # run_dir must be on a volume
    result = launch(recipe, dryrun=True)
    assert result.kind == kind and result.rendered
    assert "dry run, nothing submitted" in str(result) and result.rendered in str(result)


def test_the_shipped_kubernetes_config_needs_an_image():
    from recipes.api import compose_recipe

    with pytest.raises(ConfigValueError, match="executor.kubernetes.image"):
        validate_executor(compose_recipe(["executor=kubernetes"]).executor)


def test_launchers_take_a_job_whatever_its_recipe_file_holds():
    """launchers.launch knows the executor settings only: it places the run directory and asks
    the caller for the recipe file's text for that directory."""
    from launchers import ExecutorConfig, Job, launch as launch_job

    asked = []

    def recipe_yaml_for(run_dir: str) -> str:
        asked.append(run_dir)
        return f"anything: {run_dir}\n"

    executor = ExecutorConfig(kind="kubernetes")
    executor.kubernetes.image, executor.kubernetes.pvcs = "ghcr.io/x/falcon:1", {"runs": "/runs"}
    result = launch_job(Job(name="Any Job", run_dir="exp/1", executor=executor, recipe_yaml_for=recipe_yaml_for,
                            worker_module="my.worker"), dryrun=True)
    assert asked == ["/runs/exp/1"] and result.run_dir == "/runs/exp/1"
    configmap, job = yaml.safe_load_all(result.rendered)
    assert configmap["data"]["recipe.yaml"] == result.recipe_yaml == "anything: /runs/exp/1\n"
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[-1].endswith("-m my.worker /etc/falcon-recipe/recipe.yaml")
    assert result.wandb is None  # W&B is the trainer's business: recipes.launch fills it in
