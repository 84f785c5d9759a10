"""The project's own SSD forward kernels (kernels.ssd_fwd) against the float64 reference, in
Triton's interpreter on CPU (the worker's docstring lists the cases)."""

from pathlib import Path

from tests.conftest import run_in_triton_interpreter


def test_own_ssd_forward_matches_float64_reference_in_interpreter():
    proc = run_in_triton_interpreter(Path(__file__).with_name("ssd_fwd_interpret_worker.py"), timeout=300)
    assert proc.stdout.count(" ok") == 20, proc.stdout  # 5 outputs x 2 cases x the states fused or not
