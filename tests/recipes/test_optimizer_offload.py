"""train.optimizer_offload_fraction on CPU: the settings Megatron's offloaded optimizer cannot run
with are refused before a job starts, naming the field, its value and what is allowed; a GPU-less
host refuses it at train() start before any directory is made; checkpointing such a run is
refused, and a stop signal then ends it saying no checkpoint was written. The offloaded training itself
(against the all-GPU optimizer, and resumed from its checkpoint) is tests/recipes/test_optim_gpu.py;
the bytes it moves to the host are tests/recipes/test_memory_budget.py."""

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
