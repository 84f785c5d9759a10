"""Runs kernels.ssd_bwd_states (the gate's backward with each chunk's dS_local, then the reverse
pass over the chunks) on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by
test_ssd_bwd_states.py before this process imports triton) and compares every output with the
float64 reference kernels.ssd_backward_reference.ssd_backward_pieces, from the forward's saved
tensors in their GPU layouts (forward_saved_layout).

Shapes: several chunks of 16 with the sequence ending inside the last, 4 heads on 2 groups, p and
n not multiples of the tiles (tiles of 8 < Q, p, n: multi-tile loops and partial tiles), z and C
strided slices of one [l, b, width] buffer, dz a strided slice of another; packed rows with
document boundaries inside a chunk and exactly on chunk edges. Prints one line per check; exit 1
on failure."""

import sys

import torch
import torch.nn.functional as F

from falcon_h1.kernels.ssd_backward_reference import forward_saved_layout, ssd_backward_pieces
from falcon_h1.kernels.ssd_bwd_states import gated_output_backward_and_local_dstates, state_passing_backward

TOLERANCE = 1e-4  # of the largest reference value: fp32 arithmetic against float64
BF16_TOLERANCE = 1e-2  # dS_out stored in bf16 (8 bits of mantissa)
HALF_TOLERANCE = 5e-3  # inputs rounded to float16 (11 bits of mantissa)
SMALL_TILES = dict(BLOCK_T=8, BLOCK_P=8, BLOCK_N=8)
SMALL_STATE_BLOCK = dict(BLOCK_PN=32)  # p * n = 120: 4 blocks, the last partial
SENTINEL = 7.0  # fills the dz buffer around the view: must survive the kernel


