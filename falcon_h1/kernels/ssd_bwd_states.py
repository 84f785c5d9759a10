"""The state side of the gated SSD scan's backward, in Triton: the gate's backward fused with
each chunk's own share of dL/d(state entering it), then the reverse pass over the chunks.

Notation of kernels.ssd_backward_reference (the spec; the tests compare against it): per batch
b, head h (group g(h) = h // (heads / groups)), chunk c of Q positions, cs = dA_cumsum (cumsum of
dt * A inside the chunk), doc = the packed document of each position (seq_idx; one document
without it), prev_c = doc at position c*Q - 1 (none for c = 0), last_c = doc at position
min((c+1)*Q, l) - 1, scale_c = [last_c = prev_c] exp(cs[c, Q-1]) (0 for c = 0).

1. `gated_output_backward_and_local_dstates`, one program per (b*h, chunk, p-tile x n-tile):
       dy[t, p]          = dout[t, p] silu(z[t, p])
       dz[t, p]          = dout[t, p] out_x[t, p] silu'(z[t, p])
       dS_local[c][p, n] = sum_{t in c, t < l} [doc_t = prev_c] exp(cs_t) dy[t, p] C[t, g(h), n]
   (dS_local[0] = 0: no state enters chunk 0). The sum is a tl.dot of the weighted dy tile,
   transposed, with the C tile, over blocks of positions. dy and dz are computed and stored by
   the n-tile 0 program of each p-tile only; the others recompute dy for their own dot.
2. `state_passing_backward`, one program per (b*h, block of the flattened p*n), c = nc-1 .. 0:
       G = 0;  dS_out[c] = G;  ddA_last[c] = scale_c sum_{p,n} G states[c];  G = dS_local[c] + scale_c G
   so G after chunk c is dL/d(state entering c) and dS_out[c] = dL/d(state leaving c).

Layouts: dout, z, out_x [b, l, h, p] and C [b, l, g, n] with any strides but a contiguous last
dimension (z and C are slices of the in-projection output); dA_cumsum [b, h, nc, Q] fp32;
seq_idx [b, l] int32 or None; states [b, nc, h, p, n]. Arithmetic is fp32; the dot's operands
are cast to C's dtype first (bf16 in training), as mamba_ssm does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.ssd_launch import check_written_in_place, last_dim_contiguous, seq_idx_args, tile_edge


@triton.jit
def _gated_dy_local_dstates_kernel(
    dout_ptr, z_ptr, out_x_ptr, C_ptr, dA_cs_ptr, seq_idx_ptr, dy_ptr, dz_ptr, dS_ptr,
    seqlen, chunk_size, nheads, heads_per_group, headdim, dstate,
    stride_dout_b, stride_dout_l, stride_dout_h,
    stride_z_b, stride_z_l, stride_z_h,
    stride_ox_b, stride_ox_l, stride_ox_h,
    stride_C_b, stride_C_l, stride_C_g,
    stride_cs_b, stride_cs_h, stride_cs_c, stride_cs_q,
    stride_seq_b, stride_seq_l,
    stride_dy_b, stride_dy_l, stride_dy_h,
    stride_dz_b, stride_dz_l, stride_dz_h,
    stride_dS_b, stride_dS_c, stride_dS_h, stride_dS_p,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_pn, chunk, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch = pid_bh // nheads
    head = pid_bh % nheads
    group = head // heads_per_group
    n_tiles_n = tl.cdiv(dstate, BLOCK_N)
    pid_p = pid_pn // n_tiles_n
    pid_n = pid_pn % n_tiles_n
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = offs_p < headdim
    n_mask = offs_n < dstate
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    b64, start64 = batch.to(tl.int64), chunk_start.to(tl.int64)
    dout_base = dout_ptr + b64 * stride_dout_b + start64 * stride_dout_l + head * stride_dout_h
    z_base = z_ptr + b64 * stride_z_b + start64 * stride_z_l + head * stride_z_h
    ox_base = out_x_ptr + b64 * stride_ox_b + start64 * stride_ox_l + head * stride_ox_h
    dy_base = dy_ptr + b64 * stride_dy_b + start64 * stride_dy_l + head * stride_dy_h
    dz_base = dz_ptr + b64 * stride_dz_b + start64 * stride_dz_l + head * stride_dz_h
    C_base = C_ptr + b64 * stride_C_b + start64 * stride_C_l + group * stride_C_g
    cs_base = dA_cs_ptr + b64 * stride_cs_b + head * stride_cs_h + chunk * stride_cs_c
    seq_base = seq_idx_ptr + b64 * stride_seq_b + start64 * stride_seq_l
    # chunk 0 has no entering state: its weights are all 0 (dS_local[0] = 0)
    has_prev = chunk > 0
    if HAS_SEQ_IDX:
        prev_doc = tl.load(seq_base - stride_seq_l, mask=has_prev, other=-1)

    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for t0 in range(0, chunk_len, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < chunk_len
        rows = offs_t.to(tl.int64)
        tile_mask = t_mask[:, None] & p_mask[None, :]
        dout = tl.load(dout_base + rows[:, None] * stride_dout_l + offs_p[None, :], mask=tile_mask,
                       other=0.0).to(tl.float32)
        z = tl.load(z_base + rows[:, None] * stride_z_l + offs_p[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        dy = dout * z * sig
        if pid_n == 0:
            tl.store(dy_base + rows[:, None] * stride_dy_l + offs_p[None, :], dy.to(dy_ptr.dtype.element_ty),
                     mask=tile_mask)
            out_x = tl.load(ox_base + rows[:, None] * stride_ox_l + offs_p[None, :], mask=tile_mask,
                            other=0.0).to(tl.float32)
            dz = dout * out_x * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_base + rows[:, None] * stride_dz_l + offs_p[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=tile_mask)
        into = t_mask & has_prev
        if HAS_SEQ_IDX:
            doc = tl.load(seq_base + rows * stride_seq_l, mask=t_mask, other=-2)
            into = into & (doc == prev_doc)
        cs = tl.load(cs_base + offs_t * stride_cs_q, mask=t_mask, other=0.0)
        weight = tl.where(into, tl.exp(cs), 0.0)
        c_tile = tl.load(C_base + rows[:, None] * stride_C_l + offs_n[None, :],
                         mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        weighted = (dy * weight[:, None]).to(c_tile.dtype)
        acc += tl.dot(tl.trans(weighted), c_tile)

    dS_ptrs = (dS_ptr + b64 * stride_dS_b + chunk.to(tl.int64) * stride_dS_c + head * stride_dS_h
               + offs_p[:, None] * stride_dS_p + offs_n[None, :])
    tl.store(dS_ptrs, acc, mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def _state_passing_bwd_kernel(
    dS_local_ptr, states_ptr, dA_cs_ptr, seq_idx_ptr, dS_out_ptr, ddA_partial_ptr,
    seqlen, chunk_size, nchunks, nheads, state_size,
    stride_dl_b, stride_dl_c, stride_dl_h,
    stride_st_b, stride_st_c, stride_st_h,
    stride_cs_b, stride_cs_h, stride_cs_c, stride_cs_q,
    stride_seq_b, stride_seq_l,
    stride_do_b, stride_do_c, stride_do_h,
    stride_part_b, stride_part_h, stride_part_c,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_PN: tl.constexpr,
):
    """The [p, n] block of each state is flattened (p * n contiguous); the program's partial of
    ddA_last[b, h, c] (its block's share of the sum over p, n) goes to ddA_partial[b, h, c, pid]."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    batch = pid_bh // nheads
    head = pid_bh % nheads
    b64 = batch.to(tl.int64)
    offs = pid * BLOCK_PN + tl.arange(0, BLOCK_PN)
    mask = offs < state_size
    dl_base = dS_local_ptr + b64 * stride_dl_b + head * stride_dl_h + offs
    st_base = states_ptr + b64 * stride_st_b + head * stride_st_h + offs
    do_base = dS_out_ptr + b64 * stride_do_b + head * stride_do_h + offs
    cs_base = dA_cs_ptr + b64 * stride_cs_b + head * stride_cs_h + (chunk_size - 1) * stride_cs_q
    seq_base = seq_idx_ptr + b64 * stride_seq_b
    part_base = ddA_partial_ptr + b64 * stride_part_b + head * stride_part_h + pid

    grad = tl.zeros([BLOCK_PN], dtype=tl.float32)  # dL/d(state entering chunk c + 1)
    # chunks nc-1 .. 1; chunk 0 (scale 0: nothing carried into it) after the loop
    for i in range(0, nchunks - 1):
        c = nchunks - 1 - i
        c64 = c.to(tl.int64)
        tl.store(do_base + c64 * stride_do_c, grad.to(dS_out_ptr.dtype.element_ty), mask=mask)
        scale = tl.exp(tl.load(cs_base + c64 * stride_cs_c))
        if HAS_SEQ_IDX:
            # the entering state survives chunk c only if its document still runs at the chunk's end
            chunk_start = c * chunk_size
            chunk_end = tl.minimum(chunk_start + chunk_size, seqlen)
            last_doc = tl.load(seq_base + (chunk_end - 1).to(tl.int64) * stride_seq_l)
            prev_doc = tl.load(seq_base + (chunk_start - 1).to(tl.int64) * stride_seq_l)
            scale = tl.where(last_doc == prev_doc, scale, 0.0)
        state = tl.load(st_base + c64 * stride_st_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_base + c64 * stride_part_c, scale * tl.sum(grad * state, axis=0))
        grad = tl.load(dl_base + c64 * stride_dl_c, mask=mask, other=0.0).to(tl.float32) + scale * grad
    tl.store(do_base, grad.to(dS_out_ptr.dtype.element_ty), mask=mask)
    tl.store(part_base, 0.0)


def local_dstates_blocks(chunk_size: int, headdim: int, dstate: int) -> dict:
    """Default tiles of `gated_output_backward_and_local_dstates`: positions in blocks of up to
    64 (a Q = 256 chunk never sits in registers whole), p up to 64 and n up to 128 per program
    (the fp32 accumulator then is at most 64 x 128: 64 registers a thread at 4 warps). At the
    0.5B shape (p 64, n 128) one program covers a whole state, so dy is computed once; at 7B
    (p 128, n 256) four programs share a (b, h, chunk) and each p-tile's dy is computed twice.
    Not yet swept on the GPU (`blocks` overrides them: benchmarks/ssd_bench.py --backward-sweep)."""
    return dict(BLOCK_T=tile_edge(chunk_size, 64), BLOCK_P=tile_edge(headdim, 64), BLOCK_N=tile_edge(dstate, 128),
                num_warps=4)


def state_passing_blocks(headdim: int, dstate: int) -> dict:
    """Default block of `state_passing_backward`: 1024 of the p*n state entries per program
    (8 programs per (b, h) at the 0.5B shape, 32 at 7B: enough programs in flight to hide the
    latency of the serial loop over chunks). Not yet timed on the GPU."""
    return dict(BLOCK_PN=min(1024, triton.next_power_of_2(headdim * dstate)), num_warps=4)


def _launch_options(defaults: dict, blocks: dict | None) -> tuple[dict, dict]:
    """(constexpr tile sizes, launch options num_warps / num_stages) from the defaults
    overridden by `blocks`."""
    merged = {**defaults, **(blocks or {})}
    unknown = set(merged) - set(defaults) - {"num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"unknown block settings {sorted(unknown)}; known: {sorted(defaults)} + num_stages")
    launch = {k: merged.pop(k) for k in ("num_warps", "num_stages") if k in merged}
    return merged, launch


def gated_output_backward_and_local_dstates(dout, z, out_x, C, dA_cumsum, chunk_size, seq_idx=None, dz=None,
                                            blocks=None):
    """dout, z, out_x [b, l, h, p], C [b, l, g, n] (strided, last dim contiguous), dA_cumsum
    [b, h, nc, Q] fp32, seq_idx [b, l] int32 or None; dz [b, l, h, p] (a strided view, last dim
    contiguous) is written in place.

    Returns (dy, dS_local): dy = dout * silu(z) [b, l, h, p] contiguous in dout's dtype, and
    dS_local [b, nc, h, p, n] fp32 (module docstring; chunk 0's is 0). With dz=None a new
    contiguous dz in dout's dtype is allocated and returned third: (dy, dS_local, dz).

    blocks: overrides of `local_dstates_blocks` (BLOCK_T, BLOCK_P, BLOCK_N, num_warps, num_stages)."""
    batch, seqlen, nheads, headdim = dout.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    nchunks = triton.cdiv(seqlen, chunk_size)
    if nheads % ngroups:
        raise ValueError(f"{nheads} heads do not split into {ngroups} groups")
    if dA_cumsum.shape != (batch, nheads, nchunks, chunk_size):
        raise ValueError(f"dA_cumsum {tuple(dA_cumsum.shape)}: expected {(batch, nheads, nchunks, chunk_size)}")
    dout, z, out_x, C = (last_dim_contiguous(t) for t in (dout, z, out_x, C))
    return_dz = dz is None
    if dz is None:
        dz = torch.empty_like(dout, memory_format=torch.contiguous_format)
    check_written_in_place("gated_output_backward_and_local_dstates", dz=dz)
    dy = torch.empty(batch, seqlen, nheads, headdim, device=dout.device, dtype=dout.dtype)
    dS_local = torch.empty(batch, nchunks, nheads, headdim, dstate, device=dout.device, dtype=torch.float32)
    tiles, launch = _launch_options(local_dstates_blocks(chunk_size, headdim, dstate), blocks)
    grid = (triton.cdiv(headdim, tiles["BLOCK_P"]) * triton.cdiv(dstate, tiles["BLOCK_N"]), nchunks,
            batch * nheads)
    seq_ptr, stride_seq_b, stride_seq_l = seq_idx_args(seq_idx, dA_cumsum)
    _gated_dy_local_dstates_kernel[grid](
        dout, z, out_x, C, dA_cumsum, seq_ptr, dy, dz, dS_local,
        seqlen, chunk_size, nheads, nheads // ngroups, headdim, dstate,
        dout.stride(0), dout.stride(1), dout.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        out_x.stride(0), out_x.stride(1), out_x.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        *dA_cumsum.stride(),
        stride_seq_b, stride_seq_l,
        dy.stride(0), dy.stride(1), dy.stride(2),
        dz.stride(0), dz.stride(1), dz.stride(2),
        dS_local.stride(0), dS_local.stride(1), dS_local.stride(2), dS_local.stride(3),
        HAS_SEQ_IDX=seq_idx is not None, **tiles, **launch,
    )
    return (dy, dS_local, dz) if return_dz else (dy, dS_local)


def _states_flat(t: torch.Tensor) -> torch.Tensor:
    """[b, nc, h, p, n] with its [p, n] block contiguous (the kernel walks it flattened)."""
    p, n = t.shape[-2:]
    return t if t.stride(-1) == 1 and t.stride(-2) == n else t.contiguous()


def state_passing_backward(dS_local, states, dA_cumsum, seqlen, chunk_size, seq_idx=None, out_dtype=None,
                           blocks=None):
    """dS_local, states [b, nc, h, p, n] (states entering each chunk), dA_cumsum [b, h, nc, Q] fp32,
    seq_idx [b, l] int32 or None.

    Returns (dS_out, ddA_last): dS_out [b, nc, h, p, n] contiguous in out_dtype (default
    states.dtype), the gradient of the state leaving each chunk; ddA_last [b, h, nc] fp32, the
    carried state's share of dL/d(dA_cumsum[..., c, Q-1]) (module docstring).

    ddA_last is summed over p, n in two steps: each program writes its block's partial to a
    [b, h, nc, blocks] buffer that torch then sums (no atomics: the result is the same run to
    run, and the sum costs one small launch where atomics would cost one for zeroing).

    blocks: overrides of `state_passing_blocks` (BLOCK_PN, num_warps, num_stages)."""
    batch, nchunks, nheads, headdim, dstate = dS_local.shape
    if states.shape != dS_local.shape:
        raise ValueError(f"states {tuple(states.shape)} != dS_local {tuple(dS_local.shape)}")
    if dA_cumsum.shape != (batch, nheads, nchunks, chunk_size) or triton.cdiv(seqlen, chunk_size) != nchunks:
        raise ValueError(f"dA_cumsum {tuple(dA_cumsum.shape)} / seqlen {seqlen}: expected "
                         f"{(batch, nheads, nchunks, chunk_size)} with {nchunks} chunks of {chunk_size}")
    dS_local, states = _states_flat(dS_local), _states_flat(states)
    out_dtype = states.dtype if out_dtype is None else out_dtype
    dS_out = torch.empty(dS_local.shape, device=dS_local.device, dtype=out_dtype)
    tiles, launch = _launch_options(state_passing_blocks(headdim, dstate), blocks)
    n_blocks = triton.cdiv(headdim * dstate, tiles["BLOCK_PN"])
    partial = torch.empty(batch, nheads, nchunks, n_blocks, device=dS_local.device, dtype=torch.float32)
    seq_ptr, stride_seq_b, stride_seq_l = seq_idx_args(seq_idx, dA_cumsum)
    _state_passing_bwd_kernel[(n_blocks, batch * nheads)](
        dS_local, states, dA_cumsum, seq_ptr, dS_out, partial,
        seqlen, chunk_size, nchunks, nheads, headdim * dstate,
        dS_local.stride(0), dS_local.stride(1), dS_local.stride(2),
        states.stride(0), states.stride(1), states.stride(2),
        *dA_cumsum.stride(),
        stride_seq_b, stride_seq_l,
        dS_out.stride(0), dS_out.stride(1), dS_out.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        HAS_SEQ_IDX=seq_idx is not None, **tiles, **launch,
    )
    ddA_last = partial.view(batch, nheads, nchunks) if n_blocks == 1 else partial.sum(-1)
    return dS_out, ddA_last
