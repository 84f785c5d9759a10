"""kernels.ssd_backward_reference (the backward's term-by-term pieces the Triton kernels are built
against) equals autograd through the chunked forward reference, in float64, with and without packed
documents, a sequence that is not a multiple of the chunk, and groups shared by several heads."""

import pytest
import torch
import torch.nn.functional as F

from falcon_h1.kernels.ssd_backward_reference import ssd_backward_pieces
from falcon_h1.kernels.ssd_reference import ssd_chunk_scan_reference, ssd_sequential_float64


def inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(x=r(b, l, h, p), dt=F.softplus(r(b, l, h)), A=-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2,
                B=r(b, l, g, n), C=r(b, l, g, n), z=r(b, l, h, p), D=r(h), dout=r(b, l, h, p))


@pytest.mark.parametrize("packed", [False, True])
def test_pieces_equal_autograd_of_the_reference(packed):
    t = inputs()
    seq_idx = None
    if packed:  # documents of lengths 5, 14, 18 in row 0 (boundaries inside and on chunk edges); row 1 one document
        seq_idx = torch.tensor([[0] * 5 + [1] * 14 + [2] * 18, [0] * 37], dtype=torch.int32)
    leaves = {k: t[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "z", "D")}
    y = ssd_chunk_scan_reference(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 8,
                                 leaves["D"], seq_idx=seq_idx)
    # the independent step-by-step recurrence agrees with the chunked form the pieces follow
    seq = ssd_sequential_float64(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], seq_idx=seq_idx)
    torch.testing.assert_close(y.detach(), seq, rtol=1e-10, atol=1e-10)
    (y * F.silu(leaves["z"]) * t["dout"]).sum().backward()
    pieces = ssd_backward_pieces(t["dout"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["z"], 8, D=t["D"],
                                 seq_idx=seq_idx)
    torch.testing.assert_close(pieces["y"], y.detach(), rtol=1e-10, atol=1e-10)
    for name, grad in (("dx", "x"), ("ddt", "dt"), ("dA", "A"), ("dB", "B"), ("dC", "C"), ("dz", "z"), ("dD", "D")):
        torch.testing.assert_close(pieces[name], leaves[grad].grad, rtol=1e-9, atol=1e-9, msg=name)
