"""Issue 18 item 11: the smaller faults, each shown by a real run of the micro model (falcon-train
or the worker every launched rank runs): a stray key, intervals that cannot work, a diverged run,
a gradient that is exactly 0, a Hugging Face load_dir that computes another model, the summary of
a run without trackers, run errors at the CLI, and the README's load_trained_model line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from falcon_h1.errors import ConfigValueError
from recipes.api import compose_recipe
from recipes.build import validate_recipe
from tests.conftest import REPO
from tests.recipes import reliability_runs as runs

QUIET = ("train.sample_tokens=0",)


def _one_paragraph_error(proc, code: int) -> str:
    """The CLI's error line (falcon-train: error: ...), after checking the exit code and that no
    traceback was shown."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("falcon-train: error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def test_a_key_added_with_plus_that_is_no_setting_is_refused_naming_the_close_one(tmp_path):
    proc = runs.run_cli(tmp_path / "run", "+train.max_stepz=5", "train.max_steps=3", *QUIET)
    error = _one_paragraph_error(proc, 2)
    assert "train.max_stepz = 5 is not a setting" in error and "did you mean train.max_steps?" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.parametrize("override, allowed", [
    ("train.log_interval=0", "a positive integer"),
    ("train.log_interval=-2", "a positive integer"),
    ("train.eval_iters=0", "a positive integer"),
    ("train.save_interval=-5", "an integer >= 0 (0: no checkpoints)"),
    ("train.eval_interval=-1", "an integer >= 0 (0: no evaluation)"),
    ("train.exit_after_steps=-1", "an integer >= 0 (0: never)"),
])
def test_intervals_that_cannot_work_are_refused_before_training(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigValueError) as raised:
        validate_recipe(compose_recipe(runs.COMMON + [override]))
    assert str(raised.value) == f"{key} = {value} is not allowed: {allowed}."


def test_log_interval_0_ends_the_cli_with_the_setting_named(tmp_path):
    proc = runs.run_cli(tmp_path / "run", "train.log_interval=0", "train.max_steps=3", *QUIET)
    assert "ZeroDivisionError" not in proc.stderr
    assert _one_paragraph_error(proc, 2) == ("falcon-train: error: train.log_interval = 0 is not allowed: "
                                             "a positive integer.")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """falcon-train at lr 1e30: step 1 is finite and saved, its update makes step 2's gradients NaN."""
    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    overrides = ("train.max_steps=4", "train.lr=1e30", "train.min_lr=0", "train.warmup_steps=0",
                 "train.save_interval=1", *QUIET)
    return run_dir, overrides, runs.run_cli(run_dir, *overrides)


def test_a_nan_stop_names_the_step_it_happened_at_and_the_checkpoint_to_resume_from(diverged):
    run_dir, _, proc = diverged
    error = _one_paragraph_error(proc, 1)
    ckpt_root = run_dir / "checkpoints"
    assert error.startswith("falcon-train: error: step 2: training diverged: the gradient is not finite"), error
    assert "iteration 0" not in error
    assert f"the newest checkpoint is step 1 ({ckpt_root})" in error and "train.lr" in error
    assert sorted(runs.losses(run_dir)) == [1]  # step 1 logged, step 2 never was
    assert sorted(p.name for p in ckpt_root.glob("iter_*")) == ["iter_0000001"]  # step 2 not saved


def test_an_unreadable_checkpoint_ends_the_cli_with_one_paragraph(diverged, tmp_path):
    source, overrides, _ = diverged
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "checkpoints" / "iter_0000001" / ".metadata").unlink()
    error = _one_paragraph_error(runs.run_cli(run_dir, *overrides), 1)
    assert f"no checkpoint under {run_dir / 'checkpoints'} can be loaded" in error, error
    assert ".metadata is missing" in error


@pytest.fixture(scope="module")
def zero_gradient(tmp_path_factory):
    """A run whose lm_head multiplier is 0: the logits are 0 whatever the weights, so every
    gradient is exactly 0; no trackers (logger=none)."""
    run_dir = tmp_path_factory.mktemp("zero") / "run"
    proc = runs.run(runs.write_recipe(run_dir, "logger=none", "model.lm_head_multiplier=0.0", "train.max_steps=3",
                                      "train.save_interval=3", *QUIET))
    return run_dir, proc


def test_a_gradient_norm_of_exactly_0_is_warned_about_once(zero_gradient):
    run_dir, proc = zero_gradient
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["grad_norm"] for row in rows] == [0.0, 0.0, 0.0]  # the fault is real
    warnings = [line for line in proc.stderr.splitlines() if "gradient norm is exactly 0" in line]
    assert len(warnings) == 1 and warnings[0].startswith("falcon-train: warning: step 1:"), proc.stderr[-3000:]
    assert "model.*_multiplier" in warnings[0]


def test_a_run_without_trackers_names_no_tracker_and_only_paths_that_exist(zero_gradient):
    run_dir, proc = zero_gradient
    summary = proc.stdout[proc.stdout.index("finished 3 steps"):]
    assert "W&B" not in summary and "wandb" not in summary and "TensorBoard" not in summary, summary
    for path in re.findall(rf"{re.escape(str(run_dir))}\S*", summary):
        assert Path(path).exists(), (path, summary)
    assert f"metrics:     {run_dir}/metrics.jsonl" in summary


def test_the_readme_load_trained_model_line_matches_what_it_returns(zero_gradient, megatron_single):
    import recipes.api  # noqa: F401 (the README line's name)

    run_dir, _ = zero_gradient
    readme = (REPO / "README.md").read_text()
    shown = re.findall(r"`([^`=]+= recipes\.api\.load_trained_model\(run_dir\))`", readme)
    assert shown, "README.md shows no assignment from recipes.api.load_trained_model(run_dir)"
    names = {"recipes": recipes, "run_dir": str(run_dir)}
    exec(shown[0], names)
    assert names["step"] == 3 and names["recipe"].model.lm_head_multiplier == 0.0
    assert type(names["model"]).__name__ == "FalconH1Model"


def test_a_hugging_face_load_dir_that_computes_another_model_is_refused(tmp_path, megatron_single):
    import falcon_h1
    from falcon_h1.config import resolve
    from recipes.build import build_model_for, effective_model_config

    recipe = compose_recipe(runs.COMMON)
    falcon_h1.to_hf(build_model_for(recipe, resolve(effective_model_config(recipe))), tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["lm_head_multiplier"] != 0.5 and config["rms_norm_eps"] != 1e-3
    config.update(lm_head_multiplier=0.5, rms_norm_eps=1e-3)  # same shapes, another model
    config_file.write_text(json.dumps(config))
    proc = runs.run(runs.write_recipe(tmp_path / "run", f"train.load_dir={tmp_path / 'hf'}", "train.max_steps=3",
                                      "train.save_interval=0", *QUIET), ok=False)
    assert "model.lm_head_multiplier = " in proc.stderr and "config.json 0.5" in proc.stderr, proc.stderr[-3000:]
    assert "model.rms_norm_eps = 1e-05, config.json 0.001" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
