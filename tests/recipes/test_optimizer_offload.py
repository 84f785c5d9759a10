"""train.optimizer_offload_fraction on CPU: the settings Megatron's offloaded optimizer cannot run
with are refused before a job starts, naming the field, its value and what is allowed; a GPU-less
host refuses it at train() start before any directory is made; checkpointing such a run is
refused, and a stop signal then ends it saying no checkpoint was written; Megatron's offloaded
optimizer builds over Falcon-H1's fp32 parameters. The offloaded training itself (against the
all-GPU optimizer) is tests/recipes/test_optim_gpu.py; the bytes it moves to the host are
tests/recipes/test_memory_budget.py."""

import pytest

from falcon_h1.errors import ConfigValueError
from recipes.api import compose_recipe
from recipes.build import validate_gpu_settings, validate_recipe

OFFLOAD = ["parallel.distributed_optimizer=true", "train.optimizer_offload_fraction=0.5", "train.save_interval=0"]


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer_offload_fraction=1.5"],
     "train.optimizer_offload_fraction = 1.5 is not allowed: a number in [0, 1]"),
    (["train.optimizer_offload_fraction=-0.1"],
     "train.optimizer_offload_fraction = -0.1 is not allowed: a number in [0, 1]"),
    (["train.optimizer_offload_fraction=0.5"],
     "parallel.distributed_optimizer = False is not allowed: true with train.optimizer_offload_fraction = 0.5"),
    (OFFLOAD + ["train.cuda_graph=true"],
     "train.cuda_graph = True is not allowed: false with train.optimizer_offload_fraction = 0.5"),
    (OFFLOAD + ["train.save_interval=50"],
     "train.save_interval = 50 is not allowed: 0 with train.optimizer_offload_fraction = 0.5 (a run with "
     "train.optimizer_offload_fraction > 0 is not checkpointed"),
])
def test_settings_the_offload_cannot_run_with_are_refused(overrides, message):
    with pytest.raises(ConfigValueError) as err:
        validate_recipe(compose_recipe(overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_an_offload_with_the_distributed_optimizer_is_accepted_on_a_gpu_host_only():
    for fraction in ("1.0", "0.25"):
        recipe = compose_recipe(["parallel.distributed_optimizer=true", f"train.optimizer_offload_fraction={fraction}",
                                 "train.save_interval=0"])
        validate_recipe(recipe)
        validate_gpu_settings(recipe, cuda_available=True)
    with pytest.raises(ConfigValueError, match=r"^train\.optimizer_offload_fraction = 0\.25 is not allowed: 0 on a host "
                                               "without a CUDA device"):
        validate_gpu_settings(recipe, cuda_available=False)


def test_train_refuses_the_offload_on_cpu_before_touching_anything(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a host without a GPU")
    from recipes.training import train

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigValueError, match=r"^train\.optimizer_offload_fraction = 0\.5 is not allowed"):
        train(compose_recipe(OFFLOAD + [f"train.run_dir={run_dir}", "logger=none"]))
    assert not run_dir.exists()


def test_a_stop_without_a_checkpoint_says_so_instead_of_how_to_resume():
    import signal

    from recipes.build import UNCHECKPOINTED_OFFLOAD
    from recipes.stop_signals import StoppedBySignal

    stopped = StoppedBySignal(signal.SIGTERM, 7, "runs/x/checkpoints", "runs/x", UNCHECKPOINTED_OFFLOAD)
    assert stopped.code == 143
    assert stopped.message().startswith("SIGTERM received: stopped after step 7 without a checkpoint (a run with "
                                        "train.optimizer_offload_fraction > 0 is not checkpointed")
    assert "To resume" not in stopped.message()


class _HostStream:
    """Stands in for a CUDA stream: the offloaded optimizer makes its copy streams when it is built."""

    def wait_stream(self, stream):
        pass

    def record_event(self, *args):
        return None


@pytest.fixture
def host_streams(monkeypatch):
    import contextlib

    import torch

    stream = _HostStream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _HostStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def _offloaded_optimizer():
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from recipes.config import ParallelConfig, TrainConfig
    from recipes.optim import build_optimizer, wrap_model

    model = build_model(get_preset("falcon_h1_micro"), precision="bf16", seed=0)  # A_log, D, dt_bias stay fp32
    parallel, train_cfg = ParallelConfig(distributed_optimizer=True), TrainConfig(optimizer_offload_fraction=0.5)
    ddp = wrap_model(model, parallel, train_cfg, model.config)
    return model, build_optimizer([ddp], train_cfg, parallel)


def test_the_offloaded_optimizer_builds_over_fp32_parameters_and_steps_them_in_place(megatron_single, host_streams):
    import torch
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    from falcon_h1.megatron_compat.cpu import unwrapped_optimizer

    model, optimizer = _offloaded_optimizer()
    inners = getattr(unwrapped_optimizer(optimizer), "chained_optimizers", [unwrapped_optimizer(optimizer)])
    assert all(isinstance(inner.optimizer, HybridDeviceOptimizer) for inner in inners)
    fp32_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.dtype == torch.float32}
    fp32_shards = [p for inner in inners for g in inner.optimizer.param_groups for p in g["params"]
                   if p.dtype == torch.float32]
    assert fp32_shards and all(p.is_leaf for p in fp32_shards)
    # each shard is a view of its parameter's memory, so stepping it updates the model
    assert all(p.untyped_storage().data_ptr() in fp32_storages for p in fp32_shards)


def test_without_the_leaf_shards_megatron_cannot_build_it(megatron_single, host_streams, monkeypatch):
    import contextlib

    import recipes.optim

    monkeypatch.setattr(recipes.optim, "fp32_shards_as_leaves", contextlib.nullcontext)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        _offloaded_optimizer()
