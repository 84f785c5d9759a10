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
from falcon_h1.kernels.documents import documents_from_position_ids  # noqa: E402
from falcon_h1.kernels.swiglu_triton import swiglu_triton  # noqa: E402
from tests.falcon_h1.packed_rows import documents, position_ids  # noqa: E402

TOLERANCE = 1e-5  # fp32 kernels against float64: rounding only
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


def check_conv(batch, length, channels, pad, with_scale, g):
    base = torch.randn(length, batch, channels + pad, generator=g)
    x = base[:, :, pad:].transpose(0, 1)          # strided [b, l, c] view, as in the mixer
    w, bias = torch.randn(channels, 4, generator=g), torch.randn(channels, generator=g)
    scale = torch.rand(channels, generator=g) + 0.5 if with_scale else None
    dy = torch.randn(batch, length, channels, generator=g)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    out = causal_conv1d_silu_triton(xs, ws, bs, scale)
    out.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    want = conv_float64(x64, w64, b64, scale.double() if with_scale else 1.0)
    want.backward(dy.double())
    return {"out": rel(out, want), "dx": rel(xs.grad, x64.grad), "dweight": rel(ws.grad, w64.grad),
            "dbias": rel(bs.grad, b64.grad)}


def check_packed_conv(rows, channels, g):
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
    causal_conv1d_silu_triton(xs, ws, bs, scale, seq_idx=seq_idx).backward(dy)
    got = {"out": None, "dx": xs.grad, "dweight": ws.grad, "dbias": bs.grad}
    with torch.no_grad():
        got["out"] = causal_conv1d_silu_triton(x, w, bias, scale, seq_idx=seq_idx)

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


def main():
    g = torch.Generator().manual_seed(0)
    errors, leak_errors = {}, {}
    # the backward's pass 1 both ways: the x windows kept for dw, and read again
    for reload in (False, True):
        conv_triton.BWD_RELOAD_WINDOWS = reload
        tag = " reload" if reload else ""
        # lengths: within one block, across backward program boundaries (64 rows), ragged, shorter
        # than the kernel;
        # channels not a multiple of the 128-channel block
        for batch, length, channels, pad, with_scale in [(2, 37, 200, 3, False), (1, 300, 130, 0, True),
                                                         (1, 2, 20, 0, True)]:
            for name, err in check_conv(batch, length, channels, pad, with_scale, g).items():
                errors[f"conv{tag} b{batch} l{length} c{channels} scale={with_scale} {name}"] = err
        # packed rows: documents of uneven lengths, one shorter than the kernel, boundaries inside
        # forward blocks (32 rows) and backward programs (64 rows) and across them
        for rows in ([[11, 14, 15], [2, 25, 13]], [[30, 37, 33]]):
            packed, leaks = check_packed_conv(rows, 130, g)
            for name, err in packed.items():
                errors[f"packed conv{tag} {rows} {name}"] = err
            for name, err in leaks.items():
                leak_errors[f"packed conv{tag} {rows} {name} (must exceed {LEAK_MARGIN:.0e})"] = err
    for name, err in check_swiglu(5, 1100, g).items():
        errors[f"swiglu {name}"] = err
    failed = False
    for name, err in errors.items():
        ok = err <= TOLERANCE
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
    for name, err in leak_errors.items():
        ok = err >= LEAK_MARGIN
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
