"""The Triton kernels of the segmented BitNet linears, bit for bit against the reference, on
CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before triton
loads). On a GPU, tests/bitnet/test_triton_gpu.py runs the compiled kernels."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_in_triton_interpreter


def test_segmented_kernels_match_reference_in_interpreter():
    proc = run_in_triton_interpreter(Path(__file__).with_name("triton_interpret_worker.py"))
    assert proc.stdout.count("ok ") >= 40 and "FAIL" not in proc.stdout, proc.stdout
