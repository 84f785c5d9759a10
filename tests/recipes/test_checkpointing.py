"""recipes.checkpointing: bit-identical resume, TP resharding, atomic publishing.

The two-process runs (ckpt_worker.py) train a tiny GPT with dropout at TP=2, save
halfway, and resume in fresh processes; the reference for the resumed losses is
the same run done straight through. Resharding is checked against weights
gathered over TP with all_gather (not through the checkpoint) and against one
more optimizer step taken at TP=2 from the saved state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # engine_testutil, shared with the workers
from engine_testutil import configs, tiny_gpt, train
from megatron.core import dist_checkpointing
from recipes.checkpointing import LATEST_FILE, load_latest_checkpoint, save_checkpoint
from recipes.optim import build_optimizer, wrap_model
from recipes.schedules import build_scheduler
from tests.conftest import torchrun

WORKER = Path(__file__).with_name("ckpt_worker.py")
VARIANTS = ("plain", "distributed_optimizer")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    torchrun(WORKER, 2, "first", str(tmp / "root"), str(tmp / "first.pt"), timeout=240)
    torchrun(WORKER, 2, "resume", str(tmp / "root"), str(tmp / "resume.pt"), timeout=240)
    return torch.load(tmp / "first.pt"), torch.load(tmp / "resume.pt"), tmp / "root"


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_in_fresh_processes_is_bit_identical(two_process_runs, variant):
    first, resumed, root = two_process_runs
    first, resumed = first[variant], resumed[variant]
    steps = len(first["straight"])
    assert first["half"] == first["straight"][: steps // 2]
    assert resumed["step"] == steps // 2 and resumed["extra"] == {"next_batch": steps // 2}
    assert resumed["rng"] == first["rng"]  # every rank's torch RNG state is back
    assert resumed["resumed"] == first["straight"][steps // 2 :]  # exact float equality
    assert (root / variant / LATEST_FILE).read_text().strip() == str(steps // 2)
    assert not list((root / variant).glob("*.tmp"))
    assert first["save_seconds"] < 10 and resumed["load_seconds"] < 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_checkpoint_loads_at_tp1(two_process_runs, variant):
    first, resumed, _ = two_process_runs
    first, resumed = first[variant], resumed[variant]
    assert first["saved"].keys() == resumed["loaded_tp1"].keys()
    for name, weight in first["saved"].items():
        assert torch.equal(resumed["loaded_tp1"][name], weight), name
    # The next step depends on the optimizer state (moments, step count, lr
    # schedule): equal up to TP-vs-no-TP float32 rounding.
    for name, weight in first["after_step"].items():
        update = weight - first["saved"][name]
        error = (resumed["after_step_tp1"][name] - weight).norm() / update.norm()
        assert error <= 1e-4, (name, error.item())


def fresh_training_state(seed: int, distributed_optimizer: bool = False, dropout: float = 0.1):
    model, config = tiny_gpt(seed, dropout=dropout)
    train_cfg, parallel_cfg = configs(lr=0.01, min_lr=0.001, warmup_steps=1, max_steps=8)
    parallel_cfg.distributed_optimizer = distributed_optimizer
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    optimizer = build_optimizer(ddp, train_cfg, parallel_cfg)
    return ddp, optimizer, build_scheduler(optimizer, train_cfg)


def weights(ddp) -> dict:
    return {n: p.detach().cpu().clone() for n, p in ddp.module.named_parameters()}


def test_empty_root_has_no_checkpoint(megatron_single, tmp_path):
    assert load_latest_checkpoint(tmp_path / "none", *fresh_training_state(1)) is None


def test_save_killed_midway_leaves_the_previous_checkpoint_latest(megatron_single, tmp_path, monkeypatch):
    ddp, optimizer, scheduler = fresh_training_state(1)
    train(ddp, optimizer, scheduler, 0, 1, 2)
    save_checkpoint(tmp_path, 1, ddp, optimizer, scheduler, extra={"next_batch": 1})
    at_step_1 = weights(ddp)
    train(ddp, optimizer, scheduler, 1, 1, 2)

    real_save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)  # all shards written, nothing published yet
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(dist_checkpointing, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, ddp, optimizer, scheduler, extra={"next_batch": 2})
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert (tmp_path / LATEST_FILE).read_text().strip() == "1"
    assert not (tmp_path / "iter_0000002").exists() and (tmp_path / "iter_0000002.tmp").exists()

    restored = fresh_training_state(2)
    assert load_latest_checkpoint(tmp_path, *restored) == (1, {"next_batch": 1})
    for name, weight in weights(restored[0]).items():
        assert torch.equal(weight, at_step_1[name]), name

    # The next save cleans the leftover and publishes; re-saving a step replaces it.
    for _ in range(2):
        save_checkpoint(tmp_path, 2, ddp, optimizer, scheduler, extra={"next_batch": 2})
        assert (tmp_path / LATEST_FILE).read_text().strip() == "2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", LATEST_FILE]


def test_dp_reshardable_format_resumes_identically(megatron_single, tmp_path):
    ddp, optimizer, scheduler = fresh_training_state(3, distributed_optimizer=True)
    train(ddp, optimizer, scheduler, 0, 2, 2)
    save_checkpoint(tmp_path, 2, ddp, optimizer, scheduler, extra={"next_batch": 2},
                    distributed_optimizer_format="dp_reshardable")
    straight = train(ddp, optimizer, scheduler, 2, 3, 2)

    restored = fresh_training_state(4, distributed_optimizer=True)
    step, extra = load_latest_checkpoint(tmp_path, *restored)
    assert train(*restored, extra["next_batch"], 3, 2) == straight


def test_unknown_optimizer_format_names_the_argument(megatron_single, tmp_path):
    with pytest.raises(ValueError, match="distributed_optimizer_format"):
        save_checkpoint(tmp_path, 1, *fresh_training_state(1), distributed_optimizer_format="zero")


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_resumed_optimizer_keeps_its_own_fused_adamw_choice(megatron_single, tmp_path, saved_fused, resumed_fused):
    # torch's load_state_dict copies the saved param groups' fused/foreach flags over the run's;
    # train.fused_optimizer must decide how the resumed run steps, not the checkpoint. (torch's
    # fused AdamW also runs on CPU, so both directions are checked here; training sets it on GPU.)
    from falcon_h1.megatron_compat.optimizer import fused_adamw_enabled, set_fused_adamw

    ddp, optimizer, scheduler = fresh_training_state(5)
    set_fused_adamw(optimizer, saved_fused)
    train(ddp, optimizer, scheduler, 0, 2, 2)
    save_checkpoint(tmp_path, 2, ddp, optimizer, scheduler, extra={"next_batch": 2})
    straight = train(ddp, optimizer, scheduler, 2, 2, 2)

    restored = fresh_training_state(6)
    set_fused_adamw(restored[1], resumed_fused)
    load_latest_checkpoint(tmp_path, *restored)
    assert fused_adamw_enabled(restored[1]) is resumed_fused
    inner = getattr(restored[1], "unwrapped", restored[1]).chained_optimizers[0].optimizer
    steps = [s["step"] for s in inner.state.values()]
    assert steps and all(s.dtype == torch.float32 for s in steps)
    resumed = train(*restored, 2, 2, 2)
    assert resumed == pytest.approx(straight, rel=1e-5)  # fused and foreach AdamW round alike to ~1e-7
