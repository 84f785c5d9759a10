"""TP=2 equals TP=1: the same ternary weights (global absmean scale), loss and gradients.

Runs tests/bitnet/bitnet_tp_worker.py under torchrun with 2 gloo processes on CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("bitnet_tp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "snapshots.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), str(WORKER), str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def _compare(tp1, tp2):
    assert tp1.keys() == tp2.keys()
    for key in tp1:
        a, b = tp1[key], tp2[key]
        if key.endswith(".ternary") or key.endswith(".scale"):
            assert torch.equal(a, b), key  # identical quantised weights
        elif key == "loss":
            assert b == pytest.approx(a, rel=1e-6, abs=1e-12)
        else:  # gradients, outputs: same math, other summation order
            scale = a.abs().max().item()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale, msg=key)


@pytest.mark.parametrize("subln", [False, True])
def test_gpt_tp2_equals_tp1(snapshots, subln):
    tp1, tp2 = snapshots[f"gpt_tp1_subln{subln}"], snapshots[f"gpt_tp2_subln{subln}"]
    assert len([k for k in tp1 if k.endswith(".ternary")]) == 8
    _compare(tp1, tp2)


@pytest.mark.parametrize("subln", [False, True])
def test_column_row_sequence_parallel_tp2_equals_tp1(snapshots, subln):
    _compare(snapshots[f"pair_tp1_subln{subln}"], snapshots[f"pair_tp2_subln{subln}"])


def test_int8_path_sequence_parallel_tp2_equals_tp1(snapshots):
    _compare(snapshots["pair_int8_tp1"], snapshots["pair_int8_tp2"])
    # ... and the int8 path computes what the fake-quantised float path does.
    fake, int8 = snapshots["pair_tp1_sublnFalse"], snapshots["pair_int8_tp1"]
    for key in ("y", "x.grad", "up.grad", "down.grad"):
        torch.testing.assert_close(int8[key], fake[key], rtol=1e-5, atol=1e-5 * fake[key].abs().max().item())


@pytest.mark.parametrize("kind", ["", "int8_"])
def test_sequence_parallel_column_keeps_only_its_local_int8_input(snapshots, kind):
    """Under sequence parallelism the column layer quantises its own 4 of the 8 tokens and its
    backward keeps those in int8 (gathering them again when it needs them), as Megatron keeps
    its local bf16 input: no gathered copy."""
    assert snapshots[f"kept_input_{kind}tp1"] == [(8, "torch.int8")]
    assert snapshots[f"kept_input_{kind}tp2"] == [(4, "torch.int8")]
