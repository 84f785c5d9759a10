"""Issue 18 items 5 and 7: damaged checkpoints are survived, a full disk is named, old
checkpoints are pruned. Real files, changed byte by byte; the reference for every resumed loss
is the same run done straight through (exact float equality)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # engine_testutil
from recipes.api import compose_recipe
from falcon_h1.errors import ConfigValueError
from recipes.build import validate_recipe
from tests.recipes import reliability_runs as runs

SAVE_EVERY_2 = ("train.max_steps=6", "train.save_interval=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    runs.run(runs.write_recipe(run_dir, *SAVE_EVERY_2))
    return run_dir, runs.losses(run_dir)


def _truncate_shard(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    with open(shard, "r+b") as stream:
        stream.truncate(shard.stat().st_size // 2)
    return "__0_0.distcp is .* bytes, saved as .* \\(truncated\\)"


def _delete_metadata(ckpt: Path) -> str:
    (ckpt / ".metadata").unlink()
    return "\\.metadata is missing"


def _change_1kib_of_weights(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    with open(shard, "r+b") as stream:
        stream.seek(shard.stat().st_size // 2)
        data = stream.read(1024)
        stream.seek(-len(data), 1)
        stream.write(bytes(byte ^ 0xFF for byte in data))  # same size, other values
    return "__0_0.distcp has another SHA-256 than when it was saved"


@pytest.mark.parametrize("damage", [_truncate_shard, pytest.param(_delete_metadata, marks=pytest.mark.slow),
                                    pytest.param(_change_1kib_of_weights, marks=pytest.mark.slow)],
                         ids=["truncated_shard", "deleted_metadata", "changed_1kib"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one_identically(reference, tmp_path, damage):
    straight_dir, straight = reference
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir, run_dir)
    newest = run_dir / "checkpoints" / "iter_0000006"
    reason = damage(newest)
    out = runs.run(runs.write_recipe(run_dir, *SAVE_EVERY_2))
    said = out.stdout + out.stderr
    assert re.search(f"{re.escape(str(newest))}: {reason}", said), said[-3000:]
    assert f"resumed from step 4 ({run_dir / 'checkpoints' / 'iter_0000004'})" in out.stdout
    assert "weights_only" not in said
    assert runs.losses(run_dir) == straight  # steps 5 and 6 trained again, bit-identical
    from recipes.checkpoint_files import read_manifest, verification_problems

    manifest, _ = read_manifest(newest)  # the re-saved step 6 replaced the damaged one
    assert not verification_problems(newest, manifest, manifest["files"])


def _tiny_state(seed: int):
    from engine_testutil import configs, tiny_gpt
    from recipes.optim import build_optimizer, wrap_model
    from recipes.schedules import build_scheduler

    model, config = tiny_gpt(seed)
    train_cfg, parallel_cfg = configs(lr=0.01, min_lr=0.001, warmup_steps=1, max_steps=8)
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    optimizer = build_optimizer(ddp, train_cfg, parallel_cfg)
    return ddp, optimizer, build_scheduler(optimizer, train_cfg)


def test_no_loadable_checkpoint_names_each_one_and_why(megatron_single, tmp_path):
    from engine_testutil import train
    from recipes.checkpoint_files import MANIFEST
    from recipes.checkpointing import CheckpointError, load_latest_checkpoint, save_checkpoint

    state = _tiny_state(1)
    for step in (1, 2):
        train(*state, step - 1, 1, 2)
        save_checkpoint(tmp_path, step, *state)
    _truncate_shard(tmp_path / "iter_0000002")
    (tmp_path / "iter_0000001" / MANIFEST).write_text('{"files": ')  # the manifest itself cut off
    with pytest.raises(CheckpointError) as error:
        load_latest_checkpoint(tmp_path, *_tiny_state(2))
    message = str(error.value)
    assert f"{tmp_path / 'iter_0000002'}: __0_0.distcp is" in message and "(truncated)" in message
    assert f"{tmp_path / 'iter_0000001'}: {MANIFEST} is unreadable" in message
    assert "weights_only" not in message and "train.run_dir" in message


def test_keep_checkpoints_keeps_the_newest_n_complete_ones(megatron_single, tmp_path):
    from engine_testutil import train
    from recipes.checkpointing import load_latest_checkpoint, save_checkpoint

    state = _tiny_state(3)
    (tmp_path / "iter_0000000.tmp").mkdir(parents=True)  # left by a killed save of a step not saved again
    for step in range(1, 6):
        train(*state, step - 1, 1, 2)
        save_checkpoint(tmp_path, step, *state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"]
    assert load_latest_checkpoint(tmp_path, *_tiny_state(4))[0] == 5


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_is_refused_with_the_field_named(keep):
    recipe = compose_recipe(runs.COMMON + [f"train.keep_checkpoints={keep}"])
    with pytest.raises(ConfigValueError, match=f"train.keep_checkpoints = {keep} is not allowed: an integer >= 1"):
        validate_recipe(recipe)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MB tmpfs (needs root and `mount`), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no `mount` command to make a small tmpfs")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); it needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_is_named_with_the_size_needed_and_the_previous_checkpoint_kept(reference, small_tmpfs):
    _, straight = reference
    run_dir = small_tmpfs / "run"
    recipe = runs.write_recipe(run_dir, *SAVE_EVERY_2, "train.keep_checkpoints=1")
    failed = runs.run(recipe, ok=False)  # step 2 fits, step 4 does not (both exist until 4 is complete)
    message = failed.stderr.strip().splitlines()[-1]
    ckpt_root = run_dir / "checkpoints"
    needed = re.search(rf"saving step 4 failed: no space left on {re.escape(str(ckpt_root))}, needs ~([\d.]+) MB",
                       message)
    assert needed, message
    actual_mb = sum(p.stat().st_size for p in (ckpt_root / "iter_0000002").iterdir()) / 1e6
    assert abs(float(needed.group(1)) - actual_mb) <= 0.1 * actual_mb, (needed.group(1), actual_mb)
    assert f"the latest checkpoint stays {ckpt_root / 'iter_0000002'} (step 2)" in message
    assert "unexpected pos" not in failed.stderr
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]

    subprocess.run(["mount", "-o", "remount,size=32m", str(small_tmpfs)], check=True)
    out = runs.run(recipe)
    assert f"resumed from step 2 ({ckpt_root / 'iter_0000002'})" in out.stdout
    assert runs.losses(run_dir) == straight
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["iter_0000006", "latest_checkpointed_iteration.txt"]
