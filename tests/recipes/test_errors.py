"""One error type for a setting that cannot work: it carries the key, the value and what is
allowed, from every layer (model, data, BitNet, recipe, executor), and the CLI prints it as
one line."""

import os
import subprocess
import sys

import pytest

from falcon_h1.errors import ConfigValueError
from recipes.api import compose_recipe
from recipes.build import validate_recipe
from tests.conftest import REPO


@pytest.mark.parametrize("overrides, key, value", [
    (["train.precision=fp8"], "train.precision", "fp8"),
    (["model.attention_ratio=1.5"], "model.attention_ratio", 1.5),
    (["train.lr_decay_style=wsd"], "train.lr_decay_style", "wsd"),
    (["data.split='98,x'"], "data.split", "98,x"),
    (["bitnet=on", "bitnet.layers=[attention_qkv,conv]"], "bitnet.layers", "conv"),
    (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size", 0),
    (["logger.wandb_mode=cloud"], "logger.wandb_mode", "cloud"),
])
def test_every_layer_raises_the_one_error_with_key_and_value(overrides, key, value):
    with pytest.raises(ConfigValueError) as raised:
        validate_recipe(compose_recipe(overrides))
    error = raised.value
    assert (error.key, error.value) == (key, value)
    assert error.allowed and key in str(error)


def test_a_default_message_names_key_value_and_what_is_allowed():
    error = ConfigValueError("train.lr", -1.0, "a value >= 0")
    assert str(error) == "train.lr = -1.0 is not allowed: a value >= 0."
    assert isinstance(error, ValueError)


def test_cli_reports_a_data_error_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recipes.train", "data=indexed", f"data.paths=[{tmp_path}/none]",
                           f"train.run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"falcon-train: error: data.paths entry '{tmp_path}/none'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_error_crosses_processes_whole():
    # torch.distributed.broadcast_object_list pickles it (the run-dir lock sends rank 0's refusal
    # to every rank); a subclass keeps its type
    import pickle

    from recipes.run_lock import RunDirInUse

    for error in (ConfigValueError("train.lr", -1.0, "a value >= 0"),
                  RunDirInUse("train.run_dir", "/r", "a free run dir", message="train.run_dir = '/r' is in use")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert (copy.key, copy.value, copy.allowed) == (error.key, error.value, error.allowed)