def packed_seq_idx(rows):
    """Document lengths per row -> seq_idx [b, l] int32 (documents numbered from 0 in each row)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).int()


def inputs(b, l, h, g, p, n, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(x=r(b, l, h, p), dt=F.softplus(r(b, l, h)), A=-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2,
                B=r(b, l, g, n), C=r(b, l, g, n), z=r(b, l, h, p), D=r(h), dout=r(b, l, h, p))


def strided_views(t):
    """z and C as slices of one [l, b, width] fp32 buffer (the in-projection's layout), and a dz
    view into a sentinel-filled buffer of that layout."""
    b, l, h, p = t["z"].shape
    g, n = t["C"].shape[2:]
    zw, cw = h * p, g * n
    proj = torch.zeros(l, b, 3 + zw + cw + 5, dtype=torch.float32)
    z = proj[..., 3:3 + zw].transpose(0, 1).unflatten(-1, (h, p))
    C = proj[..., 3 + zw:3 + zw + cw].transpose(0, 1).unflatten(-1, (g, n))
    z.copy_(t["z"])
    C.copy_(t["C"])
    grad_buffer = torch.full((l, b, 2 + zw + 4), SENTINEL, dtype=torch.float32)
    dz = grad_buffer[..., 2:2 + zw].transpose(0, 1).unflatten(-1, (h, p))
    return z, C, dz, grad_buffer


def error(got, want):
    """Largest difference relative to the largest reference value (absolute where the reference
    is all 0, e.g. every state gradient of a one-chunk sequence)."""
    diff = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    return diff / scale if scale > 0 else diff


def check(label, b, l, h, g, p, n, chunk, seq_idx=None, tiles=None, state_block=None, seed=0):
    t = inputs(b, l, h, g, p, n, seed)
    pieces = ssd_backward_pieces(t["dout"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["z"], chunk, D=t["D"],
                                 seq_idx=seq_idx)
    saved = forward_saved_layout(pieces, t["dt"], chunk, torch.float32)
    z, C, dz, grad_buffer = strided_views(t)
    dout = t["dout"].float().contiguous()
    dy, dS_local = gated_output_backward_and_local_dstates(dout, z, saved["out_x"], C, saved["dA_cumsum"], chunk,
                                                           seq_idx=seq_idx, dz=dz, blocks=tiles)
    outside = torch.ones_like(grad_buffer, dtype=torch.bool)
    outside[..., 2:2 + h * p] = False
    # the reverse pass from the reference's dS_local, so each kernel is checked on its own
    dS_out, ddA_last = state_passing_backward(pieces["dS_local"].float(), saved["states"], saved["dA_cumsum"], l,
                                              chunk, seq_idx=seq_idx, blocks=state_block)
    ddA_want = pieces["ddA_last"].permute(0, 2, 1)                          # [b, h, c]
    errors = dict(dy=error(dy, pieces["dy"]), dz=error(dz, pieces["dz"]), dS_local=error(dS_local, pieces["dS_local"]),
                  dS_out=error(dS_out, pieces["dS_out"]), ddA_last=error(ddA_last, ddA_want))
    ok = all(v <= TOLERANCE for v in errors.values())
    ok &= bool((grad_buffer[outside] == SENTINEL).all())
    ok &= dy.dtype == dout.dtype and dy.is_contiguous() and dS_local.dtype == torch.float32
    ok &= dS_out.dtype == saved["states"].dtype and ddA_last.shape == ddA_want.shape
    # states in bf16 (training): dS_out defaults to their dtype
    dS_out_bf16, ddA_bf16 = state_passing_backward(pieces["dS_local"].float(), saved["states"].bfloat16(),
                                                   saved["dA_cumsum"], l, chunk, seq_idx=seq_idx, blocks=state_block)
    errors["dS_out_bf16"] = error(dS_out_bf16, pieces["dS_out"])
    errors["ddA_last_bf16_states"] = error(ddA_bf16, ddA_want)
    ok &= dS_out_bf16.dtype == torch.bfloat16
    ok &= errors["dS_out_bf16"] <= BF16_TOLERANCE and errors["ddA_last_bf16_states"] <= BF16_TOLERANCE
    print(label, f"b={b} l={l} h={h} g={g} p={p} n={n} Q={chunk}", {k: f"{v:.1e}" for k, v in errors.items()},
          "ok" if ok else "FAILED")
    return ok


def check_half_inputs(label, b, l, h, g, p, n, chunk, seq_idx=None, tiles=None, seed=0):
    """Inputs in float16: the dot's operands are cast to the input dtype, as on the GPU in bf16
    (which the interpreter cannot run: its bf16 tl.dot multiplies the raw bits, triton #11584)."""
    t = inputs(b, l, h, g, p, n, seed)
    pieces = ssd_backward_pieces(t["dout"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["z"], chunk, seq_idx=seq_idx)
    saved = forward_saved_layout(pieces, t["dt"], chunk, torch.float16)
    half = lambda x: x.half().contiguous()
    dy, dS_local, dz = gated_output_backward_and_local_dstates(half(t["dout"]), half(t["z"]), saved["out_x"],
                                                               half(t["C"]), saved["dA_cumsum"], chunk,
                                                               seq_idx=seq_idx, blocks=tiles)
    errors = dict(dy=error(dy, pieces["dy"]), dz=error(dz, pieces["dz"]), dS_local=error(dS_local, pieces["dS_local"]))
    ok = all(v <= HALF_TOLERANCE for v in errors.values())
    ok &= dy.dtype == dz.dtype == torch.float16 and dz.is_contiguous() and dS_local.dtype == torch.float32
    print(label, f"b={b} l={l} h={h} g={g} p={p} n={n} Q={chunk}", {k: f"{v:.1e}" for k, v in errors.items()},
          "ok" if ok else "FAILED")
    return ok


ok = True
# 5 chunks, the last of 5 positions. Row 0: boundaries at 5 (inside chunk 0), 16 (on the edge of
# chunks 0/1), 36 (inside chunk 2); row 1: at 32 (on the edge of chunks 1/2) and 40. Chunks 1 and 2
# of row 0 and chunk 2 of row 1 carry nothing (scale 0); chunk 3 of each row carries the state.
seq_idx = packed_seq_idx([[5, 11, 20, 33], [32, 8, 29]])
ok &= check("packed, small tiles", 2, 69, 4, 2, 12, 10, 16, seq_idx=seq_idx, tiles=SMALL_TILES,
            state_block=SMALL_STATE_BLOCK)
ok &= check("one document, small tiles", 2, 53, 4, 2, 12, 10, 16, tiles=SMALL_TILES, state_block=SMALL_STATE_BLOCK,
            seed=1)
ok &= check("one document, default blocks", 1, 40, 4, 2, 12, 10, 16, seed=2)
ok &= check("one chunk, shorter than Q", 1, 11, 4, 2, 12, 10, 16, tiles=SMALL_TILES, seed=3)
ok &= check_half_inputs("packed, float16 inputs, dz allocated", 2, 69, 4, 2, 12, 10, 16, seq_idx=seq_idx,
                        tiles=SMALL_TILES, seed=4)
sys.exit(0 if ok else 1)
