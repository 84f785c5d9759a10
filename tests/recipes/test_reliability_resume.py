"""Issue 18 items 8 and 9: a rerun in an existing run directory.

8: a resumed run keeps the fields that decide the model and the data order (refused with the
   field named and the way out) and may change the others (lr, max_steps, intervals, ...).
9: a cut-off last line of metrics.jsonl is dropped and said so; a resumed run says where it
   resumed from and its summary covers the whole run; rerunning a finished run says so and
   changes no file."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from recipes.api import compose_recipe
from falcon_h1.errors import ConfigValueError
from tests.recipes import reliability_runs as runs

PLAN = ("train.max_steps=4", "train.save_interval=2")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of 4 planned steps stopped after its step-2 checkpoint (resumable, not finished)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    runs.run(runs.write_recipe(run_dir, *PLAN, "train.exit_after_steps=2"))
    return run_dir


def _copy(stopped, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


@pytest.mark.parametrize("override, field", [
    ("bitnet=on", "bitnet.enabled = False (this recipe: True; changes the model)"),
    ("data.seq_length=32", "data.seq_length = 64 (this recipe: 32; changes the data order)"),
    ("train.seed=7", "train.seed = 1234 (this recipe: 7; changes the data order)"),
    ("model.ssm_out_multiplier=0.5", "model.ssm_out_multiplier = 1.0 (this recipe: 0.5; changes the model)"),
    ("train.adam_beta1=0.8", "train.adam_beta1 = 0.9 (this recipe: 0.8; is restored with the optimizer state"),
    ("parallel.distributed_optimizer=true", "parallel.distributed_optimizer = False"),
    ("train.optimizer_offload_fraction=0.5", "train.optimizer_offload_fraction = 0.0 (this recipe: 0.5; lays"),
])
def test_changed_model_or_data_fields_are_refused_with_the_way_out(stopped, override, field):
    from recipes.resume import check_resume_config

    recipe = compose_recipe(runs.COMMON + [f"train.run_dir={stopped}", *PLAN, override])
    with pytest.raises(ConfigValueError) as refused:
        check_resume_config(recipe, stopped)
    message = str(refused.value)
    assert field in message and "\n" not in message
    assert f"train.load_dir={stopped}" in message and "config.yaml" in message


def test_another_layer_pattern_is_refused_before_megatron_reads_the_checkpoint(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    before = runs.snapshot(run_dir)
    out = runs.run(runs.write_recipe(run_dir, *PLAN, "model.layer_pattern=MA"), ok=False)
    message = out.stderr.strip().splitlines()[-1]
    assert "ConfigValueError" in message and "model.layer_pattern = None (this recipe: 'MA'; changes the model)" in message
    assert len(message) < 1500  # one paragraph, not Megatron's list of every key
    assert runs.snapshot(run_dir) == before


def test_safe_changes_are_allowed_and_take_effect(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    out = runs.run(runs.write_recipe(run_dir, "train.max_steps=5", "train.save_interval=5", "train.lr=1e-3",
                                     "train.min_lr=1e-4", "train.weight_decay=0.05", "train.grad_clip=0.5",
                                     "train.log_interval=2", "train.keep_checkpoints=1"))
    assert "finished 5 steps" in out.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # this launch logs its first step, then every 2nd
    lr_step_3 = next(row["lr"] for row in rows if row["step"] == 3)
    assert lr_step_3 == pytest.approx(1e-4 + 9e-4 * 0.75)  # cosine 1e-3 -> 1e-4 over steps 2..5 (was 1.65e-3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "iter_0000005", "latest_checkpointed_iteration.txt"]


def test_cut_off_metrics_line_is_dropped_and_the_resumed_summary_covers_the_whole_run(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    first_launch = runs.losses(run_dir)
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 3, "loss": 4.2, "lr": 0.00')  # killed while writing step 3
    out = runs.run(runs.write_recipe(run_dir, *PLAN))
    assert re.search(r"metrics\.jsonl: dropped its cut-off last line \(\d+ bytes", out.stderr), out.stderr[-3000:]
    assert f"resumed from step 2 ({run_dir / 'checkpoints' / 'iter_0000002'})" in out.stdout
    logged = runs.losses(run_dir)
    assert sorted(logged) == [1, 2, 3, 4] and logged[1] == first_launch[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["first_loss"] == first_launch[1] and summary["final_loss"] == logged[4]
    assert f"finished 4 steps: loss {first_launch[1]:.4f} -> {logged[4]:.4f}" in out.stdout

    # Rerunning the finished run says so and leaves every file as it was.
    before = runs.snapshot(run_dir)
    again = runs.run(runs.write_recipe(run_dir, *PLAN))
    assert f"{run_dir} is already finished: its latest checkpoint is step 4 and train.max_steps = 4" in again.stdout
    assert "resumed from" not in again.stdout
    assert f"finished 4 steps: loss {first_launch[1]:.4f} -> {logged[4]:.4f}" in again.stdout
    assert runs.snapshot(run_dir) == before
