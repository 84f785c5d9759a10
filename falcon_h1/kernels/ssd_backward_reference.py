"""The gated SSD scan's backward written out term by term in PyTorch: the reference for the
project's own Triton backward kernels (kernels.ssd_bwd_*), one intermediate per kernel.

Per chunk c of length Q, head h (group g = h // (heads / groups)), positions t, s in the chunk,
cs = cumsum of dt * A inside the chunk, doc = the packed-document number of each position:
    y_t   = sum_{s<=t, doc_s=doc_t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s
            + [doc_t = prev_c] exp(cs_t) S_in[c] C_t + D x_t
    S_in[c+1] = scale_c S_in[c] + dS_chunk[c]                         (S_in[0] = 0)
    dS_chunk[c] = sum_s [doc_s = last_c] exp(cs_{Q-1} - cs_s) dt_s x_s B_s^T
    scale_c = [last_c = prev_c] exp(cs_{Q-1})
    out = y * silu(z)
where last_c is the document of chunk c's last position and prev_c that of chunk c-1's (none
for c = 0). Positions past the sequence end pad the last chunk with dt = 0 (their cs repeats
the last real one) and join its last document.

The backward's pieces (names as the kernels use them):
    dy        = dout * silu(z)                 dz = dout * y * silu'(z)
    dS_local[c] = sum_t [doc_t = prev_c] exp(cs_t) dy_t C_t^T            [p, n]
    G[c]      = dS_local[c] + scale_c G[c+1]   (G[n_chunks] = 0): dL/dS_in[c]
    dS_out[c] = G[c+1]: dL/d(state leaving chunk c)
    ddA_last[c] = scale_c sum(dS_out[c] * S_in[c])   (the carried state's share of dL/dcs_{Q-1})
and from those the input gradients (dx, ddt, dB, dC, dD, dA), equal to autograd's through
kernels.ssd_reference (tests/falcon_h1/test_ssd_backward_reference.py checks that in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunked(t: torch.Tensor, q: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1] // q, q, *t.shape[2:])


def ssd_backward_pieces(dout, x, dt, A, B, C, z, chunk_size: int, D=None, seq_idx=None) -> dict:
    """dout, x, z [b, l, h, p]; dt [b, l, h] processed (biased, softplus, clamped); A, D [h];
    B, C [b, l, g, n]; seq_idx [b, l] or None. Computes in float64.

    Returns chunked tensors (l padded to a multiple of chunk_size, chunks of Q positions):
    cs [b, c, Q, h]; y, dy, dz [b, l, h, p] (unpadded); S_in, dS_local, dS_out [b, c, h, p, n];
    scale, ddA_last [b, c, h]; and the input gradients dx [b, l, h, p], ddt [b, l, h],
    dB, dC [b, l, g, n], dD, dA [h] (ddt is dL/d(processed dt); the softplus/bias/clamp chain
    is kernels.scan_step_sizes')."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    x, dt, B, C, z, dout = (t.double() for t in (x, dt, B, C, z, dout))
    A = A.double()
    pad = (-l) % q
    if seq_idx is None:
        seq_idx = torch.zeros(b, l, dtype=torch.int64, device=x.device)
    seq_idx = torch.cat([seq_idx.long(), seq_idx[:, -1:].long().expand(b, pad)], dim=1)
    xp, zp, doutp, Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, z, dout, B, C))
    dtp = F.pad(dt, (0, 0, 0, pad))
    rep = h // g
    xc, zc, doutc = (_chunked(t, q) for t in (xp, zp, doutp))             # [b, c, Q, h, p]
    Bc, Cc = (_chunked(t.repeat_interleave(rep, dim=2), q) for t in (Bp, Cp))  # [b, c, Q, h, n]
    dtc = _chunked(dtp, q)                                                # [b, c, Q, h]
    cs = torch.cumsum(dtc * A, dim=2)
    doc = _chunked(seq_idx, q)                                            # [b, c, Q]
    last = doc[:, :, -1]
    prev = F.pad(last[:, :-1], (1, 0), value=-1)
    nc = doc.shape[1]

    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    keep = causal & (doc[:, :, :, None] == doc[:, :, None, :])             # [b, c, t, s]
    # exp only where kept: exp(cs_t - cs_s) above the diagonal can overflow
    diff = (cs[:, :, :, None, :] - cs[:, :, None, :, :]).masked_fill(~keep[..., None], float("-inf"))
    decay = torch.exp(diff)                                               # [b, c, t, s, h]
    CB = torch.einsum("bcthn,bcshn->bctsh", Cc, Bc)
    to_end = torch.exp(cs[:, :, -1:] - cs) * (doc == last[..., None])[..., None]   # [b, c, Q, h]
    into = torch.exp(cs) * (doc == prev[..., None])[..., None]
    dS_chunk = torch.einsum("bcsh,bcshp,bcshn->bchpn", to_end * dtc, xc, Bc)
    scale = torch.exp(cs[:, :, -1]) * (last == prev)[..., None]          # [b, c, h]
    S_in = [torch.zeros_like(dS_chunk[:, 0])]
    for c in range(nc - 1):
        S_in.append(scale[:, c, :, None, None] * S_in[-1] + dS_chunk[:, c])
    S_in = torch.stack(S_in, dim=1)                                       # [b, c, h, p, n]
    M = CB * decay                                                        # [b, c, t, s, h]
    y = (torch.einsum("bctsh,bcsh,bcshp->bcthp", M, dtc, xc)
         + torch.einsum("bcth,bcthn,bchpn->bcthp", into, Cc, S_in))
    if D is not None:
        y = y + xc * D.double()[:, None]

    sig = torch.sigmoid(zc)
    dy = doutc * zc * sig
    dz = doutc * y * sig * (1 + zc * (1 - sig))
    dS_local = torch.einsum("bcth,bcthp,bcthn->bchpn", into, dy, Cc)
    G = [torch.zeros_like(dS_local[:, 0])]
    for c in range(nc - 1, -1, -1):
        G.append(dS_local[:, c] + scale[:, c, :, None, None] * G[-1])
    G = torch.stack(G[::-1], dim=1)                                       # [b, c+1, h, p, n]
    dS_out = G[:, 1:]
    ddA_last = scale * (dS_out * S_in).sum(dim=(-1, -2))

    # input gradients, term by term
    dyx = torch.einsum("bcthp,bcshp->bctsh", dy, xc)                      # dy_t . x_s
    state_dot = torch.einsum("bcshn,bchpn->bcshp", Bc, dS_out)            # (dS_out B_s)[p]
    inner = torch.einsum("bctsh,bcthp->bcshp", M, dy) + to_end[..., None] * state_dot
    dx = inner * dtc[..., None]
    ddt = (inner * xc).sum(-1)
    W = M * dtc[:, :, None] * dyx                                         # dL/d(log decay_ts)
    inter = torch.einsum("bcthp,bcthn,bchpn->bcth", dy, Cc, S_in) * into
    chunk_end = torch.einsum("bcsh,bcshp,bcshp->bcsh", to_end * dtc, xc, state_dot)
    dcs = W.sum(3) - W.sum(2) + inter - chunk_end
    dcs[:, :, -1] += chunk_end.sum(2) + ddA_last
    da = dcs.flip(2).cumsum(2).flip(2)                                    # cs = cumsum(a): reverse cumsum
    ddt = ddt + da * A
    dA = (da * dtc).sum(dim=(0, 1, 2))
    dBh = (torch.einsum("bctsh,bcthn->bcshn", decay * dyx, Cc) * dtc[..., None]
           + torch.einsum("bcsh,bcshp,bchpn->bcshn", to_end * dtc, xc, dS_out))
    dCh = (torch.einsum("bctsh,bcsh,bcshn->bcthn", decay * dyx, dtc, Bc)
           + into[..., None] * torch.einsum("bcthp,bchpn->bcthn", dy, S_in))
    dD = None
    if D is not None:
        dx = dx + dy * D.double()[:, None]
        dD = (dy * xc).sum(dim=(0, 1, 2, 4))

    def unchunk(t):
        return t.reshape(b, nc * q, *t.shape[3:])[:, :l]

    def group_sum(t):
        return unchunk(t).unflatten(2, (g, rep)).sum(3)

    return dict(cs=cs, y=unchunk(y), dy=unchunk(dy), dz=unchunk(dz), S_in=S_in, dS_local=dS_local,
                dS_out=dS_out, scale=scale, ddA_last=ddA_last, dx=unchunk(dx), ddt=unchunk(ddt),
                dB=group_sum(dBh), dC=group_sum(dCh), dD=dD, dA=dA)


def forward_saved_layout(pieces: dict, dt: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> dict:
    """The pieces' forward quantities in the layouts the GPU forward saves for its backward
    (mamba_ssm's `_mamba_chunk_scan_combined_fwd` returns them so): dt [b, h, c, Q] (processed, 0 past
    the sequence end) and dA_cumsum [b, h, c, Q] in fp32, states [b, c, h, p, n] (the state entering
    each chunk) and out_x [b, l, h, p] (the pre-gate output) in `dtype`."""
    b, l, h = dt.shape
    pad = (-l) % chunk_size
    dt_chunks = _chunked(F.pad(dt.double(), (0, 0, 0, pad)), chunk_size)        # [b, c, Q, h]
    return dict(dt=dt_chunks.permute(0, 3, 1, 2).float().contiguous(),
                dA_cumsum=pieces["cs"].permute(0, 3, 1, 2).float().contiguous(),
                states=pieces["S_in"].to(dtype).contiguous(), out_x=pieces["y"].to(dtype).contiguous())
