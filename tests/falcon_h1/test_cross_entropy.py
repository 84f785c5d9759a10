"""The fused vocab-parallel cross-entropy (kernels.cross_entropy) on CPU through Triton's
interpreter, against float64 log_softmax: loss, gradient, vocab padding, streaming over
several blocks, at TP = 1 (one process) and TP = 2 (torchrun, gloo: the all-reduce path).
The worker must run in its own process: TRITON_INTERPRET is read when triton is imported.
On a GPU, tests/falcon_h1/test_cross_entropy_gpu.py runs the compiled kernels."""

from pathlib import Path

import pytest

from tests.conftest import REPO, run_in_triton_interpreter, torchrun

WORKER = Path(__file__).with_name("cross_entropy_interpret_worker.py")


def test_fused_cross_entropy_matches_float64_in_interpreter():
    proc = run_in_triton_interpreter(WORKER)
    assert proc.stdout.count("ok ") == 7 and "FAIL" not in proc.stdout, proc.stdout


def test_fused_cross_entropy_tensor_parallel_in_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # torchrun's workers inherit it
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    proc = torchrun(WORKER, 2, timeout=240)
    assert proc.stdout.count("ok ") == 7 and "FAIL" not in proc.stdout, proc.stdout
