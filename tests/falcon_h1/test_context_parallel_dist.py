"""CP=2 on two CPU processes (torchrun, gloo) computes what one process computes on the whole
sequence, with and without full recomputation; CP=2 x TP=2 (four processes, with sequence
parallelism) too, marked slow."""

from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.falcon_h1 import cp_worker


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def whole_sequence(megatron_single):
    return cp_worker.run(1)


def _check(sharded, whole):
    assert rel(sharded["logits"], whole["logits"]) <= 1e-6
    assert rel(sharded["loss"], whole["loss"]) <= 1e-6
    assert sharded["grads"].keys() == whole["grads"].keys()
    for name, grad in whole["grads"].items():
        assert rel(sharded["grads"][name], grad) <= 1e-6, name


def test_cp2_matches_one_process(tmp_path, whole_sequence):
    out = tmp_path / "cp2.pt"
    torchrun(Path(cp_worker.__file__), 2, "2", "1", str(out))
    for sharded in torch.load(out).values():  # without and with recomputation
        _check(sharded, whole_sequence)


@pytest.mark.slow
def test_cp2_tp2_matches_one_process(tmp_path, whole_sequence):
    out = tmp_path / "cp2_tp2.pt"
    torchrun(Path(cp_worker.__file__), 4, "2", "2", str(out), timeout=600)
    for sharded in torch.load(out).values():  # without and with recomputation
        _check(sharded, whole_sequence)
