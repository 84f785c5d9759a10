"""Runs the Triton kernels of falcon_h1.kernels on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by test_kernels.py before this process imports triton) and
compares them with float64 PyTorch autograd. Prints one line per check; exit 1 on failure."""

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from falcon_h1.kernels import conv_triton  # noqa: E402
from falcon_h1.kernels.conv_triton import causal_conv1d_silu_triton  # noqa: E402
from falcon_h1.config import FalconH1Config  # noqa: E402
from falcon_h1.kernels.documents import documents_from_position_ids  # noqa: E402
from falcon_h1.kernels.mamba_branch import split_in_projection  # noqa: E402
from falcon_h1.kernels.rms_norm_triton import residual_rms_norm_triton, rms_norm_triton  # noqa: E402
from falcon_h1.kernels.rotary_triton import rotary_qkv_triton  # noqa: E402
from falcon_h1.rope import RotaryFrequencies  # noqa: E402
from falcon_h1.kernels.swiglu_triton import swiglu_triton  # noqa: E402
from tests.falcon_h1.packed_rows import documents, position_ids  # noqa: E402

TOLERANCE = 1e-5  # fp32 kernels against float64: rounding only
BF16_TOLERANCE = 1e-2  # bf16 inputs and outputs against float64 of the same bf16 inputs
LEAK_MARGIN = 1e-2  # how far a computation leaking across documents must be from the reference


def rel(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want).norm() / want.norm()).item()


def conv_float64(x, w, bias, scale):
    """Causal depthwise conv as an explicit sum over taps (tap j multiplies x[t-3+j]), then SiLU."""
    length = x.shape[1]
    acc = bias.expand_as(x).clone()
    for j in range(w.shape[1]):
        shift = w.shape[1] - 1 - j
        shifted = F.pad(x, (0, 0, shift, 0))[:, :length]
        acc = acc + shifted * w[:, j]
    return F.silu(acc) * scale


def check_conv(batch, length, channels, pad, with_scale, g, streaming=False):
    base = torch.randn(length, batch, channels + pad, generator=g)
    x = base[:, :, pad:].transpose(0, 1)          # strided [b, l, c] view, as in the mixer
    w, bias = torch.randn(channels, 4, generator=g), torch.randn(channels, generator=g)
    scale = torch.rand(channels, generator=g) + 0.5 if with_scale else None
    dy = torch.randn(batch, length, channels, generator=g)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    out = causal_conv1d_silu_triton(xs, ws, bs, scale, streaming=streaming)
    out.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    want = conv_float64(x64, w64, b64, scale.double() if with_scale else 1.0)
    want.backward(dy.double())
    return {"out": rel(out, want), "dx": rel(xs.grad, x64.grad), "dweight": rel(ws.grad, w64.grad),
            "dbias": rel(bs.grad, b64.grad)}


def check_packed_conv(rows, channels, g, streaming=False):
    """Packed rows (seq_idx) against every document convolved alone (float64), out and all
    gradients; and the same rows convolved as one sequence (a leaking window) must differ
    from that reference, so the comparison can see a leak."""
    batch, length = len(rows), sum(rows[0])
    x = torch.randn(length, batch, channels, generator=g).transpose(0, 1)   # strided [b, l, c]
    w, bias = torch.randn(channels, 4, generator=g), torch.randn(channels, generator=g)
    scale = torch.rand(channels, generator=g) + 0.5
    dy = torch.randn(batch, length, channels, generator=g)
    seq_idx = documents_from_position_ids(position_ids(rows)).seq_idx
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    causal_conv1d_silu_triton(xs, ws, bs, scale, seq_idx=seq_idx, streaming=streaming).backward(dy)
    got = {"out": None, "dx": xs.grad, "dweight": ws.grad, "dbias": bs.grad}
    with torch.no_grad():
        got["out"] = causal_conv1d_silu_triton(x, w, bias, scale, seq_idx=seq_idx, streaming=streaming)

    def float64(alone: bool):
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
        if alone:
            out = torch.zeros(batch, length, channels, dtype=torch.float64)
            for row, start, end in documents(rows):
                out = out.index_put((torch.tensor([row]), torch.arange(start, end)[None]),
                                    conv_float64(x64[row:row + 1, start:end], w64, b64, scale.double())[0])
        else:
            out = conv_float64(x64, w64, b64, scale.double())
        out.backward(dy.double())
        return {"out": out.detach(), "dx": x64.grad, "dweight": w64.grad, "dbias": b64.grad}

    want, leaky = float64(alone=True), float64(alone=False)
    errors = {name: rel(got[name], want[name]) for name in want}
    # a window leaking across the boundaries is far outside the tolerance
    leaks = {f"{name} of a leaking window": rel(leaky[name], want[name]) for name in ("out", "dx", "dweight")}
    return errors, leaks


