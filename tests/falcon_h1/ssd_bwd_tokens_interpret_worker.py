"""Runs kernels.ssd_bwd_tokens on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by
test_ssd_bwd_tokens.py before this process imports triton) and compares, on fp32 inputs:
- dx, ddt, dA, dD with the float64 reference kernels.ssd_backward_reference.ssd_backward_pieces,
  the kernels given the forward's saved layout (forward_saved_layout) and the reference's dy,
  dS_out, ddA_last;
- token_and_step_size_gradients (the step-size chain fused into the second kernel): ddt_raw,
  ddt_bias with torch autograd of kernels.scan_step_sizes, from the reference's ddt and exactly
  from token_gradients' ddt; dx, dA, dD exactly as token_gradients'.
C_t . B_s comes from kernels.ssd_fwd.chunk_cb in tiles smaller than the chunk, its entries above
the diagonal then set to NaN (chunk_cb leaves them unwritten: the kernels must never read them).
x, B, C, dt_raw and the outputs dx, ddt_raw are strided views of [l, b, width] buffers (the
training layout). Prints one line per check; exit 1 on failure."""

import sys

import torch

from falcon_h1.kernels import scan_step_sizes
from falcon_h1.kernels.ssd_backward_reference import forward_saved_layout, ssd_backward_pieces
from falcon_h1.kernels.ssd_bwd_tokens import TokenBlocks, token_and_step_size_gradients, token_blocks, token_gradients
from falcon_h1.kernels.ssd_fwd import chunk_cb

TOLERANCE = 1e-4  # of each output's largest magnitude: fp32 kernels against float64 (seen: ~1e-6)


def strided(t: torch.Tensor, gen) -> torch.Tensor:
    """t [b, l, ...] as a view into a wider [l, b, width] buffer (random columns around it)."""
    b, l = t.shape[:2]
    inner = t[0, 0].numel()
    buf = torch.randn(l, b, inner + 7, generator=gen, dtype=t.dtype)
    view = buf[..., 3:3 + inner].transpose(0, 1).unflatten(-1, t.shape[2:]) if t.dim() > 3 else \
        buf[..., 3:3 + inner].transpose(0, 1)
    view.copy_(t)
    return view


def empty_strided_like(t: torch.Tensor, gen) -> torch.Tensor:
    return strided(torch.full_like(t, float("nan")), gen)


def relative_error(got, want) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def within(errors: dict, tolerance: float) -> bool:
    """Every error <= tolerance; a NaN fails (max() over NaNs depends on their order)."""
    return all(v <= tolerance for v in errors.values())


def step_reference(dt_raw, dt_bias, dt_limit, ddt):
    """torch autograd of scan_step_sizes: (dt_raw.grad, dt_bias.grad) for dL/d(dt) = ddt [b, l, h]."""
    raw = dt_raw.detach().clone().requires_grad_()
    bias = dt_bias.detach().clone().requires_grad_()
    scan_step_sizes(raw, bias, dt_limit).backward(ddt.to(torch.float32))
    return raw.grad, bias.grad


def to_chunks(t, chunk):
    """[b, l, h] -> [b, h, nc, Q], zero past the end (the kernels' ddt layout)."""
    b, l, h = t.shape
    pad = (-l) % chunk
    return torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(b, -1, chunk, h).permute(0, 3, 1, 2)


def poisoned_chunk_cb(B, C, chunk):
    """chunk_cb in 8 x 8 tiles (so it skips whole tiles above the diagonal), with every entry
    above the diagonal NaN."""
    cb = chunk_cb(B, C, chunk, block_m=8, block_k=8, block_n=8)
    above = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
    return cb.masked_fill(above, float("nan"))


def inputs(b, l, h, g, p, n, gen, large_raw=False):
    r = lambda *s: torch.randn(*s, generator=gen)
    dt_raw = r(b, l, h) - 1.0
    if large_raw:  # past softplus' threshold (slope 1; at 20 itself fp32 cannot tell the two sides apart)
        dt_raw[0, 1, 0] = 25.0
        dt_raw[-1, -2, -1] = 30.0
    dt_bias = torch.rand(h, generator=gen) * 0.5
    return dict(x=r(b, l, h, p), B=r(b, l, g, n), C=r(b, l, g, n), z=r(b, l, h, p), dout=r(b, l, h, p),
                A=-torch.rand(h, generator=gen) - 0.3, D=r(h), dt_raw=dt_raw, dt_bias=dt_bias)


