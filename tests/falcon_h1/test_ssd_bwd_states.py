"""kernels.ssd_bwd_states (the gate's backward with each chunk's dS_local, the reverse pass over
the chunks) equals the float64 reference kernels.ssd_backward_reference, run on CPU through
Triton's interpreter in a subprocess (ssd_bwd_states_interpret_worker.py: packed documents,
partial chunks and tiles, groups shared by heads, strided views); and the default tiles at the
model shapes are ones the GPU can run."""

from pathlib import Path

import pytest

from tests.conftest import run_in_triton_interpreter

pytest.importorskip("triton")

from falcon_h1.kernels.ssd_bwd_states import (  # noqa: E402
    _launch_options,
    local_dstates_blocks,
    state_passing_blocks,
)

# (chunk, head dim, state dim) of the 0.5B model, and of the 7B and 34B (the same per head)
MODEL_SHAPES = [(128, 64, 128), (256, 128, 256)]


def test_state_side_kernels_match_reference_in_interpreter():
    run_in_triton_interpreter(Path(__file__).with_name("ssd_bwd_states_interpret_worker.py"), timeout=120)


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize("chunk, headdim, dstate", MODEL_SHAPES)
def test_default_tiles_fit_the_gpu(chunk, headdim, dstate):
    """Powers of two, at least tl.dot's 16, a position block below Q = 256 (no whole [Q, .] tile
    in registers), an fp32 accumulator of at most 64 x 128 per 4 warps."""
    tiles = local_dstates_blocks(chunk, headdim, dstate)
    assert all(_power_of_two(tiles[k]) and tiles[k] >= 16 for k in ("BLOCK_T", "BLOCK_P", "BLOCK_N"))
    assert tiles["BLOCK_T"] <= min(chunk, 64) and tiles["BLOCK_P"] <= headdim and tiles["BLOCK_N"] <= dstate
    assert tiles["BLOCK_P"] * tiles["BLOCK_N"] <= 64 * 128 * tiles["num_warps"] // 4
    block = state_passing_blocks(headdim, dstate)["BLOCK_PN"]
    assert _power_of_two(block) and block <= headdim * dstate


def test_block_overrides_are_checked():
    tiles, launch = _launch_options(local_dstates_blocks(16, 12, 10), dict(BLOCK_T=8, num_stages=2))
    assert tiles == dict(BLOCK_T=8, BLOCK_P=16, BLOCK_N=16) and launch == dict(num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        _launch_options(local_dstates_blocks(16, 12, 10), dict(BLOCK_Q=8))
