"""Config composition: every preset and override group composes into a typed recipe;
bad overrides fail before training with the key named."""

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
def test_model_yaml_names_its_preset_and_repeats_no_field(name):
    data = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    assert data == {"defaults": [{"/model_preset@_here_": name}, "_self_"]}


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

    recipe = compose_recipe(["model=falcon_h1_0_5b", "model.key_multiplier=0.5"])
    cfg = effective_model_config(recipe)
    assert cfg.key_multiplier == 0.5 and cfg.embedding_multiplier == PRESETS["falcon_h1_0_5b"].embedding_multiplier
    unit = effective_model_config(compose_recipe(["model=falcon_h1_0_5b", "mup=unit"]))
    assert unit.ssm_multipliers == [1.0] * 5 and unit.lm_head_multiplier == 1.0


def test_mup_derived_follows_the_composed_width_and_explicit_values_win():
    from recipes.build import effective_model_config, mup_report

    recipe = compose_recipe(["model=falcon_h1_0_5b", "model.hidden_size=1536", "mup=derived",
                             "model.key_multiplier=0.5"])
    cfg = effective_model_config(recipe)
    # the width relations, written out: 40 / H, 1280 / H, 491520 / (H * heads * head_dim)
    assert cfg.lm_head_multiplier == 40 / 1536 and cfg.ssm_in_multiplier == 1280 / 1536
    assert cfg.attention_out_multiplier == 491520 / (1536 * 8 * 64)
    assert cfg.mlp_multipliers[1] == 1228800 / (1536 * 2048)
    assert cfg.key_multiplier == 0.5
    report = mup_report(recipe)
    assert len(report) == 1 and "model.key_multiplier = 0.5" in report[0] and "mup = derived" in report[0]
    same = compose_recipe(["model=falcon_h1_0_5b", "model.hidden_size=1536", "mup.mode=derived"])
    assert same.model.lm_head_multiplier == 40 / 1536


def test_mup_preset_keeps_published_values_at_a_new_width_and_reports_overrides():
    from recipes.build import mup_report

    recipe = compose_recipe(["model=falcon_h1_7b", "model.hidden_size=4096", "model.lm_head_multiplier=0.01"])
    assert recipe.model.key_multiplier == PRESETS["falcon_h1_7b"].key_multiplier
    assert recipe.model.lm_head_multiplier == 0.01
    assert mup_report(recipe) == [
        "model.lm_head_multiplier = 0.01 set explicitly, kept over preset falcon_h1_7b's 0.013020833333333334"]
    unit = compose_recipe(["model=falcon_h1_7b", "mup=unit", "model.ssm_multipliers=[2,2,2,2,2]"])
    assert unit.model.ssm_multipliers == [2.0] * 5 and unit.model.mlp_multipliers == [1.0, 1.0]


@pytest.mark.parametrize("override", ["mup.lm_head_multiplier=0.02", "+mup.ssm_multipliers=[1,1,1,1,1]"])
def test_moved_multiplier_keys_name_the_new_key(override):
    key = override.lstrip("+").split("=")[0].split(".")[1]
    with pytest.raises(ConfigValueError, match=f"set model.{key}"):
        compose_recipe([override])


def test_unknown_mup_mode_is_named():
    with pytest.raises(Exception, match="mup.mode = 'sometimes'"):
        compose_recipe(["model=falcon_h1_0_5b", "mup.mode=sometimes"])


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


def test_cli_prints_derived_multipliers_of_a_new_width():
    proc = _cli("--cfg", "job", "model=falcon_h1_0_5b", "model.hidden_size=1536", "mup=derived")
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)["model"]
    assert model["lm_head_multiplier"] == 40 / 1536 and model["hidden_size"] == 1536
    assert model["embedding_multiplier"] == 4 * math.sqrt(2)


def test_cli_moved_key_is_one_clear_error():
    proc = _cli("--cfg", "job", "mup.lm_head_multiplier=0.02")
    assert proc.returncode == 2 and "set model.lm_head_multiplier" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_override_is_one_clear_error(tmp_path):
    proc = _cli("model.attention_ratio=1.5", f"train.run_dir={tmp_path}/run")
    assert proc.returncode != 0
    assert "model.attention_ratio = 1.5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
