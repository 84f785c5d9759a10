"""train.cuda_graph on CPU: every setting the full-iteration CUDA graph cannot run with is refused
before a job starts, naming the field, its value and what is allowed; a GPU-less host refuses
the graph at train() start (and through the CLI) before any process group, directory or file."""

import math
import os
import subprocess
import sys

import pytest
import torch

from recipes.api import compose_recipe
from falcon_h1.errors import ConfigValueError
from recipes.build import validate_gpu_settings, validate_recipe
from tests.conftest import REPO

GRAPH = ["train.cuda_graph=true"]


@pytest.mark.parametrize("overrides,named", [
    (["parallel.pp=2"], "parallel.pp = 2"),
    (["train.recompute=selective"], "train.recompute = 'selective'"),
    (["train.recompute=full"], "train.recompute = 'full'"),
    (["train.cuda_graph_warmup_steps=0"], "train.cuda_graph_warmup_steps = 0"),
    (["train.cuda_graph_warmup_steps=-3"], "train.cuda_graph_warmup_steps = -3"),
    (["bitnet=on", "train.force_reference_kernels=true"], "train.force_reference_kernels = True"),
])
def test_setting_the_graph_cannot_capture_is_refused(overrides, named):
    with pytest.raises(ConfigValueError) as err:
        validate_recipe(compose_recipe(GRAPH + overrides))
    message = str(err.value)
    assert message.startswith(named + " is not allowed:"), message
    assert "train.cuda_graph = true" in message  # says why: the value is fine without the graph
    # The same setting is accepted without the graph, so the refusal is the graph's alone.
    validate_recipe(compose_recipe(overrides))


def test_graph_recipe_within_the_limits_is_accepted():
    for overrides in ([], ["train=pretrain", "parallel=tp2", "parallel.sequence_parallel=true"], ["bitnet=on"],
                      ["train.cuda_graph_warmup_steps=1", "parallel.distributed_optimizer=true"]):
        recipe = compose_recipe(GRAPH + overrides)
        validate_recipe(recipe)
        validate_gpu_settings(recipe, cuda_available=True)


def test_graph_needs_a_cuda_device_on_the_training_host():
    recipe = compose_recipe(GRAPH)
    with pytest.raises(ConfigValueError) as err:
        validate_gpu_settings(recipe, cuda_available=False)
    assert str(err.value).startswith("train.cuda_graph = True is not allowed: false on a host without a CUDA device")
    validate_gpu_settings(compose_recipe([]), cuda_available=False)  # eager runs need no GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a GPU")
def test_train_refuses_the_graph_on_cpu_before_touching_anything(tmp_path):
    from recipes.training import train

    run_dir = tmp_path / "run"
    recipe = compose_recipe(GRAPH + [f"train.run_dir={run_dir}", "logger=none"])
    with pytest.raises(ConfigValueError, match=r"^train\.cuda_graph = True is not allowed"):
        train(recipe)
    assert not run_dir.exists()


def test_cli_reports_the_refusal_as_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "recipes.train", *GRAPH, "train.recompute=full",
                           f"train.run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "falcon-train: error: train.recompute = 'full' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_step_stops_the_graphed_run(tmp_path):
    from recipes.step_health import check_finite_step

    check_finite_step(3, 2.5, 0.7, tmp_path)
    check_finite_step(3, 2.5, None, tmp_path)  # optimizers without clipping report no norm
    for loss, norm in ((math.nan, 0.7), (math.inf, 0.7), (2.5, math.nan), (2.5, math.inf)):
        with pytest.raises(FloatingPointError, match=r"^step 3: training diverged: loss = "):
            check_finite_step(3, loss, norm, tmp_path)


def test_checkpoints_hold_tracker_states_as_tensors(megatron_single):
    """A graphed run's tracker holds generator objects; its checkpoints must hold the byte-tensor
    states an eager run saves (loadable on a host without a GPU), and training continues with the
    very generator objects the graph registered, also after a checkpoint is loaded."""
    from megatron.core import tensor_parallel

    from recipes.checkpointing import _restore_tracker_states, _tracker_states_as_tensors

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = tracker.get_states()
    generators = {"model-parallel-rng": torch.Generator().manual_seed(11), "data-parallel-rng": torch.Generator()}
    generators["data-parallel-rng"].manual_seed(12)
    torch.rand(5, generator=generators["data-parallel-rng"])  # a state past the seed
    try:
        tracker.set_states(dict(generators))
        inside = _tracker_states_as_tensors(tracker.get_states())
        assert set(inside) == set(generators)
        for name, generator in generators.items():
            assert isinstance(inside[name], torch.Tensor)
            assert torch.equal(inside[name], generator.get_state())
        after = tracker.get_states()
        assert all(after[name] is generators[name] for name in generators)
        # Loading: the same generator objects, set to the checkpoint's states.
        torch.rand(3, generator=generators["model-parallel-rng"])
        _restore_tracker_states(inside)
        loaded = tracker.get_states()
        assert all(loaded[name] is generators[name] for name in generators)
        assert all(torch.equal(generators[name].get_state(), inside[name]) for name in generators)
        # An eager run's states (already tensors) pass through untouched, both ways.
        tracker.set_states(saved)
        assert all(_tracker_states_as_tensors(tracker.get_states())[name] is saved[name] for name in saved)
        _restore_tracker_states(saved)
        assert all(tracker.get_states()[name] is saved[name] for name in saved)
    finally:
        tracker.set_states(saved)


@pytest.mark.parametrize("graphed", [False, True])
def test_graphed_runs_build_ddp_without_the_host_syncing_nan_check(megatron_single, graphed):
    """Megatron's per-bucket NaN check reads a norm on the host, which a capture forbids: graphed
    runs build DDP without it (the loss/grad-norm check after each step replaces it)."""
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from recipes.config import ParallelConfig, TrainConfig
    from recipes.optim import wrap_model

    model = build_model(get_preset("falcon_h1_micro"), precision="fp32", seed=0)
    ddp = wrap_model(model, ParallelConfig(), TrainConfig(cuda_graph=graphed), model.config)
    assert ddp.ddp_config.check_for_nan_in_grad is (not graphed)
