"""kernels.ssd_bwd_tokens (dx, ddt, dA, dD and the step-size chain of the SSD backward) on CPU:
its Triton kernels run through Triton's interpreter in a subprocess
(ssd_bwd_tokens_interpret_worker.py) against the float64 reference pieces and torch autograd of
kernels.scan_step_sizes: several chunks, a sequence ending inside a chunk, 2 groups of 4 heads,
packed documents with boundaries inside a chunk and on a chunk edge, tiles smaller than the
chunk and the state dim, a head dim not a power of 2, clamped step sizes, and a chunk_cb
whose entries above the diagonal are NaN."""

from pathlib import Path

from tests.conftest import run_in_triton_interpreter


def test_token_gradients_match_reference_in_interpreter():
    run_in_triton_interpreter(Path(__file__).with_name("ssd_bwd_tokens_interpret_worker.py"), timeout=240)
