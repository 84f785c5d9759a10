"""Kernel microbenchmarks of falcon-bench (`--kernels`): the SSD scan, the Mamba branch, causal
conv + SiLU and SwiGLU, fwd+bwd at the Falcon-H1-0.5B shape, each against its reference."""

from __future__ import annotations

import math

import torch

from benchmarks.timing import kernel_ms, profile_kernels, with_fresh_grads


class _PrintedAsMeasured(dict):
    """Results printed the moment they are measured, so a call cut off by its time limit keeps them."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"  kernel {key:34s} {value:8.3f}", flush=True)


def _mamba_branch_microbench(zxbcdt, h, p, n, groups, chunk, leaves, timed) -> None:
    """The whole Mamba branch (conv + gated scan, kernels.mamba_branch) fwd+bwd on the in-projection
    output [b, s, .] (a strided view of [s, b, .]), with the scan's backward starting from the
    forward's chunk states and with mamba_ssm's recomputation of them."""
    from falcon_h1.kernels.mamba_branch import mamba_conv_scan

    d, bc = h * p, groups * n
    leaf = zxbcdt.detach().requires_grad_()
    w = torch.randn(d + 2 * bc, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(d + 2 * bc, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = -torch.rand(h, device="cuda", requires_grad=True)
    D, dt_bias = torch.ones(h, device="cuda", requires_grad=True), torch.zeros(h, device="cuda", requires_grad=True)
    dy = torch.randn(*zxbcdt.shape[:2], d, device="cuda", dtype=torch.bfloat16)
    leaves[:] = [leaf, w, bias, A, D, dt_bias]
    for keep in (True, False):
        branch = lambda: mamba_conv_scan(leaf, w, bias, None, A, D, dt_bias, d, bc, h, groups, chunk,
                                         (0.0, math.inf), keep_forward_states=keep).backward(dy)
        timed(f"mamba_branch_{'kept_states' if keep else 'recomputed_states'}_fwd_bwd", branch)


def kernel_microbench(seq: int = 4096, batch: int = 4, which: str = "all", ssd_profile: dict | None = None):
    """SSD scan, causal conv + SiLU and SwiGLU, fwd+bwd, at the 0.5B shape (ms, median).

    Each fwd+bwd is timed eagerly (`*_ms`: host launch gaps included, as in an eager step) and
    by its summed kernel time (`*_gpu_ms`: GPU time, as in a graphed step). Inputs are strided
    views of one in-projection-like buffer, as in the mixer. With `which="all"` each conv tile
    configuration is timed too (the module constants are swapped in turn). Unless `which="conv"`,
    `ssd_profile` receives the per-kernel CUDA time of one SSD fwd+bwd.
    """
    ssd_profile = {} if ssd_profile is None else ssd_profile
    import triton.testing

    from falcon_h1 import kernels
    from falcon_h1.kernels import conv_triton

    leaves = []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=leaves, return_mode="median")

    def timed(name, fn):
        out[f"{name}_ms"] = bench(fn)
        out[f"{name}_gpu_ms"] = kernel_ms(fn, leaves)
    h, p, n, groups, chunk = 24, 64, 128, 1, 128
    out = _PrintedAsMeasured()
    widths = [h * p, h * p, groups * n, groups * n, h]
    proj = torch.randn(seq, batch, sum(widths), device="cuda", dtype=torch.bfloat16)
    z, x, B, C, dt = (t.requires_grad_() for t in proj.transpose(0, 1).split(widths, dim=-1))  # leaf views
    heads = lambda t, k: t.unflatten(-1, (k, -1))
    A = -torch.rand(h, device="cuda", requires_grad=True)
    D, dt_bias = torch.ones(h, device="cuda", requires_grad=True), torch.zeros(h, device="cuda", requires_grad=True)
    dy = torch.randn(batch, seq, h, p, device="cuda", dtype=torch.bfloat16)
    lim = (0.0, math.inf)
    leaves += [z, x, B, C, dt, A, D, dt_bias]

    def ssd(gate):
        y = kernels.ssd_scan(heads(x, h), dt, A, heads(B, groups), heads(C, groups), chunk, D, dt_bias, lim, True,
                             z=heads(z, h) if gate else None)
        (y if gate else y * torch.nn.functional.silu(heads(z, h))).backward(dy)
    if which != "conv":
        out["ssd_then_gate_fwd_bwd_ms"] = bench(lambda: ssd(False))
        timed("ssd_gate_in_kernel_fwd_bwd", lambda: ssd(True))  # mamba_ssm's combined scan, as shipped
        ssd_profile["ssd_gate_in_kernel"] = profile_kernels(with_fresh_grads(lambda: ssd(True), leaves), top=30)
        for k in ssd_profile["ssd_gate_in_kernel"][1:]:
            print(f"  ssd profile {k['ms']:8.3f} ms {k['calls']:3d}x  {k['kernel']}", flush=True)
        _mamba_branch_microbench(proj.transpose(0, 1), h, p, n, groups, chunk, leaves, timed)

    channels = h * p + 2 * groups * n
    xc = proj.transpose(0, 1)[..., h * p: h * p + channels].requires_grad_()
    w = torch.randn(channels, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves[:] = [xc, w, bias]
    dyc = torch.randn(batch, seq, channels, device="cuda", dtype=torch.bfloat16)
    from falcon_h1.kernels.conv_reference import causal_conv1d_silu_reference

    timed("conv_torch_fwd_bwd", lambda: causal_conv1d_silu_reference(xc, w, bias).backward(dyc))
    xd = xc.detach()
    out["conv_triton_fwd_ms"] = bench(lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach()))
    out["conv_triton_bwd_ms"] = bench(lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach()))
    out["conv_triton_fwd_streaming_ms"] = bench(
        lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach(), streaming=True))
    out["conv_triton_bwd_streaming_ms"] = bench(
        lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach(), streaming=True))
    names = ("FWD_BLOCK_L", "FWD_BLOCK_C", "FWD_WARPS", "BWD_BLOCK_L", "BWD_BLOCK_C", "BWD_WARPS",
             "BWD_ROWS_PER_PROGRAM", "BWD_RELOAD_WINDOWS", "BWD_STAGES", "STREAM_BLOCK_C", "STREAM_WARPS",
             "STREAM_ROWS_PER_PROGRAM")
    defaults = {k: getattr(conv_triton, k) for k in names}
    sweep_tiles = which in ("all", "conv")
    for bl, bc, nw in [(16, 128, 4), (64, 128, 4), (32, 256, 8), (64, 64, 4)] if sweep_tiles else []:
        conv_triton.FWD_BLOCK_L, conv_triton.FWD_BLOCK_C, conv_triton.FWD_WARPS = bl, bc, nw
        out[f"conv_fwd_{bl}x{bc}w{nw}_ms"] = bench(lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach()))
    # pass 1 of the backward; 32x128 w8 r32 and 64x64 w8 r64 need ~128 registers offline (NOTES.md)
    # (rows, cols, warps, rows a program, x windows read again for dw, pipeline stages)
    bwd_tiles = [(32, 128, 4, 64, False, 3), (32, 128, 4, 64, True, 3), (32, 128, 4, 64, False, 1),
                 (32, 128, 4, 64, True, 1), (32, 128, 8, 64, True, 1), (16, 128, 4, 64, True, 1),
                 (32, 128, 4, 128, True, 1), (64, 128, 8, 128, True, 1)]
    for bl, bc, nw, rows, reload, stages in bwd_tiles if sweep_tiles else []:
        conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_C, conv_triton.BWD_WARPS = bl, bc, nw
        conv_triton.BWD_ROWS_PER_PROGRAM, conv_triton.BWD_RELOAD_WINDOWS, conv_triton.BWD_STAGES = rows, reload, stages
        out[f"conv_bwd_tiles_{bl}x{bc}w{nw}r{rows}{'_reload' if reload else ''}_s{stages}_ms"] = bench(
            lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach()))
    # the one-pass backward: (channels, warps, rows a program)
    for bc, nw, rows in [(64, 1, 64), (128, 1, 32), (128, 1, 128), (256, 1, 64), (256, 2, 64), (128, 2, 64)] \
            if sweep_tiles else []:
        conv_triton.STREAM_BLOCK_C, conv_triton.STREAM_WARPS, conv_triton.STREAM_ROWS_PER_PROGRAM = bc, nw, rows
        out[f"conv_fwd_streaming_{bc}w{nw}r{rows}_ms"] = bench(
            lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach(), streaming=True))
        out[f"conv_bwd_streaming_{bc}w{nw}r{rows}_ms"] = bench(
            lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach(), streaming=True))
    for k, v in defaults.items():
        setattr(conv_triton, k, v)
    timed("conv_triton_fwd_bwd", lambda: kernels.causal_conv1d_silu(xc, w, bias, True).backward(dyc))

    # the fused cross entropy's backward (timed with the conv sweep too): the logits' gradient scaled
    # per token in place, torch's broadcasting multiply against the Triton
    # kernel; signs as scales keep the values from growing or vanishing over the repeats
    from falcon_h1.kernels.row_scale import scale_rows

    logits_grad = torch.randn(seq * batch, 32784, device="cuda", dtype=torch.bfloat16)
    signs = torch.randint(0, 2, (seq * batch,), device="cuda").float() * 2 - 1
    out["ce_bwd_scale_torch_ms"] = bench(lambda: logits_grad.mul_(signs[:, None]))
    out["ce_bwd_scale_triton_ms"] = bench(lambda: scale_rows(logits_grad, signs, out=logits_grad))
    # a µP row scale folded into a weight (in-projection-sized): torch's broadcasting multiply against
    # kernels.row_scale's pass (KernelOptions.triton_row_scale), each writing a new tensor
    weight = torch.randn(5120, 1024, device="cuda", dtype=torch.bfloat16)
    row_scale = torch.rand(5120, 1, device="cuda", dtype=torch.bfloat16) + 0.5
    out["row_scale_torch_ms"] = bench(lambda: weight * row_scale)
    out["row_scale_triton_ms"] = bench(lambda: scale_rows(weight, row_scale.view(-1)))
    if which == "conv":
        return dict(out)
    ffn = 2048
    hm = torch.randn(seq, batch, 2 * ffn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dm = torch.randn(seq, batch, ffn, device="cuda", dtype=torch.bfloat16)
    leaves[:] = [hm]

    def swiglu_eager():
        gate, up = hm.chunk(2, dim=-1)
        (torch.nn.functional.silu(gate * 0.88) * up * 0.58).backward(dm)
    out["swiglu_eager_scaled_fwd_bwd_ms"] = bench(swiglu_eager)
    timed("swiglu_triton_fwd_bwd", lambda: kernels.swiglu(hm, True).backward(dm))
    # bytes-moved floors at the copy bandwidth are in benchmarks/NOTES.md
    return dict(out)
