"""Runs kernels.ssd_fwd (the project's own SSD forward) on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by test_ssd_fwd.py) and compares everything it returns with the float64
reference (kernels.ssd_backward_reference, checked against the step-by-step recurrence): the gated
and pre-gate outputs, the processed step sizes, their in-chunk cumsum and the states entering each
chunk. Tiles smaller than the chunk, head dim and state dim exercise every loop and partial-tile
mask; a sequence that is not a multiple of the chunk, two groups of two heads and packed documents
(boundaries inside a chunk and on a chunk edge, with step sizes clamped, x with a last stride of 2) are
covered, each with the chunk states and their passing in one walk (fused_states) and as two
launches. Prints one line per check; exit 1 on failure."""

import math
import sys

import torch
import torch.nn.functional as F

from falcon_h1.kernels import scan_step_sizes
from falcon_h1.kernels.ssd_backward_reference import forward_saved_layout, ssd_backward_pieces
from falcon_h1.kernels.ssd_fwd import ssd_forward_own

TOLERANCE = 1e-5  # fp32 kernels against float64: relative to the largest value
BLOCKS = dict(state_p=16, state_n=16, scan_m=16, scan_k=16, scan_p=16, scan_n=16, passing=128, states_p=16,
              states_n=8)


def case(packed: bool, limit, seed: int, fused_states: bool):
    b, l, h, p, g, n, q = 2, 75, 4, 24, 2, 20, 32
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(l, b, 2 * h * p + 2 * g * n + h, generator=gen).transpose(0, 1)
    z, x, B, C, dt_raw = proj.split([h * p, h * p, g * n, g * n, h], dim=-1)
    x, z = x.unflatten(-1, (h, p)), z.unflatten(-1, (h, p))
    if packed:  # an x whose last stride is 2: the launcher copies it (kernels.ssd_launch's policy)
        x = torch.stack([x, torch.full_like(x, float("nan"))], -1)[..., 0]
    B, C = B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
    A = -torch.rand(h, generator=gen) - 0.3
    D, dt_bias = torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    seq_idx = None
    if packed:  # row 0: documents of 10, 22 (ends on the chunk edge at 32), 30, 13; row 1: one document
        seq_idx = torch.tensor([[0] * 10 + [1] * 22 + [2] * 30 + [3] * 13, [0] * 75], dtype=torch.int32)
    got = ssd_forward_own(x, dt_raw, A, B, C, q, D=D, z=z, dt_bias=dt_bias, dt_limit=limit, seq_idx=seq_idx,
                          blocks={**BLOCKS, "fused_states": fused_states})
    dt = scan_step_sizes(dt_raw.double(), dt_bias.double(), limit)
    pieces = ssd_backward_pieces(torch.zeros_like(x), x, dt, A, B, C, z, q, D=D, seq_idx=seq_idx)
    want = forward_saved_layout(pieces, dt, q, torch.float64)
    want["out"] = pieces["y"] * F.silu(z.double())
    failed = False
    for name, value in zip(("out", "out_x", "dt", "dA_cumsum", "states"), got):
        err = ((value.double() - want[name]).abs().max() / want[name].abs().max()).item()
        ok = err <= TOLERANCE
        failed |= not ok
        print(f"packed={packed} limit={limit} fused_states={fused_states} {name}: max rel err {err:.2e} "
              f"{'ok' if ok else 'FAIL'}")
    return failed


failed = False
for packed, limit, seed in ((False, (0.0, math.inf), 0), (True, (0.05, 1.5), 1)):
    for fused_states in (True, False):
        failed |= case(packed, limit, seed, fused_states)
sys.exit(1 if failed else 0)
