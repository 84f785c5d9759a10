"""Config composition: every preset and override group composes into a typed recipe;
bad overrides fail before training with the key named."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from falcon_h1.presets import PRESETS
from recipes.api import CONFIG_DIR, compose_recipe, falcon_h1_pretrain
from falcon_h1.errors import ConfigValueError
from recipes.build import validate_recipe
from recipes.config import RecipeConfig

GROUPS = {path.name: sorted(p.stem for p in path.glob("*.yaml")) for path in CONFIG_DIR.iterdir() if path.is_dir()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_yaml_equals_python_preset(name):
    data = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    expected = dataclasses.asdict(PRESETS[name])
    assert data.keys() == expected.keys()
    for key, value in expected.items():
        assert data[key] == value or (isinstance(value, list) and math.isinf(value[-1])), key


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "indexed":
        overrides += ["data.paths=[/nonexistent/prefix]", "data.tokenizer=byte"]
    recipe = compose_recipe(overrides)
    assert isinstance(recipe, RecipeConfig)
    if group == "model":
        assert recipe.model == PRESETS[option]


def test_python_api_matches_cli_composition():
    api = falcon_h1_pretrain("0.5b", train={"max_steps": 7}, parallel={"tp": 2})
    cli = compose_recipe(["model=falcon_h1_0_5b", "train=pretrain", "bitnet=off", "executor=local",
                          "train.max_steps=7", "parallel.tp=2"])
    api.train.run_dir = cli.train.run_dir = "x"
    assert api == cli


def test_mup_overrides_apply_over_preset():
    from recipes.build import effective_model_config

    recipe = compose_recipe(["model=falcon_h1_0_5b", "mup.key_multiplier=0.5"])
    cfg = effective_model_config(recipe)
    assert cfg.key_multiplier == 0.5 and cfg.embedding_multiplier == PRESETS["falcon_h1_0_5b"].embedding_multiplier
    unit = effective_model_config(compose_recipe(["model=falcon_h1_0_5b", "mup=unit"]))
    assert unit.ssm_multipliers == [1.0] * 5 and unit.lm_head_multiplier == 1.0


@pytest.mark.parametrize("override,key", [
    ("train.max_stepz=5", "max_stepz"),
    ("train.max_steps=five", "max_steps"),
    ("model=falcon_h1_9b", "falcon_h1_9b"),
])
def test_typo_or_wrong_type_fails_naming_the_key(override, key):
    with pytest.raises(Exception) as err:
        compose_recipe([override])
    assert key in str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["model.attention_ratio=1.5"], "model.attention_ratio"),
    (["parallel.tp=3", "model.num_attention_heads=8", "model.num_key_value_heads=8"], "parallel.tp = 3"),
    (["data=indexed", "data.paths=[/nonexistent/prefix]", "data.tokenizer=byte"], "data.paths"),
    (["bitnet=on", "bitnet.layers=[attention_qkv,conv]"], "bitnet.layers"),
    (["train.precision=fp8"], "train.precision"),
])
def test_invalid_recipe_fails_before_training(overrides, key):
    with pytest.raises((ConfigValueError, ValueError)) as err:
        validate_recipe(compose_recipe(overrides))
    assert key in str(err.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "recipes.train", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


def test_cli_prints_34b_config_without_allocating():
    proc = _cli("--cfg", "job", "model=falcon_h1_34b", "parallel.tp=8")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["hidden_size"] == 5120 and printed["parallel"]["tp"] == 8


def test_cli_bad_override_is_one_clear_error(tmp_path):
    proc = _cli("model.attention_ratio=1.5", f"train.run_dir={tmp_path}/run")
    assert proc.returncode != 0
    assert "model.attention_ratio = 1.5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
