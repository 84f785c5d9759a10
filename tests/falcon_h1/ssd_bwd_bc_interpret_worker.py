"""Runs kernels.ssd_bwd_bc (dB and dC of the SSD chunk scan) on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by test_ssd_bwd_bc.py before this process imports triton) and compares
it with the float64 reference ssd_backward_pieces, fed the reference's own dy, dS_out and forward
layouts in fp32. Cases: several chunks with a partial last one, 2 groups of 2 heads (the kernel
sums the heads of a group), packed documents with boundaries inside a chunk, inside a row block and
on a chunk edge, tiles smaller than the chunk / head dim / state dim with partial tiles, partner
blocks smaller and larger than the row blocks, inputs and outputs as strided views of wider
buffers (the untouched parts of the output buffers must stay so), decays steep enough that an
unmasked exp would overflow, strides that are multiples of 16 bytes (the kernel's alignment hint).
Every case runs with the group's heads in one program (direct stores) and split over several
(atomic adds into fp32 scratch), including 3 heads split 2 ways (unequal shares). The two passes
run in two processes, one a core (forked before torch is imported). Prints one line per check;
exit 1 on failure."""

import os

SEVERAL_SPLITS_PASS = os.fork() != 0  # the parent; the child runs the one-split pass

import sys

import torch
import torch.nn.functional as F

from falcon_h1.kernels.ssd_backward_reference import forward_saved_layout, ssd_backward_pieces
from falcon_h1.kernels.ssd_bwd_bc import bc_gradients

TOLERANCE = 1e-4  # relative to the largest reference value: fp32 operands and accumulation
SENTINEL = 12345.0


def strided(t: torch.Tensor, gen: torch.Generator, pad: int = 7, offset: int = 3) -> torch.Tensor:
    """t [b, l, ...] as a view into a wider [l, b, width + pad] buffer (the in-projection's memory
    order), starting offset elements into each row."""
    b, l = t.shape[:2]
    width = t[0, 0].numel()
    buf = torch.randn(l, b, width + pad, generator=gen, dtype=t.dtype)
    view = buf[:, :, offset:offset + width].unflatten(-1, t.shape[2:]).transpose(0, 1)
    view.copy_(t)
    return view


def check(label, b, l, h, g, p, n, q, blocks, seq_idx=None, seed=0, decay_rate=1.0, splits=None, aligned=False):
    """Runs the case with HEAD_SPLITS 1 (one-split pass) or each of splits (several-split pass;
    None: bc_gradient_blocks' default, default: heads per group) and returns whether all match."""
    if not SEVERAL_SPLITS_PASS:
        splits = [1]
    elif splits is None:
        splits = [h // g]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, z, dout = r(b, l, h, p), r(b, l, h, p), r(b, l, h, p)
    dt = F.softplus(r(b, l, h))
    A = (-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2) * decay_rate
    B, C = r(b, l, g, n), r(b, l, g, n)
    pieces = ssd_backward_pieces(dout, x, dt, A, B, C, z, q, seq_idx=seq_idx)
    saved = forward_saved_layout(pieces, dt, q, torch.float32)
    f32 = lambda t: t.float().contiguous()
    # aligned: fp32 rows padded and offset to multiples of 4 elements (16 bytes)
    pad, offset, out_pad, db_offset, dc_offset = (4, 4, 4, 0, 4) if aligned else (7, 3, 5, 2, 1)
    x32, B32, C32 = (strided(t.float(), gen, pad, offset) for t in (x, B, C))
    ok = True
    for head_splits in splits:
        db_buf = torch.full((l, b, g * n + out_pad), SENTINEL)
        dc_buf = torch.full((l, b, g * n + out_pad), SENTINEL)
        dB = db_buf[:, :, db_offset:db_offset + g * n].unflatten(-1, (g, n)).transpose(0, 1)
        dC = dc_buf[:, :, dc_offset:dc_offset + g * n].unflatten(-1, (g, n)).transpose(0, 1)
        run_blocks = {**(blocks or {}), **({} if head_splits is None else {"HEAD_SPLITS": head_splits})}
        got_dB, got_dC = bc_gradients(x32, f32(pieces["dy"]), saved["dt"], saved["dA_cumsum"], B32, C32,
                                      saved["states"], f32(pieces["dS_out"]), q,
                                      seq_idx=None if seq_idx is None else seq_idx.int(), dB=dB, dC=dC,
                                      blocks=run_blocks)
        assert got_dB.data_ptr() == dB.data_ptr() and got_dC.data_ptr() == dC.data_ptr()
        errors = {}
        for name, got in (("dB", got_dB), ("dC", got_dC)):
            want = pieces[name]
            errors[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
        untouched = torch.cat([db_buf[:, :, :db_offset].flatten(), db_buf[:, :, db_offset + g * n:].flatten(),
                               dc_buf[:, :, :dc_offset].flatten(), dc_buf[:, :, dc_offset + g * n:].flatten()])
        errors["outside_views"] = (untouched - SENTINEL).abs().max().item()
        print(f"{label}: b={b} l={l} h={h} g={g} p={p} n={n} Q={q} blocks={run_blocks}",
              {k: f"{v:.1e}" for k, v in errors.items()}, flush=True)
        ok &= all(e <= TOLERANCE for e in errors.values())  # (nan fails)
    return ok


def packed(rows, b_len):
    """seq_idx [b, l] of rows of document lengths."""
    ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in rows])
    assert ids.shape[1] == b_len
    return ids


small = dict(BLOCK_ROWS=8, BLOCK_PARTNERS=8, BLOCK_P=8, BLOCK_N=8)
# row 0: boundaries at 5 (inside a row block), 16 (a chunk edge), 29 and a 3-long document;
# row 1: a boundary at 20 (inside chunk 1's first row block) and one at 36, in the partial last chunk
docs = packed([[5, 11, 13, 5, 3], [20, 16, 1]], 37)
ok = all([
    check("unpacked", 2, 37, 4, 2, 12, 10, 16, small),
    check("packed", 2, 37, 4, 2, 12, 10, 16, small, seq_idx=docs, seed=1),
    check("packed, partners < rows", 2, 37, 4, 2, 12, 10, 16,
          dict(BLOCK_ROWS=8, BLOCK_PARTNERS=4, BLOCK_P=4, BLOCK_N=4), seq_idx=docs, seed=2),
    check("3 heads a group, default blocks", 1, 40, 3, 1, 8, 8, 16, None, seed=4, splits=[2, None]),
    check("3 heads a group, strides of 16 bytes", 1, 40, 3, 1, 8, 8, 16, small, seed=9, splits=[2], aligned=True),
    check("one chunk, shorter than Q", 1, 11, 2, 1, 8, 8, 16, small, seed=5),
    check("Q not a power of 2, default blocks", 1, 30, 2, 1, 8, 8, 12, None, seed=6),
    # cs falls by ~600 over a chunk: exp(cs_t - cs_s) of the pairs t < s, or of positions past the
    # end (a partial partner block off the diagonal: l = 45), would overflow fp32 (inf * 0 = nan);
    # partner blocks larger than the row blocks are the next case's
    check("steep decay, packed, partners > rows", 1, 45, 2, 1, 8, 8, 16,
          dict(BLOCK_ROWS=4, BLOCK_PARTNERS=8, BLOCK_P=16, BLOCK_N=16), seq_idx=packed([[7, 20, 18]], 45), seed=8,
          decay_rate=60.0),
])
if SEVERAL_SPLITS_PASS:
    _, status = os.waitpid(-1, 0)
    ok &= os.waitstatus_to_exitcode(status) == 0
sys.exit(0 if ok else 1)