def check_swiglu(rows, ffn, g):
    h = torch.randn(rows, 2 * ffn + 3, generator=g)[:, 3:]   # row stride != width
    dout = torch.randn(rows, ffn, generator=g)
    hs = h.detach().clone().requires_grad_()
    out = swiglu_triton(hs)
    out.backward(dout)
    h64 = h.detach().double().requires_grad_()
    want = F.silu(h64[:, :ffn]) * h64[:, ffn:]
    want.backward(dout.double())
    return {"out": rel(out, want), "dh": rel(hs.grad, h64.grad)}


def rotate_float64(t, angles, mscale):
    """RoPE as a complex product: each head's halves (t1, t2) as t1 + i t2, times mscale e^(i angle).
    t [s, b, heads, d], angles [s, 1 or b, d / 2]."""
    half = t.shape[-1] // 2
    turned = torch.complex(t[..., :half], t[..., half:]) * torch.polar(torch.full_like(angles, mscale),
                                                                       angles)[:, :, None, :]
    return torch.cat([turned.real, turned.imag], dim=-1)


def check_rotary(length, batch, heads, kv_heads, head_dim, with_positions, shared_gradient, g, one_launch=False):
    """rotary_qkv_triton on the attention columns of a wider projection (row stride > width), q and
    k rotated and every gradient against float64; with shared_gradient through split_in_projection's
    InProjectionGradient, the Mamba columns' gradient coming another way (so the split copies them in)."""
    cfg = FalconH1Config(head_dim=head_dim, max_position_embeddings=64, rope_theta=500.0)
    positions = torch.stack([torch.arange(length) + 5 * row for row in range(batch)]) if with_positions else None
    freqs = RotaryFrequencies(cfg)(length, positions)
    angles = freqs[..., 0, : head_dim // 2].double()
    assert torch.equal(freqs[..., : head_dim // 2], freqs[..., head_dim // 2:])
    mscale, q_w, kv_w, extra = 1.3, heads * head_dim, kv_heads * head_dim, 6
    proj = torch.randn(length, batch, q_w + 2 * kv_w + extra, generator=g)
    dq, dk, dv = (torch.randn(length, batch, n, head_dim, generator=g) for n in (heads, kv_heads, kv_heads))
    d_extra = torch.randn(length, batch, extra, generator=g)
    leaf = proj.clone().requires_grad_()
    if shared_gradient:
        qkv, rest, gradient = split_in_projection(leaf, q_w + 2 * kv_w)
    else:
        qkv, rest, gradient = leaf[..., : q_w + 2 * kv_w], leaf[..., q_w + 2 * kv_w:], None
    q, k, v = rotary_qkv_triton(qkv, freqs, q_w, kv_w, head_dim, mscale, gradient, one_launch)
    unflat = lambda t: t.unflatten(-1, (-1, head_dim))
    torch.autograd.backward([unflat(q), unflat(k), unflat(v), rest * 3], [dq, dk, dv, d_extra])
    leaf64 = proj.double().requires_grad_()
    q64, k64, v64 = (unflat(t) for t in leaf64[..., : q_w + 2 * kv_w].split([q_w, kv_w, kv_w], dim=-1))
    want_q, want_k = rotate_float64(q64, angles, mscale), rotate_float64(k64, angles, mscale)
    torch.autograd.backward([want_q, want_k, v64, leaf64[..., q_w + 2 * kv_w:] * 3],
                            [dq.double(), dk.double(), dv.double(), d_extra.double()])
    return {"q": rel(unflat(q), want_q), "k": rel(unflat(k), want_k), "v": rel(unflat(v), v64),
            "dprojection": rel(leaf.grad, leaf64.grad)}


def rms_norm_float64(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def check_rms_norm(rows, hidden, with_residual, dtype, g):
    """rms_norm_triton / residual_rms_norm_triton on a strided [s, b, hidden] view against float64:
    the output and the gradients of x, delta and the weight (the residual stream's own gradient
    flowing on through the sum). The interpreter truncates fp32 to bf16 where the GPU rounds to nearest,
    so a bf16 sum equal to torch's x + delta bit for bit is checked on the GPU (test_gpu_paths.py)."""
    x = torch.randn(rows, 2, hidden + 5, generator=g)[..., 5:]   # row stride != width
    delta = torch.randn(rows, 2, hidden, generator=g)
    w = torch.rand(hidden, generator=g) + 0.5
    dout, dsum = torch.randn(rows, 2, hidden, generator=g), torch.randn(rows, 2, hidden, generator=g)
    xs, ds, ws = (t.detach().to(dtype).requires_grad_() for t in (x, delta, w))
    x64, d64, w64 = (t.detach().to(dtype).double().requires_grad_() for t in (x, delta, w))
    errors = {}
    if with_residual:
        total, out = residual_rms_norm_triton(xs, ds, ws, 1e-5)
        torch.autograd.backward([total, out], [dsum.to(dtype), dout.to(dtype)])
        total64 = x64 + d64
        errors["sum"] = rel(total, total64)
        want = rms_norm_float64(total.detach().double().requires_grad_(), w64, 1e-5)
        # the float64 reference normalises the rounded sum (as the kernel does); its gradient flows
        # to x and delta through the exact sum
        want_ref = rms_norm_float64(total64 + (total.detach().double() - total64).detach(), w64, 1e-5)
        torch.autograd.backward([total64, want_ref], [dsum.to(dtype).double(), dout.to(dtype).double()])
        errors.update(out=rel(out, want), dx=rel(xs.grad, x64.grad), ddelta=rel(ds.grad, d64.grad))
    else:
        out = rms_norm_triton(xs, ws, 1e-5)
        out.backward(dout.to(dtype))
        want = rms_norm_float64(x64, w64, 1e-5)
        want.backward(dout.to(dtype).double())
        errors.update(out=rel(out, want), dx=rel(xs.grad, x64.grad))
    errors["dweight"] = rel(ws.grad, w64.grad)
    return errors


def check_group_rms_norm(batch, length, groups, width, g):
    """rms_norm_triton as the Mamba branch's norm: the scan's [b, s, d] output read as [s, b, d],
    `groups` groups normalised apart, a constant out_scale, against float64; the output comes out
    contiguous [s, b, d] and the input gradient in the input's [b, s, d] memory layout."""
    hidden, scale = groups * width, 0.9
    y = torch.randn(batch, length, hidden, generator=g)
    w = torch.rand(hidden, generator=g) + 0.5
    dout = torch.randn(length, batch, hidden, generator=g)
    ys, ws = y.clone().requires_grad_(), w.clone().requires_grad_()
    out = rms_norm_triton(ys.transpose(0, 1), ws, 1e-5, groups=groups, out_scale=scale)
    out.backward(dout)
    assert out.is_contiguous() and ys.grad.is_contiguous()
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    h = y64.transpose(0, 1).unflatten(-1, (groups, width))
    want = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * w64 * scale
    want.backward(dout.double())
    return {"out": rel(out, want), "dy": rel(ys.grad, y64.grad), "dweight": rel(ws.grad, w64.grad)}


def check_out_projection_input(g):
    """The out-projection's input from the branches' outputs in layouts they leave them in (y as the
    scan's [b, s, .] memory seen as [s, b, .]; attention's [b, heads, s, d] memory seen as
    [s, b, heads, d], its heads apart in memory; a part wider than one column block and a ragged row
    count): the Triton copies equal torch.cat of the flattened parts, and so do the parts'
    gradients, bit for bit."""
    from falcon_h1.kernels.out_projection_input import out_projection_input, out_projection_input_reference

    s, b, width, heads, head_dim = 19, 3, 300, 3, 24
    y = torch.randn(b, s, width, generator=g).transpose(0, 1)
    o = torch.randn(b, heads, s, head_dim, generator=g).permute(2, 0, 1, 3)
    dout = torch.randn(s, b, width + heads * head_dim, generator=g)
    got_parts = [t.clone().requires_grad_() for t in (y, o)]
    want_parts = [t.clone().requires_grad_() for t in (y, o)]
    got = out_projection_input(got_parts, triton_copy=True)
    want = out_projection_input_reference(want_parts)
    got.backward(dout)
    want.backward(dout)
    same = got.is_contiguous() and torch.equal(got, want) and all(
        torch.equal(a.grad, w.grad) for a, w in zip(got_parts, want_parts))
    return {"differs from torch.cat": 0.0 if same else 1.0}


def check_row_scale(g):
    """kernels.row_scale: W * s for a [rows, 1] constant s (the folded µP scales), forward and its
    weight gradient, bit for bit torch's fp32 broadcasting multiply; a ragged last column block
    (3000 columns over 2048-wide programs); the in-place form on a row-strided view."""
    from falcon_h1.kernels.row_scale import row_scaled_weight, scale_rows

    w = torch.randn(7, 3000, generator=g)
    s = torch.rand(7, 1, generator=g) + 0.5
    dw = torch.randn(7, 3000, generator=g)
    got_w, want_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    got = row_scaled_weight(got_w, s)
    want = want_w * s
    got.backward(dw)
    want.backward(dw)
    wide = torch.randn(7, 3100, generator=g)
    view, untouched = wide[:, :3000], wide[:, 3000:].clone()
    want_in_place = view * s
    scale_rows(view, s.view(-1), out=view)
    same = (torch.equal(got, want) and torch.equal(got_w.grad, want_w.grad)
            and torch.equal(view, want_in_place) and torch.equal(wide[:, 3000:], untouched))
    return {"differs from torch's w * s": 0.0 if same else 1.0}


def check_mixed_dtype_residual(g):
    """An fp32 residual stream plus a bf16 delta: the sum in fp32, bit for bit torch's x + delta
    (the bf16 values widen exactly), and the norm's output in fp32 too."""
    x = torch.randn(7, 2, 96, generator=g)
    delta = torch.randn(7, 2, 96, generator=g).bfloat16()
    w = torch.rand(96, generator=g) + 0.5
    total, out = residual_rms_norm_triton(x, delta, w, 1e-5)
    want = rms_norm_float64(total.double(), w.double(), 1e-5)
    same_sum = total.dtype == torch.float32 and torch.equal(total, x + delta) and out.dtype == torch.float32
    return {"out": rel(out, want), "sum differs from torch's x + delta": 0.0 if same_sum else 1.0}


def main():
    g = torch.Generator().manual_seed(0)
    errors, leak_errors, bf16_errors = {}, {}, {}
    # the tiled kernels, the two-pass backward's pass 1 both ways (the x windows kept for dw, and read
    # again), and the streaming kernels (the forward and the one-pass backward walking the rows)
    for reload, streaming in ((False, False), (True, False), (False, True)):
        conv_triton.BWD_RELOAD_WINDOWS = reload
        tag = " streaming" if streaming else " reload" if reload else ""
        # lengths: within one block, across backward program boundaries (64 rows), ragged, shorter
        # than the kernel;
        # channels not a multiple of the 128-channel block
        for batch, length, channels, pad, with_scale in [(2, 37, 200, 3, False), (1, 300, 130, 0, True),
                                                         (1, 2, 20, 0, True)]:
            for name, err in check_conv(batch, length, channels, pad, with_scale, g, streaming).items():
                errors[f"conv{tag} b{batch} l{length} c{channels} scale={with_scale} {name}"] = err
        # packed rows: documents of uneven lengths, one shorter than the kernel, boundaries inside
        # forward blocks (32 rows) and backward programs (64 rows) and across them
        for rows in ([[11, 14, 15], [2, 25, 13]], [[30, 37, 33]]):
            packed, leaks = check_packed_conv(rows, 130, g, streaming)
            for name, err in packed.items():
                errors[f"packed conv{tag} {rows} {name}"] = err
            for name, err in leaks.items():
                leak_errors[f"packed conv{tag} {rows} {name} (must exceed {LEAK_MARGIN:.0e})"] = err
    # head dims whose half is and is not a power of two; a row of its own positions or shared ones;
    # GQA; the gradient into a shared in-projection buffer or its own; a program a head, or all
    # heads of a row block in one launch (head counts not a power of two: 3 and 5 q heads)
    for length, batch, heads, kv_heads, head_dim, with_positions, shared, one_launch in [
            (37, 2, 4, 2, 16, True, True, False), (70, 1, 3, 1, 24, False, False, False),
            (5, 3, 2, 2, 64, True, False, False), (37, 2, 4, 2, 16, True, True, True),
            (70, 1, 3, 1, 24, False, False, True), (9, 3, 5, 3, 64, True, True, True)]:
        for name, err in check_rotary(length, batch, heads, kv_heads, head_dim, with_positions, shared, g,
                                      one_launch).items():
            errors[f"rotary l{length} b{batch} h{heads}/{kv_heads} d{head_dim} positions={with_positions} "
                   f"shared={shared} one_launch={one_launch} {name}"] = err
    # rows not a multiple of the backward's rows per program (16) nor its tile (4 rows at 1024);
    # widths with and without padding to a power of two; fp32 here, bf16 below (its own tolerance)
    for rows, hidden, with_residual in [(37, 200, True), (9, 1024, False), (19, 1024, True), (3, 3000, False)]:
        for name, err in check_rms_norm(rows, hidden, with_residual, torch.float32, g).items():
            errors[f"rms_norm s{rows} x b2 h{hidden} residual={with_residual} {name}"] = err
    for name, err in check_mixed_dtype_residual(g).items():
        errors[f"rms_norm fp32 + bf16 residual {name}"] = err
    for batch, length, groups, width in [(2, 19, 3, 40), (1, 33, 1, 128)]:
        for name, err in check_group_rms_norm(batch, length, groups, width, g).items():
            errors[f"group rms_norm b{batch} l{length} groups={groups} x {width} {name}"] = err
    for name, err in check_rms_norm(21, 256, True, torch.bfloat16, g).items():
        bf16_errors[f"rms_norm bf16 s21 x b2 h256 residual=True {name}"] = err
    for name, err in check_swiglu(5, 1100, g).items():
        errors[f"swiglu {name}"] = err
    for name, err in check_out_projection_input(g).items():
        errors[f"out-projection input {name}"] = err
    for name, err in check_row_scale(g).items():
        errors[f"row scale {name}"] = err
    failed = False
    for name, err in errors.items():
        ok = err <= TOLERANCE
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
    for name, err in bf16_errors.items():
        ok = err <= BF16_TOLERANCE
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
    for name, err in leak_errors.items():
        ok = err >= LEAK_MARGIN
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
