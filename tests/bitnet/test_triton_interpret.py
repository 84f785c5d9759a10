"""The Triton kernels of the segmented BitNet linears, bit for bit against the reference, on
CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before triton
loads). On a GPU, tests/bitnet/test_triton_gpu.py runs the compiled kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_segmented_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpret_worker.py"))],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") >= 40 and "FAIL" not in proc.stdout, proc.stdout