def check(label, b, l, h, g, p, n, chunk, blocks, gen, seq_idx=None, with_d=True, dt_limit=(0.0, float("inf")),
          large_raw=False):
    t = inputs(b, l, h, g, p, n, gen, large_raw)
    D = t["D"] if with_d else None
    dt = scan_step_sizes(t["dt_raw"], t["dt_bias"], dt_limit)
    pieces = ssd_backward_pieces(t["dout"], t["x"], dt, t["A"], t["B"], t["C"], t["z"], chunk, D=D, seq_idx=seq_idx)
    saved = forward_saved_layout(pieces, dt, chunk, torch.float32)
    x, B, C, dt_raw = (strided(t[k], gen) for k in ("x", "B", "C", "dt_raw"))
    args = (x, pieces["dy"].float().contiguous(), saved["dt"], saved["dA_cumsum"], B, C, saved["states"],
            pieces["dS_out"].float().contiguous(), pieces["ddA_last"].permute(0, 2, 1).float().contiguous(), t["A"],
            chunk)
    cb = poisoned_chunk_cb(B, C, chunk)
    want_raw, want_bias = step_reference(t["dt_raw"], t["dt_bias"], dt_limit, pieces["ddt"])
    dx = empty_strided_like(t["x"], gen)
    ddt, dA, dD = token_gradients(*args, D=D, seq_idx=seq_idx, cb=cb, dx=dx, blocks=blocks)
    dx2, ddt_raw = empty_strided_like(t["x"], gen), empty_strided_like(t["dt_raw"], gen)
    dA2, dD2, ddt_bias = token_and_step_size_gradients(*args, dt_raw, t["dt_bias"], dt_limit, D=D, seq_idx=seq_idx,
                                                       cb=cb, dx=dx2, ddt_raw=ddt_raw, blocks=blocks)
    errors = {"dx": relative_error(dx, pieces["dx"]), "ddt": relative_error(ddt, to_chunks(pieces["ddt"], chunk)),
              "dA": relative_error(dA, pieces["dA"]), "ddt_raw": relative_error(ddt_raw, want_raw),
              "ddt_bias": relative_error(ddt_bias, want_bias)}
    if with_d:
        errors["dD"] = relative_error(dD, pieces["dD"])
    ok = within(errors, TOLERANCE) and (dD is None) == (not with_d) and (dD2 is None) == (not with_d)
    # the fused chain, exact against autograd on token_gradients' ddt; the rest as token_gradients'
    chain_raw, chain_bias = step_reference(t["dt_raw"], t["dt_bias"], dt_limit, to_rows(ddt, l))
    exact = {"chain: ddt_raw": relative_error(ddt_raw, chain_raw),
             "chain: ddt_bias": relative_error(ddt_bias, chain_bias),
             "fused: dx": relative_error(dx2, dx), "fused: dA": relative_error(dA2, dA)}
    if with_d:
        exact["fused: dD"] = relative_error(dD2, dD)
    ok &= within(exact, 1e-6)
    errors.update(exact)
    clamped = (dt == dt_limit[0]).sum().item() + (dt == dt_limit[1]).sum().item()
    print(f"{label}: b={b} l={l} h={h} g={g} p={p} n={n} Q={chunk} {blocks} clamped={clamped}",
          {k: f"{v:.1e}" for k, v in errors.items()}, "ok" if ok else "FAILED")
    return ok


def to_rows(ddt, l):
    """[b, h, nc, Q] -> [b, l, h]."""
    b, h = ddt.shape[:2]
    return ddt.permute(0, 2, 3, 1).reshape(b, -1, h)[:, :l]


def seq_idx_of(rows):
    return torch.tensor([[i for i, length in enumerate(row) for _ in range(length)] for row in rows],
                        dtype=torch.int32)


gen = torch.Generator().manual_seed(0)
small = TokenBlocks(block_s=8, block_t=8, block_n=8, num_warps=4, num_stages=1, block_h=2)
offset_rows = TokenBlocks(block_s=4, block_t=8, block_n=8, num_warps=4, num_stages=1, block_h=4)
# row 0: documents ending at 5 (inside chunk 0), 16 (on the edge of chunks 0 / 1), 26; row 1: at
# 20 and 32 (an edge); the sequence (40) ends inside chunk 2
packed = seq_idx_of([[5, 11, 10, 14], [20, 12, 8]])
ok = all([
    check("one document", 2, 40, 4, 2, 12, 20, 16, small, gen, large_raw=True),
    check("packed, clamped", 2, 40, 4, 2, 12, 20, 16, offset_rows, gen, seq_idx=packed, with_d=False,
          dt_limit=(0.15, 0.6)),
    check("packed, D", 2, 40, 4, 2, 12, 20, 16, small, gen, seq_idx=packed, dt_limit=(0.0, 1.0), large_raw=True),
    check("default tiles", 1, 32, 2, 1, 16, 32, 16, token_blocks(16, 16, 32, 2), gen),
])
sys.exit(0 if ok else 1)
