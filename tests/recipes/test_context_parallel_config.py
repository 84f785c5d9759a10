"""parallel.cp in the recipe: what it needs of the sequence, the model and the process count is
refused before anything starts, naming the key; a 256K-token 7B job at cp = 8 validates."""

import subprocess
import sys

import pytest
import yaml

from recipes.api import compose_recipe
from falcon_h1.errors import ConfigValueError
from recipes.build import data_parallel_size, validate_parallel_layout, validate_recipe
from tests.conftest import REPO

MICRO = ["model=falcon_h1_micro"]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.cp=0"], "parallel.cp = 0"),
    (["parallel.cp=3", "data.seq_length=64"], "data.seq_length = 64 is not allowed: a multiple of 2 * parallel.cp = 6"),
    (["parallel.cp=16", "data.seq_length=64"], "parallel.cp = 16 is not allowed: at most"),
    (["parallel.cp=3", "data.seq_length=18", "parallel.tp=4", "parallel.sequence_parallel=true",
      "model.num_key_value_heads=4", "model.mamba_n_groups=4"], "a multiple of parallel.cp * parallel.tp = 12"),
    # the own scan kernels live in the fused Mamba branch, which scans from a zero state
    (["parallel.cp=2", "model.ssd_kernels=own"], "model.ssd_kernels = 'own' is not allowed with parallel.cp = 2"),
    (["parallel.cp=2", "model.mamba_keep_conv_output=true"],
     "model.mamba_keep_conv_output = true is not allowed with parallel.cp = 2"),
])
def test_impossible_context_parallel_recipe_fails_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as err:
        validate_recipe(compose_recipe(MICRO + overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_chosen_from_the_largest_position_is_refused(rope_type):
    recipe = compose_recipe(MICRO + ["parallel.cp=2"])
    half = recipe.model.head_dim // 2
    recipe.model.rope_scaling = ({"rope_type": "dynamic", "factor": 2.0} if rope_type == "dynamic" else
                                 {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                                  "original_max_position_embeddings": 256})
    with pytest.raises(ValueError, match=f"model.rope_scaling = .*'{rope_type}'.* parallel.cp = 2"):
        validate_recipe(recipe)
    recipe.parallel.cp = 1
    validate_recipe(recipe)


def test_context_parallel_ranks_count_against_the_processes():
    recipe = compose_recipe(MICRO + ["parallel.cp=2", "parallel.tp=2"])
    validate_recipe(recipe)
    assert data_parallel_size(recipe, 8) == 2
    with pytest.raises(ConfigValueError, match=r"parallel.cp = 2 .* tp \* pp \* cp = 2 \* 1 \* 2 = 4 dividing the 6"):
        validate_parallel_layout(recipe, 6)
    recipe.parallel.dp = 4
    with pytest.raises(ConfigValueError, match=r"parallel.dp = 4 .* world_size / \(tp \* pp \* cp\) = 2"):
        validate_parallel_layout(recipe, 8)


def test_7b_at_256k_tokens_over_8_context_parallel_ranks_dryrun_prints_the_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.train", "model=falcon_h1_7b", "data.seq_length=262144", "parallel.cp=8",
         "dryrun=true", "executor=slurm", "executor.slurm.nodes=1", f"train.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run, nothing submitted" in proc.stdout
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "--nproc-per-node=8" in proc.stdout
    resolved = proc.stdout[proc.stdout.index("name: falcon_h1_7b"):proc.stdout.index("executor: slurm (dry run")]
    printed = yaml.safe_load(resolved)
    assert printed["parallel"]["cp"] == 8 and printed["data"]["seq_length"] == 262144
    assert not (run_dir / "checkpoints").exists()
