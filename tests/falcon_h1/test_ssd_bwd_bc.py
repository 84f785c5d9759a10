"""kernels.ssd_bwd_bc (dB and dC of the SSD chunk scan, heads summed per group) on CPU: the Triton
kernel runs through Triton's interpreter in a subprocess and must match the float64 backward
reference (kernels.ssd_backward_reference.ssd_backward_pieces); the cases are listed in
ssd_bwd_bc_interpret_worker.py."""

from pathlib import Path

from tests.conftest import run_in_triton_interpreter


def test_bc_gradients_match_reference_in_interpreter():
    proc = run_in_triton_interpreter(Path(__file__).with_name("ssd_bwd_bc_interpret_worker.py"))
    print(proc.stdout)
